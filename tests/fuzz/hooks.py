"""Schemathesis hooks for the fuzz run: spell whole numbers as JSON integers.

JSON Schema (draft 6 on, so OpenAPI 3.1) counts ``2.0`` as an integer, and Schemathesis
sends such floats as valid data. API.md is stricter: "Integers in bodies are JSON integers
(not strings, floats or booleans)", so ``2.0`` is a 400, which no OpenAPI 3.1 keyword can
express. Rewriting a whole float to the same integer keeps every generated body the same
JSON-Schema value (valid stays valid, invalid stays invalid) and only changes its spelling.
Refusing ``2.0`` is tested in ``tests/http/test_hostile_input.py``.
"""

from __future__ import annotations

from typing import Any

import schemathesis


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return value


@schemathesis.hook
def map_body(context: schemathesis.HookContext, body: Any) -> Any:
    return _integral(body)
