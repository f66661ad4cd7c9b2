"""Stricter input (API.md v1.1): tokens and cursors only as issued; no invisible characters.

A token is accepted only in exactly the form the server issued it, so every variation of
a good token (padding appended, characters outside the token alphabet, non-ASCII bytes, a
last base64 character that decodes to the same bytes) is the 401 of any bad token, and a
variation of a good list cursor is a 400. ``name`` and ``image`` refuse the characters of
the Unicode categories Cc, Cf, Cs, Co, Cn, Zl and Zp. Each case runs through the real app
(Quart test client) and must change nothing; the token cases, whose point is raw bytes in
a header, also run against a real server process over a raw socket.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from conftest import QUOTA, Api, LiveServer, bearer
from peers import raw_answer
from server.schemas import REFUSED_CATEGORIES, TEXT_PATTERN

SPEC: dict[str, Any] = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}
PROBLEM_MEMBERS = {"type", "title", "status", "detail", "code"}


def _spare_bits(text: str) -> str:
    """``text`` with its last base64 character changed but decoding to the same bytes."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    spare = {2: 4, 3: 2}[len(text.rpartition(".")[2]) % 4]  # unused low bits of the last
    index = alphabet.index(text[-1])
    return text[:-1] + alphabet[index ^ ((1 << spare) - 1)]


def _inside_signature(insert: str) -> Callable[[str], str]:
    def variant(text: str) -> str:
        payload, dot, signature = text.rpartition(".")
        return payload + dot + signature[:8] + insert + signature[8:]

    return variant


#: variations of an issued token or cursor (as text; the live test sends their UTF-8 or
#: latin-1 bytes as they are)
VARIANTS: dict[str, Callable[[str], str]] = {
    "padding-1": lambda t: t + "=",
    "padding-2": lambda t: t + "==",
    "at-signs-in-signature": _inside_signature("@@@"),
    "byte-ff-appended": lambda t: t + "\xff",
    "e-acute-appended": lambda t: t + "é",
    "non-ascii-inside": _inside_signature("ü"),
    "plus-and-slash-inside": _inside_signature("+/"),
    "tilde-appended": lambda t: t + "~",
    "dot-appended": lambda t: t + ".",
    "payload-padded": lambda t: t.replace(".", "=.", 1),
    "spare-bits-of-last-char": _spare_bits,
}


@dataclass(frozen=True)
class World:
    token: str
    vm_cursor: str
    tenant_cursor: str


async def make_world(api: Api) -> World:
    """Tenants ``acme`` (two VMs) and ``beta``; a VM cursor and a tenant-list cursor."""
    token = (await api.provision("acme", QUOTA)).token
    await api.provision("beta", QUOTA)
    for _ in range(2):
        assert (await api.spawn(f"Bearer {token}")).status_code == 201
    page = await api.client.get("/v1/vms?limit=1", headers=bearer(token))
    tenants = await api.client.get("/v1/admin/tenants?limit=1", headers=api.admin)
    vm_cursor = (await page.get_json())["next"]
    tenant_cursor = (await tenants.get_json())["next"]
    assert vm_cursor and tenant_cursor
    return World(token, vm_cursor, tenant_cursor)


async def snapshot(api: Api, world: World) -> Any:
    """What a refused request must leave as it was: the chain head, usage, the VMs."""
    usage = await api.client.get("/v1/usage", headers=bearer(world.token))
    vms = await api.client.get("/v1/vms?limit=1000", headers=bearer(world.token))
    assert usage.status_code == vms.status_code == 200
    audit = api.service.audit
    return (audit.seq, audit.head, await usage.get_json(), await vms.get_json())


def check_problem(status: int, code: str, got_status: int, raw: bytes) -> dict[str, Any]:
    assert got_status == status, raw[:500]
    problem = json.loads(raw)
    assert set(problem) >= PROBLEM_MEMBERS and problem["code"] == code, problem
    return problem


# -- tokens ------------------------------------------------------------------------------------


