"""The chain format: canonical bytes, hashes and verification, against an independent model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.journal.chain import GENESIS, canonical, entry_hash, seal, verify_lines
from actors.journal.segments import iter_lines

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.text(st.characters(exclude_categories=("Cs",))),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(st.characters(exclude_categories=("Cs",))), children, max_size=4)
    ),
    max_leaves=20,
)


def stdlib_canonical(value: Any) -> bytes:
    """The form API.md spells out, computed with the standard library."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@settings(max_examples=300)
@given(st.dictionaries(st.text(), json_values, max_size=6))
def test_canonical_matches_the_standard_library(entry: dict[str, Any]) -> None:
    assert canonical(entry) == stdlib_canonical(entry)


def test_hash_excludes_the_hash_member() -> None:
    entry = {"seq": 1, "prev": GENESIS, "op": "vm.spawn", "detail": {"image": "débian"}}
    expected = hashlib.sha256(stdlib_canonical(entry)).hexdigest()
    assert entry_hash({**entry, "hash": "whatever"}) == expected
    line = seal(dict(entry))
    assert json.loads(line)["hash"] == expected
    assert line.endswith(b"\n") and b"\n" not in line[:-1]


def write_chain(path: Path, n: int) -> list[bytes]:
    lines, prev = [], GENESIS
    for seq in range(1, n + 1):
        entry = {"seq": seq, "prev": prev, "op": "tenant.create", "detail": {}}
        line = seal(entry)
        prev = entry["hash"]
        lines.append(line)
    path.mkdir(parents=True, exist_ok=True)
    (path / "000000000001.jsonl").write_bytes(b"".join(lines))
    return lines


def test_verify_intact_torn_and_tampered(tmp_path: Path) -> None:
    lines = write_chain(tmp_path, 5)
    report = verify_lines(iter_lines(tmp_path))
    assert (report.verdict, report.entries, report.head_seq) == ("ok", 5, 5)

    segment = tmp_path / "000000000001.jsonl"
    segment.write_bytes(b"".join(lines) + b'{"seq": 6, "pr')
    assert verify_lines(iter_lines(tmp_path)).verdict == "torn"

    edited = lines[2].replace(b'"tenant.create"', b'"tenant.delete"')
    segment.write_bytes(b"".join([*lines[:2], edited, *lines[3:]]))
    report = verify_lines(iter_lines(tmp_path))
    assert (report.verdict, report.bad_seq) == ("tampered", 3)

    segment.write_bytes(b"".join([lines[0], lines[2], lines[1], *lines[3:]]))
    report = verify_lines(iter_lines(tmp_path))
    assert (report.verdict, report.bad_seq) == ("tampered", 2)


def test_invalid_utf8_in_a_line_is_tampered_not_a_crash(tmp_path: Path) -> None:
    lines = write_chain(tmp_path, 3)
    segment = tmp_path / "000000000001.jsonl"
    broken = lines[1].replace(b'"tenant.create"', b'"tenant.\xff\xfe"')
    segment.write_bytes(b"".join([lines[0], broken, lines[2]]))
    report = verify_lines(iter_lines(tmp_path))
    assert (report.verdict, report.bad_seq) == ("tampered", 2)


# Entries of the shape the writer produces, with hostile strings wherever a request can
# put one (names, images, keys, reasons) and integers up to the 64-bit edges.
any_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
edge_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
details = st.recursive(
    st.none() | st.booleans() | edge_ints | any_text,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=12,
)
audit_entries = st.fixed_dictionaries(
    {
        "seq": st.integers(min_value=1, max_value=2**63 - 1),
        "ts": any_text,
        "op": st.sampled_from(["vm.spawn", "vm.destroy", "tenant.create", "token.issue"]),
        "outcome": st.sampled_from(["requested", "succeeded", "failed", "rejected"]),
        "tenant": st.none() | any_text,
        "vm": st.none() | any_text,
        "source": st.fixed_dictionaries({"ip": any_text, "token_id": st.none() | any_text}),
        "request_id": st.none() | any_text,
        "detail": st.dictionaries(any_text, details, max_size=5),
        "prev": st.text("0123456789abcdef", min_size=64, max_size=64),
    }
)


@settings(max_examples=500)
@given(audit_entries)
def test_canonical_of_audit_entries_is_the_standard_library_form(entry: dict[str, Any]) -> None:
    assert canonical(entry) == stdlib_canonical(entry)


def test_canonical_of_control_characters_and_non_ascii() -> None:
    entry = {"z": '\x00\x1f\x7f\u2028\u2029"\\/é\U0001f600', "a": {"é": 1, "e": [None, True]}}
    assert canonical(entry) == stdlib_canonical(entry)


def test_values_orjson_refuses_fall_back_to_the_old_form() -> None:
    # Beyond 64 bits orjson refuses; the fallback still gives the standard library form.
    for big in (2**64, -(2**63) - 1, 10**30):
        entry = {"detail": {"n": big}, "seq": 1}
        assert canonical(entry) == stdlib_canonical(entry)
    # Deeper nesting than orjson accepts.
    deep: Any = 0
    for _ in range(300):
        deep = [deep]
    assert canonical({"d": deep}) == stdlib_canonical({"d": deep})
    # A lone surrogate has no UTF-8 form: neither the standard library nor msgspec can
    # encode it, and canonical() raises the same error as before (the writer refuses the
    # entry and fails its ticket), rather than writing some other bytes.
    lone = {"name": "a\ud800b"}
    for encode in (canonical, stdlib_canonical, lambda e: msgspec.json.encode(e, order="sorted")):
        with pytest.raises(UnicodeEncodeError):
            encode(lone)


def test_lines_across_read_chunks_keep_their_offsets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("actors.journal.segments.READ_CHUNK", 7)  # every line spans several reads
    lines = write_chain(tmp_path, 4)
    segment = tmp_path / "000000000001.jsonl"
    segment.write_bytes(b"".join(lines) + b'{"torn')
    read = list(iter_lines(tmp_path))
    assert [r.data + b"\n" for r in read[:4]] == lines
    assert [r.offset for r in read[:4]] == [sum(map(len, lines[:i])) for i in range(4)]
    assert read[4] == (segment, sum(map(len, lines)), b'{"torn', False)
    assert all(r.complete for r in read[:4])
