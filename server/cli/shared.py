"""What every client command shares: the connection options, output, exit codes.

A client command takes ``--url``, ``-o/--output`` and ``--timeout``, plus the admin
token (``--admin-token``, ``VM_TENANT_ADMIN_TOKEN``, else ``<data-dir>/admin.token``) or
a tenant token (``--token``, ``VM_TENANT_TOKEN``). The options sit on the command itself,
so they may follow its arguments. They fill one :class:`Session`, through which the
command sends its requests (always through :mod:`server.client`) and prints its result.

Exit codes: 0 done; 1 the server refused (4xx); 2 a usage error (click's own, or a token
that cannot be found); 3 the server could not be reached or answered 5xx. Nothing is
written to stdout before the command knows how it ended; failures print one line,
``vm-tenant: <status> <code>: <detail>``, on stderr. With ``-o json`` stdout is always
the API's answer body: on a refusal or a 5xx that is its problem document (nothing when
no server answered with one).
"""

from __future__ import annotations

import functools
import ssl
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import click
import msgspec

from server.cli.params import UrlType
from server.client import (
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    Answer,
    ApiError,
    Client,
    ClientError,
    Operation,
    Quota,
    Unreachable,
)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

Role = Literal["admin", "tenant"]

DEFAULT_DATA_DIR = "./vm-tenant-data"
ADMIN_TOKEN_FILE = "admin.token"  # API.md: <data-dir>/admin.token

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

#: env vars read by the client commands (not serve settings: ``serve`` must not call them typos)
CLIENT_ENV = frozenset(
    {
        "VM_TENANT_URL",
        "VM_TENANT_ADMIN_TOKEN",
        "VM_TENANT_TOKEN",
        "VM_TENANT_OUTPUT",
        "VM_TENANT_CACERT",
    }
)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Failed(click.ClickException):
    """A command that did not succeed: one line on stderr; its class sets the exit code."""

    def show(self, file: Any = None) -> None:
        click.echo(f"vm-tenant: {self.format_message()}", err=True)


class Refused(Failed):
    """The server refused (4xx)."""

    exit_code = EXIT_REFUSED


class Unusable(Failed):
    """The command cannot even ask: no token to be found, one that cannot be sent."""

    exit_code = EXIT_USAGE


class Unavailable(Failed):
    """No usable answer, or a 5xx."""

    exit_code = EXIT_UNAVAILABLE