def test_every_variant_really_differs_from_the_original() -> None:
    sample = "WyJhY21lIiwidG9rLTEiXQ.nNWPec8Chgy-DYWiBwk7dYCb4IatkMliaO_va19VW10"
    made = {name: variant(sample) for name, variant in VARIANTS.items()}
    assert sample not in made.values()
    assert len(set(made.values())) == len(made)


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
async def test_a_token_variation_is_the_401_of_any_bad_token(api: Api, variant: str) -> None:
    world = await make_world(api)
    before = await snapshot(api, world)  # the issued token is used (and cached) first
    bad = await api.client.get("/v1/usage", headers=bearer("not-a-token"))
    expected = await bad.get_data()

    changed = VARIANTS[variant](world.token)
    for method, path, body in (("GET", "/v1/usage", None), ("POST", "/v1/vms", SPEC)):
        response = await api.client.open(path, method=method, headers=bearer(changed), json=body)
        raw = await response.get_data()
        check_problem(401, "unauthorized", response.status_code, raw)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert raw == expected  # not a word more than for any other bad token

    assert await snapshot(api, world) == before


@pytest.mark.parametrize("variant", ["padding-1", "byte-ff-appended", "e-acute-appended"])
async def test_an_admin_token_variation_is_refused(api: Api, variant: str) -> None:
    changed = VARIANTS[variant](api.admin_token)
    response = await api.client.get("/v1/admin/tenants", headers=bearer(changed))
    check_problem(401, "unauthorized", response.status_code, await response.get_data())


# -- cursors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
async def test_a_cursor_variation_is_a_400(api: Api, variant: str) -> None:
    world = await make_world(api)
    before = await snapshot(api, world)
    calls = (
        ("/v1/vms", world.vm_cursor, bearer(world.token)),
        ("/v1/admin/tenants", world.tenant_cursor, api.admin),
    )
    for path, cursor, headers in calls:
        good = await api.client.get(f"{path}?limit=1&cursor={quote(cursor)}", headers=headers)
        assert good.status_code == 200
        changed = quote(VARIANTS[variant](cursor), safe="")
        response = await api.client.get(f"{path}?limit=1&cursor={changed}", headers=headers)
        problem = check_problem(
            400, "invalid_request", response.status_code, await response.get_data()
        )
        assert "cursor" in problem["detail"]
    assert await snapshot(api, world) == before


# -- name and image ----------------------------------------------------------------------------

#: one or more characters of every refused category (the issue's four first)
REFUSED = {
    "U+0085 next line (Cc)": "\u0085",
    "U+202E right-to-left override (Cf)": "\u202e",
    "U+200B zero-width space (Cf)": "\u200b",
    "U+2028 line separator (Zl)": "\u2028",
    "U+2029 paragraph separator (Zp)": "\u2029",
    "U+001B escape (Cc)": "\u001b",
    "U+009F application program command (Cc)": "\u009f",
    "U+00AD soft hyphen (Cf)": "\u00ad",
    "U+2066 left-to-right isolate (Cf)": "\u2066",
    "U+FEFF byte order mark (Cf)": "\ufeff",
    "U+E0001 language tag (Cf, astral)": "\U000e0001",
    "U+E000 private use (Co)": "\ue000",
    "U+F0000 private use (Co, astral)": "\U000f0000",
    "U+0378 unassigned (Cn)": "\u0378",
    "U+10FFFF noncharacter (Cn)": "\U0010ffff",
}
#: printable text that must keep working, spaces of category Zs included
ACCEPTED = ["café", "名前", "web 1", "no\u00a0break", "wide\u3000space", "emoji-\U0001f600"]


@pytest.mark.parametrize("field", ["name", "image"])
@pytest.mark.parametrize("char", list(REFUSED.values()), ids=list(REFUSED))
async def test_a_refused_character_in_text_is_a_400(api: Api, field: str, char: str) -> None:
    token = (await api.provision("acme", QUOTA)).bearer
    seq = api.service.audit.seq
    body = {**SPEC, field: f"web{char}1"}
    response = await api.client.post("/v1/vms", json=body, headers={"Authorization": token})
    problem = check_problem(400, "invalid_request", response.status_code, await response.get_data())
    assert f"U+{ord(char):04X}" in problem["detail"] and field in problem["detail"]
    assert api.service.audit.seq == seq
    assert api.fleet.vm_ids() == set()


@pytest.mark.parametrize("text", ACCEPTED)
async def test_printable_text_is_accepted_as_sent(api: Api, text: str) -> None:
    token = (await api.provision("acme", QUOTA)).bearer
    response = await api.spawn(token, name=text, image=text)
    assert response.status_code == 201, await response.get_data()
    vm = await response.get_json()
    assert (vm["name"], vm["image"]) == (text, text)


