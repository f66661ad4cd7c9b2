"""Request bodies and query parameters: strict decoding and validation with msgspec.

Every body is decoded from raw bytes in one step (UTF-8, JSON syntax, types, ranges,
unknown fields), so a malformed body can only ever become a 400 ``invalid_request``.
Integers must be JSON integers in 0..2^31-1: msgspec refuses floats, strings and
booleans for ``int`` fields.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

import msgspec

from actors.state import Quota
from server.problems import Problem

MAX_INT = 2**31 - 1
TENANT_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
#: printable text: no C0 control characters and no DEL
_TEXT_RE = re.compile(r"[^\x00-\x1f\x7f]+")
IDEMPOTENCY_KEY_RE = re.compile(r"[\x20-\x7e]{1,255}")
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")

Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
Size = Annotated[int, msgspec.Meta(ge=1, le=MAX_INT)]
#: the same rule as ``_TEXT_RE``, for the schema (``__post_init__`` still checks it, since
#: msgspec's ``$`` would let a trailing newline through)
_TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"
Image = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=256,
        pattern=_TEXT_PATTERN,
        description="printable, 1..256 characters",
    ),
]
Name = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=63,
        pattern=_TEXT_PATTERN,
        description="printable, 1..63 characters",
    ),
]
TenantId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
Ttl = Annotated[
    int, msgspec.Meta(ge=1, le=MAX_INT, description="token lifetime in seconds; null: none")
]


def _printable(value: str, field: str) -> None:
    if not _TEXT_RE.fullmatch(value):
        raise ValueError(f"`{field}` must not contain control characters")


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
        return msgspec.json.decode(data, type=schema)
    except msgspec.ValidationError as error:
        raise Problem("invalid_request", f"invalid body: {error}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as error:
        # msgspec reports bad UTF-8 inside a string as UnicodeDecodeError.
        raise Problem("invalid_request", f"body is not valid UTF-8 JSON: {error}") from None


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