def example(*lines: str) -> str:
    """An epilog of example command lines, kept as written by click's help formatter."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


# -- the session -------------------------------------------------------------------------------


@dataclass
class Session:
    """The connection options of one client command, and its output."""

    role: Role = "tenant"
    url: str = DEFAULT_URL
    output: str = "text"
    timeout: float = DEFAULT_TIMEOUT
    token: str | None = None
    admin_token: str | None = None
    data_dir: str = DEFAULT_DATA_DIR
    cacert: str | None = None
    _client: Client | None = field(default=None, repr=False)

    def _bearer(self) -> str:
        if self.role == "tenant":
            assert self.token is not None, "--token is a required option"
            return self.token
        if self.admin_token:
            return self.admin_token
        path = Path(self.data_dir) / ADMIN_TOKEN_FILE
        where = f"--admin-token, VM_TENANT_ADMIN_TOKEN or {path}"
        try:
            token = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise Unusable(f"no admin token ({where}): {reason}") from None
        if not token:
            raise Unusable(f"no admin token ({where}): the file is empty")
        return token

    def client(self) -> Client:
        """The client of this command (made once, closed with the command's context)."""
        if self._client is None:
            try:
                verify = ssl.create_default_context(cafile=self.cacert) if self.cacert else True
            except (OSError, ssl.SSLError) as error:
                raise Unusable(f"cannot use --cacert {self.cacert}: {error}") from None
            try:
                self._client = Client(self.url, self._bearer(), timeout=self.timeout, verify=verify)
            except ValueError as error:
                raise Unusable(str(error)) from None
            click.get_current_context().call_on_close(self._client.close)
        return self._client

    def send(self, operation: Operation[T]) -> Answer[T]:
        """Perform one operation; a failure ends the command with its exit code."""
        client = self.client()
        with failures(self.json):
            return client.send(operation)

    def pages(
        self, first: Operation[T], following: Callable[[T], Operation[T] | None]
    ) -> list[Answer[T]]:
        """Every page, from ``first`` on while ``following`` names the next one."""
        client = self.client()
        with failures(self.json):
            return list(client.pages(first, following))

    @property
    def json(self) -> bool:
        return self.output == "json"

    def emit(self, answer: Answer[T], text: Callable[[T], str | None]) -> None:
        """Print the answer: its exact body with ``-o json`` (``{}`` when it has none)."""
        if self.json:
            click.echo(answer.body or b"{}")
            return
        shown = text(answer.value)
        if shown is not None:
            click.echo(shown)

    def emit_pages(self, pages: list[Answer[T]], member: str, text: Callable[[], str]) -> None:
        """Print the pages as one document: the last page, ``member`` holding every item."""
        if not self.json:
            if shown := text():
                click.echo(shown)
            return
        documents = [msgspec.json.decode(page.body) for page in pages]
        joined = documents[-1]
        joined[member] = [item for document in documents for item in document[member]]
        click.echo(msgspec.json.encode(joined))


@contextmanager
def failures(json_output: bool = False) -> Iterator[None]:
    """Turn the client's errors into exit codes: 1 refused, 3 unreachable or 5xx.

    With ``json_output`` a problem document the server answered is printed on stdout, as
    the answer body of a success would be (``-o json``: one JSON document, the body).
    """
    try:
        yield
    except ApiError as error:
        if json_output and error.problem is not None:
            click.echo(msgspec.json.encode(error.problem))
        wait = f" (retry after {error.retry_after} s)" if error.retry_after is not None else ""
        kind = Unavailable if isinstance(error, Unreachable) else Refused  # a 5xx is both
        raise kind(f"{error}{wait}") from None
    except ClientError as error:
        raise Unavailable(str(error)) from None


def note(message: str) -> None:
    """A line for people on stderr (stdout stays the command's result)."""
    click.echo(message, err=True)


def table(header: list[str], rows: list[list[str]], *, aligned: bool | None = None) -> str:
    """Columns under a header: aligned for a terminal, else tab-separated (``cut -f``).

    ``aligned`` defaults to whether stdout is a terminal, as ``ls`` and ``gh`` decide.
    """
    lines = [header, *rows]
    if aligned is None:
        aligned = sys.stdout.isatty()
    if not aligned:
        return "\n".join("\t".join(line) for line in lines)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def quota_text(quota: Quota) -> str:
    return f"{quota.vcpus}/{quota.memory_mib}/{quota.vms}"


# -- the options -------------------------------------------------------------------------------


def _into_session(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None and param.name is not None:
        setattr(ctx.ensure_object(Session), param.name, value)
    return value


def _option(*decls: str, **attrs: Any) -> Callable[[F], F]:
    """A connection option: it fills the Session instead of reaching the command."""
    attrs.setdefault("show_envvar", True)
    return click.option(*decls, expose_value=False, callback=_into_session, **attrs)


_URL = _option(
    "--url",
    type=UrlType(),
    default=DEFAULT_URL,
    envvar="VM_TENANT_URL",
    show_default=True,
    help="Base URL of the vm-tenant server.",
)
_OUTPUT = _option(
    "-o",
    "--output",
    type=click.Choice(["text", "json"]),
    default="text",
    envvar="VM_TENANT_OUTPUT",
    show_default=True,
    help="text: for people; json: exactly one JSON document on stdout (the API's answer).",
)
_TIMEOUT = _option(
    "--timeout",
    type=click.FloatRange(0, 3600, min_open=True),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the server's answer; past it, exit 3 (outcome unknown).",
)
_CACERT = _option(
    "--cacert",
    metavar="FILE",
    envvar="VM_TENANT_CACERT",
    help="CA certificates (PEM) to verify an https:// server with (default: the system's).",
)
_ADMIN_TOKEN = _option(
    "--admin-token",
    metavar="TOKEN",
    envvar="VM_TENANT_ADMIN_TOKEN",
    help="The operator's bearer token (default: read from <data-dir>/admin.token).",
)
_DATA_DIR = _option(
    "--data-dir",
    metavar="DIR",
    default=DEFAULT_DATA_DIR,
    envvar="VM_TENANT_DATA_DIR",
    show_default=True,
    help="Where to find admin.token when no admin token is given.",
)
_TOKEN = _option(
    "--token",
    metavar="TOKEN",
    envvar="VM_TENANT_TOKEN",
    required=True,
    help="The tenant's bearer token.",
)


def _with_session(role: Role, options: list[Callable[[F], F]]) -> Callable[[F], F]:
    def decorate(command: F) -> F:
        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            session = click.get_current_context().ensure_object(Session)
            session.role = role
            return command(session, *args, **kwargs)

        decorated = cast(F, run)
        for option in options:
            decorated = option(decorated)
        return decorated

    return decorate


#: the options of a command that uses the admin token; its function gets the Session first
#: (apply it right above the function, below the command's own arguments and options)
admin_options = _with_session("admin", [_ADMIN_TOKEN, _DATA_DIR, _CACERT, _TIMEOUT, _OUTPUT, _URL])
#: the same for a command that uses a tenant token
tenant_options = _with_session("tenant", [_TOKEN, _CACERT, _TIMEOUT, _OUTPUT, _URL])