def test_the_openapi_pattern_says_the_same_for_every_assigned_bmp_character() -> None:
    # The document's pattern cannot list the unassigned code points; for every other
    # character of the Basic Multilingual Plane it must agree with the server's rule.
    pattern = re.compile(TEXT_PATTERN)
    disagree = []
    for code in range(0x10000):
        char = chr(code)
        category = unicodedata.category(char)
        if category in ("Cn", "Cs"):
            continue
        if (pattern.fullmatch(char) is None) != (category in REFUSED_CATEGORIES):
            disagree.append(f"U+{code:04X} {category}")
    assert disagree == []


# -- against a real server, raw bytes on the wire ----------------------------------------------


def raw_request(url: str, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send one request exactly as given (no client library cleans it up); its answer."""
    response, data = raw_answer(url, head + b"Connection: close\r\n\r\n" + body)
    headers = {k.decode().lower(): v.decode("latin-1") for k, v in response.headers}
    return response.status_code, headers, data


def get_with_token(url: str, path: str, token: bytes) -> tuple[int, dict[str, str], bytes]:
    head = b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token
    return raw_request(url, head + b"\r\n")


#: the same variations as bytes on the wire: 0xff and é (UTF-8) appended raw
WIRE_VARIANTS: dict[str, Callable[[bytes], bytes]] = {
    "padding-1": lambda t: t + b"=",
    "padding-2": lambda t: t + b"==",
    "at-signs-in-signature": lambda t: t[:-10] + b"@@@" + t[-10:],
    "byte-ff-appended": lambda t: t + b"\xff",
    "e-acute-utf8-appended": lambda t: t + "é".encode(),
    "byte-80-inside": lambda t: t[:-10] + b"\x80" + t[-10:],
    "spare-bits-of-last-char": lambda t: _spare_bits(t.decode()).encode(),
}


def test_token_and_cursor_variations_over_the_wire(live_server: LiveServer) -> None:
    admin = bearer(live_server.admin_token)
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        created = client.post(
            "/v1/admin/tenants", json={"id": "acme", "quota": QUOTA}, headers=admin
        )
        assert created.status_code == 201
        token = created.json()["token"]
        for _ in range(2):
            assert client.post("/v1/vms", json=SPEC, headers=bearer(token)).status_code == 201
        cursor = client.get("/v1/vms", params={"limit": 1}, headers=bearer(token)).json()["next"]
        created = client.post(
            "/v1/admin/tenants", json={"id": "beta", "quota": QUOTA}, headers=admin
        )
        assert created.status_code == 201
        listed = client.get("/v1/admin/tenants", params={"limit": 1}, headers=admin)
        tenant_cursor = listed.json()["next"]
        head = client.get("/v1/admin/audit?limit=1", headers=admin).json()["head"]

    url = live_server.url
    status, _, _ = get_with_token(url, "/v1/usage", token.encode())
    assert status == 200
    for name, variant in WIRE_VARIANTS.items():
        status, headers, raw = get_with_token(url, "/v1/usage", variant(token.encode()))
        check_problem(401, "unauthorized", status, raw)
        assert headers["www-authenticate"] == "Bearer", name
        # a variation of the admin token too
        status, _, raw = get_with_token(
            url, "/v1/admin/tenants", variant(live_server.admin_token.encode())
        )
        check_problem(401, "unauthorized", status, raw)

    pages = (
        ("/v1/vms", cursor, token.encode()),
        ("/v1/admin/tenants", tenant_cursor, live_server.admin_token.encode()),
    )
    for path, issued, credential in pages:
        status, _, _ = get_with_token(url, f"{path}?limit=1&cursor={quote(issued)}", credential)
        assert status == 200
        for variant in VARIANTS.values():
            changed = quote(variant(issued), safe="")
            status, _, raw = get_with_token(url, f"{path}?limit=1&cursor={changed}", credential)
            check_problem(400, "invalid_request", status, raw)
        # '=' appended unescaped in the query string is the same variation
        status, _, raw = get_with_token(url, f"{path}?limit=1&cursor={issued}=", credential)
        check_problem(400, "invalid_request", status, raw)

    # A raw U+2028 (UTF-8 bytes, legal inside a JSON string) in a name is refused too.
    body = b'{"vcpus": 1, "memory_mib": 256, "image": "debian-12", "name": "a\xe2\x80\xa8b"}'
    spawn = (
        b"POST /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
    )
    status, _, raw = raw_request(url, spawn, body)
    check_problem(400, "invalid_request", status, raw)

    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        assert client.get("/v1/admin/audit?limit=1", headers=admin).json()["head"] == head
