"""The chain format: canonical bytes, hashes and verification, against an independent model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.chain import GENESIS, canonical, entry_hash, iter_lines, seal, verify_lines

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
