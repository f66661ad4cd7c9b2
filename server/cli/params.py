"""The parameter types of the client commands: the API's ranges, checked before sending.

A value out of range is a usage error (exit 2) that names the option, in click's words
(``Invalid value for '--vcpus': -1 is not in the range 0<=x<=2147483647.``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import click

from server.client.operations import check_idempotency_key

MAX_INT = 2**31 - 1


class UrlType(click.ParamType[str]):
    """An http:// or https:// base URL."""

    name = "URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        try:
            parts = urlsplit(text)
            valid = parts.scheme in {"http", "https"} and bool(parts.hostname)
            _ = parts.port  # raises on a port that is not a number in 0..65535
        except ValueError:
            valid = False
        if not valid:
            self.fail(f"{text!r} is not an http:// or https:// URL", param, ctx)
        return text


class Text(click.ParamType[str]):
    """A string of ``low..high`` characters (the API's ranges); ``name`` is its metavar."""

    def __init__(self, name: str, low: int, high: int) -> None:
        self.name = name
        self.low = low
        self.high = high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if not self.low <= len(text) <= self.high:
            self.fail(
                f"must be {self.low}..{self.high} characters long, got {len(text)}", param, ctx
            )
        return text


class IdempotencyKey(click.ParamType[str]):
    """An ``Idempotency-Key``: 1..255 printable ASCII, as the API takes it."""

    name = "KEY"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return check_idempotency_key(str(value))
        except ValueError as error:
            self.fail(str(error), param, ctx)


#: an id that lands in a URL path: anything but empty (it is percent-encoded whole)
ID = Text("ID", 1, 4096)
COUNT = click.IntRange(0, MAX_INT)
SIZE = click.IntRange(1, MAX_INT)
TTL = click.IntRange(1, MAX_INT)
PAGE = click.IntRange(1, 1000)
