"""Checking a log from outside: ``vm-tenant witness`` and ``vm-tenant audit check``.

Both run the procedures of :mod:`server.witness` over the typed client with any token
the log accepts (a tenant's, or the operator's for the witness), and trust nothing the
server says that a signature or a proof does not back. Exit codes, as the other client
commands have them:

- 0: consistent (``witness --once``), verified (``audit check``), or a witness loop that
  was stopped by SIGINT/SIGTERM;
- 1: the log is inconsistent (``inconsistent: <what>`` on stderr; the state file is left
  as it was; a checkpoint ``--log-key`` does not verify is one, whatever the state file
  holds), or it refused a request it should serve (a 4xx: a bad token);
- 2: a usage error, an unusable ``--log-key``/``--cosign-key``, or a state file that does
  not hold a checkpoint of this log (checked once the log's own checkpoint verified);
- 3: the log could not be reached or answered 5xx (``witness --once``, ``audit check``;
  the witness loop says so on stderr and tries again at its next round).

``vm-tenant audit witness-key NAME --out FILE`` makes a witness's own cosigning key
(c2sp.org/tlog-cosignature): with ``--cosign-key FILE`` the checkpoint the witness keeps
carries its cosignature, which anyone holding the printed verifier key can check.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import click

from actors.fsutil import create_private
from actors.journal.note import COSIGNATURE_V1, NoteError, Signer, Verifier
from server.cli.shared import (
    CONTEXT,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Session,
    example,
    note,
    tenant_options,
)
from server.witness import (
    BadState,
    Consistent,
    Inconsistent,
    Refused,
    Unavailable,
    WitnessError,
    audit_check,
    client_getter,
    witness_round,
)

EXIT_INCONSISTENT = 1


def _read_key(value: str, what: str) -> str:
    """A key given inline or as ``@FILE`` (surrounding whitespace ignored)."""
    if not value.startswith("@"):
        return value.strip()
    try:
        return Path(value[1:]).read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise click.BadParameter(f"cannot read {value[1:]}: {reason}", param_hint=what) from None


class LogKey(click.ParamType[Verifier]):
    """The log's verifier key (``GET /v1/audit/key``), inline or ``@FILE``."""

    name = "VKEY|@FILE"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Verifier:
        if isinstance(value, Verifier):
            return value
        try:
            return Verifier.parse(_read_key(str(value), "--log-key"))
        except NoteError as error:
            self.fail(f"not a verifier key: {error}", param, ctx)


class CosignKey(click.ParamType[Signer]):
    """A witness's private cosigning key (``PRIVATE+KEY+...``, type 0x04) in a file."""

    name = "FILE"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Signer:
        if isinstance(value, Signer):
            return value
        try:
            signer = Signer.parse(_read_key(f"@{value}", "--cosign-key"))
        except NoteError as error:
            self.fail(f"not a signer key: {error}", param, ctx)
        if signer.verifier.key_type != COSIGNATURE_V1:
            self.fail("not a cosigning key (vm-tenant audit witness-key makes one)", param, ctx)
        return signer


def _fail(error: WitnessError) -> int:
    """Say what went wrong on stderr; the exit code of its kind."""
    if isinstance(error, Inconsistent):
        click.echo(f"inconsistent: {error}", err=True)
        return EXIT_INCONSISTENT
    note(f"vm-tenant: {error}")
    if isinstance(error, Refused):
        return EXIT_REFUSED
    if isinstance(error, BadState):
        return EXIT_USAGE
    return EXIT_UNAVAILABLE


def _emit(session: Session, done: Consistent) -> None:
    if session.json:
        root = done.line().rpartition(" ")[2]
        click.echo(json.dumps({"consistent": True, "size": done.checkpoint.size, "root": root}))
    else:
        click.echo(done.line())
    sys.stdout.flush()


@click.command(
    context_settings=CONTEXT,
    epilog=example(
        "vm-tenant witness --token $TOKEN --log-key @log.vkey --state witness.state --once",
        "vm-tenant witness --url https://vm.example --log-key @log.vkey --state w.state \\",
        "    --interval 60 --cosign-key witness.key",
    ),
)
@click.option("--log-key", type=LogKey(), required=True, help="The log's verifier key, or @FILE.")
@click.option(
    "--state",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where the last consistent checkpoint is kept (replaced atomically).",
)
@click.option("--once", is_flag=True, help="One round, then exit (0 consistent, 1 not).")
@click.option(
    "--interval",
    type=click.FloatRange(0.1, 86400),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between rounds, until SIGINT/SIGTERM.",
)
@click.option(
    "--cosign-key",
    type=CosignKey(),
    help="The witness's own cosigning key (vm-tenant audit witness-key): cosign what it keeps.",
)
@tenant_options
def witness(
    session: Session,
    log_key: Verifier,
    state: Path,
    once: bool,
    interval: float,
    cosign_key: Signer | None,
) -> None:
    """Watch a log: every checkpoint must be signed by its key and extend the last one seen.

    Prints "consistent <size> <base64 root>" after each consistent round. A bad
    signature, a smaller tree, another root at the same size or a failing consistency
    proof prints "inconsistent: <what>" on stderr, leaves the state file as it was, and
    exits 1, also in loop mode.
    """
    get = client_getter(session.client())
    ctx = click.get_current_context()
    if once:
        try:
            _emit(session, witness_round(get, log_key, state, cosigner=cosign_key))
        except WitnessError as error:
            ctx.exit(_fail(error))
        return
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.is_set():
            try:
                _emit(session, witness_round(get, log_key, state, cosigner=cosign_key))
            except Unavailable as error:
                note(f"vm-tenant: {error} (trying again in {interval:g} s)")
            except WitnessError as error:
                ctx.exit(_fail(error))
            stop.wait(interval)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@click.command(
    context_settings=CONTEXT,
    epilog=example("vm-tenant audit check --token $TOKEN --log-key @log.vkey"),
)
@click.option("--log-key", type=LogKey(), required=True, help="The log's verifier key, or @FILE.")
@tenant_options
def check(session: Session, log_key: Verifier) -> None:
    """Verify your own audit trail: every entry's hash, and its inclusion in the signed tree.

    Reads the whole trail, then the checkpoint, then an inclusion proof for every entry;
    prints "verified <n> entries in tree <size>", or names the first entry that fails
    ("inconsistent: entry <seq>: ...") and exits 1.
    """
    try:
        verified = audit_check(client_getter(session.client()), log_key)
    except WitnessError as error:
        click.get_current_context().exit(_fail(error))
    if session.json:
        click.echo(json.dumps({"verified": verified.entries, "tree_size": verified.tree_size}))
    else:
        click.echo(verified.line())


@click.command(
    "witness-key",
    context_settings=CONTEXT,
    epilog=example("vm-tenant audit witness-key witness.example/w1 --out witness.key"),
)
@click.argument("name")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The file for the private key (created with mode 0600; never overwritten).",
)
def witness_key(name: str, out: Path) -> None:
    """Make a witness's cosigning key NAME: the private key goes to --out, the verifier key
    (to hand out) to stdout."""
    try:
        signer = Signer.generate(name, COSIGNATURE_V1)
    except NoteError as error:
        raise click.BadParameter(str(error), param_hint="NAME") from None
    try:
        created = create_private(out, f"{signer.private_key_string()}\n".encode())
    except OSError as error:
        raise click.FileError(str(out), error.strerror) from None
    if not created:
        raise click.FileError(str(out), "it exists already (a key is never overwritten)")
    click.echo(str(signer.verifier))
