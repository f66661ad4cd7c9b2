"""Schemathesis hooks for the fuzz run: generated bodies spelt as API.md reads them.

JSON Schema (draft 6 on, so OpenAPI 3.1) counts ``2.0`` as an integer, and Schemathesis
sends such floats as valid data. API.md is stricter: "Integers in bodies are JSON integers
(not strings, floats or booleans)", so ``2.0`` is a 400, which no OpenAPI 3.1 keyword can
express. Rewriting a whole float to the same integer keeps every generated body the same
JSON-Schema value (valid stays valid, invalid stays invalid) and only changes its spelling.
Refusing ``2.0`` is tested in ``tests/http/test_hostile_input.py``.

Likewise, the ``pattern`` of ``name`` and ``image`` lists every refused character but the
unassigned ones (category Cn) and a few outside the Basic Multilingual Plane: no compact
pattern can list those. A generated string may hold one where the schema allows it; such a
character is replaced by ``x``, which the schema allows too, so a valid value stays valid
(and now also under API.md's rule) and an invalid one keeps what made it invalid. Refusing
them is tested in ``tests/http/test_input_strict.py``.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import schemathesis

from server.schemas import REFUSED_CATEGORIES, TEXT_PATTERN

_ALLOWED_BY_PATTERN = re.compile(TEXT_PATTERN)
_TEXT_FIELDS = ("name", "image")


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return value


def _beyond_the_pattern(char: str) -> bool:
    refused = unicodedata.category(char) in REFUSED_CATEGORIES
    return refused and _ALLOWED_BY_PATTERN.fullmatch(char) is not None


def _text(value: str) -> str:
    return "".join("x" if _beyond_the_pattern(char) else char for char in value)


@schemathesis.hook
def map_body(context: schemathesis.HookContext, body: Any) -> Any:
    body = _integral(body)
    if isinstance(body, dict):
        for field in _TEXT_FIELDS:
            if isinstance(body.get(field), str):
                body[field] = _text(body[field])
    return body
