"""Request bodies and query parameters: strict decoding and validation with msgspec.

Every body is decoded from raw bytes in one step (UTF-8, JSON syntax, types, ranges,
unknown fields), so a malformed body can only ever become a 400 ``invalid_request``.
Integers must be JSON integers in 0..2^31-1: msgspec refuses floats, strings and
booleans for ``int`` fields. A member name given twice in one object is refused (RFC 8259
leaves its meaning to the parser, so two readers of the same body, or the idempotency
record and the audit entry, could disagree about what was asked). Free text (``name``,
``image``) must not contain characters of the Unicode categories in
:data:`REFUSED_CATEGORIES` (:func:`refused_character`).
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Annotated, Any, TypeVar

import msgspec

from actors.state import Quota
from server.problems import Problem

MAX_INT = 2**31 - 1
TENANT_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
#: refused in free text: controls, format (bidi, zero-width), surrogates, private use,
#: unassigned, line and paragraph separators (Python's Unicode database decides)
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
IDEMPOTENCY_KEY_RE = re.compile(r"[\x20-\x7e]{1,255}")
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")

Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
Size = Annotated[int, msgspec.Meta(ge=1, le=MAX_INT)]
#: the rule for the OpenAPI document: every refused character of the Basic Multilingual
#: Plane but the unassigned ones, which no compact pattern can list (surrogates cannot
#: reach a decoded body at all). Not used for validation: ``__post_init__`` applies the
#: whole rule, with a message that names the character.
TEXT_PATTERN = (
    r"^[^\x00-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e"
    r"\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ue000-\uf8ff\ufeff\ufff9-\ufffb]*$"
)
_TEXT_RULE = "no characters of the Unicode categories Cc, Cf, Cs, Co, Cn, Zl, Zp"
Image = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=256,
        extra_json_schema={"pattern": TEXT_PATTERN},
        description=f"1..256 characters; {_TEXT_RULE}",
    ),
]
Name = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=63,
        extra_json_schema={"pattern": TEXT_PATTERN},
        description=f"1..63 characters; {_TEXT_RULE}",
    ),
]
TenantId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
Ttl = Annotated[
    int, msgspec.Meta(ge=1, le=MAX_INT, description="token lifetime in seconds; null: none")
]


def refused_character(value: str) -> str | None:
    """The first character of ``value`` in a refused category, or None."""
    # isprintable() is C-fast and False only for categories C* and Z* (but the ASCII
    # space): text it accepts holds nothing refused. Others (e.g. a no-break space, Zs)
    # are looked at one character at a time.
    if value.isprintable():
        return None
    for char in value:
        if unicodedata.category(char) in REFUSED_CATEGORIES:
            return char
    return None


def _printable(value: str, field: str) -> None:
    char = refused_character(value)
    if char is not None:
        category = unicodedata.category(char)
        raise ValueError(
            f"`{field}` must not contain U+{ord(char):04X} (category {category}: "
            "controls, format, surrogate, private-use, unassigned, line and paragraph "
            "separator characters are refused)"
        )


class QuotaBody(msgspec.Struct, forbid_unknown_fields=True):
    """A quota or allocation: all three dimensions required."""

    vcpus: Count
    memory_mib: Count
    vms: Count

    def to_quota(self) -> Quota:
        return Quota(self.vcpus, self.memory_mib, self.vms)


class SpawnBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /v1/vms``."""

    vcpus: Size
    memory_mib: Size
    image: Image
    name: Name | None = None

    def __post_init__(self) -> None:
        _printable(self.image, "image")
        if self.name is not None:
            _printable(self.name, "name")


class CreateTenantBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /v1/admin/tenants``."""

    id: TenantId
    quota: QuotaBody
    token_ttl_seconds: Ttl | None = None

    def __post_init__(self) -> None:
        if not TENANT_ID_RE.fullmatch(self.id):
            raise ValueError("`id` must match ^[a-z0-9][a-z0-9-]{0,62}$")


class UpdateTenantBody(msgspec.Struct, forbid_unknown_fields=True):
    """``PATCH /v1/admin/tenants/{id}``."""

    quota: QuotaBody


class EmptyBody(msgspec.Struct, forbid_unknown_fields=True):
    """A body that may be absent or ``{}``."""


class IssueTokenBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /v1/admin/tenants/{id}/tokens``: optional; no body is a token without expiry."""

    ttl_seconds: Ttl | None = None


T = TypeVar("T")


def decode_body(data: bytes, schema: type[T]) -> T:
    """Decode and validate a JSON body; any failure is a 400 problem."""
    try:
        decoded = msgspec.json.decode(data, type=schema)
    except msgspec.ValidationError as error:
        raise Problem("invalid_request", f"invalid body: {error}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as error:
        # msgspec reports bad UTF-8 inside a string as UnicodeDecodeError.
        raise Problem("invalid_request", f"body is not valid UTF-8 JSON: {error}") from None
    # msgspec keeps the last of repeated members; the schema has already bounded the
    # body's shape (no free-form members), so this second, stdlib pass is shallow.
    json.loads(data, object_pairs_hook=_unique_members)
    return decoded


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members: dict[str, Any] = {}
    for name, value in pairs:
        if name in members:
            raise Problem("invalid_request", f"invalid body: member `{name}` is given twice")
        members[name] = value
    return members


def parse_int(args: Any, name: str, default: int, low: int, high: int) -> int:
    """A query parameter that must be a plain decimal integer in ``low..high``."""
    values = args.getlist(name)
    if not values:
        return default
    if len(values) > 1:
        raise Problem("invalid_request", f"query parameter `{name}` given more than once")
    text = values[0]
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(high)):
        raise Problem("invalid_request", f"`{name}` must be an integer in {low}..{high}")
    value = int(text)
    if not low <= value <= high:
        raise Problem("invalid_request", f"`{name}` must be an integer in {low}..{high}")
    return value


def single(args: Any, name: str) -> str | None:
    values = args.getlist(name)
    if len(values) > 1:
        raise Problem("invalid_request", f"query parameter `{name}` given more than once")
    return values[0] if values else None


def reject_unknown_params(args: Any, allowed: set[str]) -> None:
    unknown = sorted(set(args.keys()) - allowed)
    if unknown:
        raise Problem("invalid_request", f"unknown query parameter `{unknown[0]}`")
