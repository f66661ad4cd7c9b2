"""The ``vm-tenant`` command: ``serve``, the operator's client commands, ``audit verify``."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from actors.errors import StartupError
from actors.journal.verify import verify_data_dir
from actors.service import ServiceConfig, open_service
from server import settings
from server.app import create_app
from server.auth import Authority, admin_token_path
from server.keyring import KeyringError
from server.logs import configure_logging, direct_request_logger
from server.metrics_http import metrics_app

log = logging.getLogger("vm_tenant")

DEFAULT_DATA_DIR = "./vm-tenant-data"
DEFAULT_URL = "http://127.0.0.1:8080"


# -- serve ---------------------------------------------------------------------------------


def _announce(line: str) -> None:
    # Plain text, not a log event: scripts and tests wait for these exact lines.
    print(line, file=sys.stderr, flush=True)


async def _listen(
    nursery: trio.Nursery, app: Any, hconfig: HypercornConfig, stop: trio.Event
) -> list[str]:
    """Start one Hypercorn server in ``nursery``; a bind that fails is a StartupError."""
    try:
        return await nursery.start(
            partial(hypercorn_serve, app, hconfig, shutdown_trigger=stop.wait)
        )
    except (OSError, ExceptionGroup) as error:
        reason = _only(error, OSError)
        if reason is None:
            raise
        raise StartupError(f"cannot listen on {' '.join(hconfig.bind)}: {reason}") from None


def _only(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The one error of ``kind`` behind nested single-error groups, if that is all."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error if isinstance(error, kind) else None


async def serve(
    config: ServiceConfig, bind: str, metrics_bind: str | None = None, log_format: str = "auto"
) -> None:
    """Run the proxy until SIGINT/SIGTERM, then shut down in order."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        authority = _authority(config.data_dir)
        async with open_service(config) as service:
            app = create_app(service, authority, direct_request_logger(log_format))
            # What is alive now (modules, the recovered state) lives as long as the
            # process: keep it out of every later full collection, which would scan it
            # all while the event loop stands still.
            gc.collect()
            gc.freeze()
            hconfig = HypercornConfig()
            hconfig.bind = [bind]
            hconfig.accesslog = None
            hconfig.errorlog = logging.getLogger("vm_tenant.hypercorn")
            # The "listening" line below is ours; keep Hypercorn to warnings and errors.
            hconfig.errorlog.setLevel(logging.WARNING)
            # In-flight requests may wait for the fleet's deadline; let them finish.
            hconfig.graceful_timeout = config.fleet_timeout * 2 + 5
            stop = trio.Event()

            async def watch_signals() -> None:
                async for signum in signals:
                    log.info("received %s; draining", signal.Signals(signum).name)
                    stop.set()
                    return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_signals)
                if metrics_bind:
                    # Started first, so that its line is out before the "listening" one.
                    mconfig = HypercornConfig()
                    mconfig.bind = [metrics_bind]
                    mconfig.accesslog = None
                    mconfig.errorlog = hconfig.errorlog
                    mconfig.graceful_timeout = 5
                    metrics = metrics_app(service.metrics.registry)
                    mbinds = await _listen(nursery, metrics, mconfig, stop)
                    _announce(f"vm-tenant metrics on {mbinds[0]}/metrics")
                binds = await _listen(nursery, app, hconfig, stop)
                _announce(f"vm-tenant listening on {' '.join(binds)}")
                await stop.wait()
            log.info("HTTP drained; stopping actors")


def _authority(data_dir: Path) -> Authority:
    """The data dir's keyring and admin token; an unusable keyring stops the start."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        return Authority.for_data_dir(data_dir)
    except KeyringError as error:
        raise StartupError(f"cannot start on {data_dir}: {error}") from None


def _settings(args: argparse.Namespace) -> settings.Resolved | None:
    """The validated settings, or None after printing every problem with them."""
    for warning in settings.typo_warnings(os.environ):
        log.warning("%s", warning)
    try:
        return settings.from_args(args)
    except settings.SettingsError as error:
        print(error, file=sys.stderr)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    resolved = _settings(args)
    if resolved is None:
        return 2
    chosen = resolved.settings
    configure_logging(chosen.log_format)
    config = chosen.service_config()
    try:
        trio.run(serve, config, chosen.bind, chosen.metrics_bind, chosen.log_format)
    except (StartupError, ExceptionGroup) as error:
        # A StartupError raised while listening comes out of the server's nursery.
        startup = _only(error, StartupError)
        if startup is None:
            raise
        log.error("%s", startup)
        return 1
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    resolved = _settings(args)
    if resolved is None:
        return 2
    print(settings.to_toml(resolved), end="")
    return 0


# -- operator client commands -------------------------------------------------------------


def _admin_token(args: argparse.Namespace) -> str:
    token = args.admin_token or os.environ.get("VM_TENANT_ADMIN_TOKEN")
    if token:
        return token
    path = admin_token_path(Path(args.data_dir))
    try:
        return path.read_text().strip()
    except OSError as error:
        where = f"--admin-token, VM_TENANT_ADMIN_TOKEN or {path}"
        raise SystemExit(f"vm-tenant: no admin token ({where}): {error.strerror}") from None


def _request(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    headers = {"Authorization": f"Bearer {_admin_token(args)}"}
    try:
        response = httpx.request(
            method, args.url.rstrip("/") + path, json=body, headers=headers, timeout=30
        )
    except httpx.HTTPError as error:
        raise SystemExit(f"vm-tenant: cannot reach {args.url}: {error}") from None
    if response.status_code >= 400:
        try:
            problem = response.json()
            text = f"{problem['code']}: {problem['detail']}"
        except (ValueError, KeyError, TypeError):
            text = response.text
        raise SystemExit(f"vm-tenant: {response.status_code} {text}")
    return response.json() if response.content else None


def _expiry_note(result: dict[str, Any]) -> str:
    return f", expires {result['expires_at']}" if result.get("expires_at") else ""


def cmd_tenant_create(args: argparse.Namespace) -> int:
    quota = {"vcpus": args.vcpus, "memory_mib": args.memory_mib, "vms": args.vms}
    body: dict[str, Any] = {"id": args.id, "quota": quota}
    if args.ttl is not None:
        body["token_ttl_seconds"] = args.ttl
    result = _request(args, "POST", "/v1/admin/tenants", body)
    note = _expiry_note(result)
    print(f"created tenant {result['id']} (token id {result['token_id']}{note})", file=sys.stderr)
    print(result["token"])
    return 0


def cmd_tenant_list(args: argparse.Namespace) -> int:
    """Every tenant, following ``next`` page by page."""
    print("ID\tQUOTA vcpus/memory_mib/vms\tALLOCATED vcpus/memory_mib/vms")
    cursor: str | None = None
    while True:
        query = f"?limit={args.limit}" + (f"&cursor={quote(cursor)}" if cursor else "")
        page = _request(args, "GET", "/v1/admin/tenants" + query)
        for tenant in page["tenants"]:
            q, a = tenant["quota"], tenant["allocated"]
            quota = f"{q['vcpus']}/{q['memory_mib']}/{q['vms']}"
            print(f"{tenant['id']}\t{quota}\t{a['vcpus']}/{a['memory_mib']}/{a['vms']}")
        cursor = page["next"]
        if cursor is None:
            return 0


def cmd_token_issue(args: argparse.Namespace) -> int:
    body = {"ttl_seconds": args.ttl} if args.ttl is not None else None
    result = _request(args, "POST", f"/v1/admin/tenants/{args.id}/tokens", body)
    print(f"issued token id {result['token_id']}{_expiry_note(result)}", file=sys.stderr)
    print(result["token"])
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    _request(args, "DELETE", f"/v1/admin/tenants/{args.id}/tokens/{args.token_id}")
    print(f"revoked token {args.token_id} of tenant {args.id}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    print("ID\tCREATED\tSTATE")
    for key in _request(args, "GET", "/v1/admin/keys")["keys"]:
        state = "signing" if key["signing"] else key["state"]
        if key.get("retired_at"):
            state += f" (retired {key['retired_at']})"
        print(f"{key['id']}\t{key['created_at']}\t{state}")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    key = _request(args, "POST", "/v1/admin/keys")
    print(f"signing key {key['id']} added; it signs from now on", file=sys.stderr)
    print(key["id"])
    return 0


def cmd_keys_retire(args: argparse.Namespace) -> int:
    _request(args, "DELETE", f"/v1/admin/keys/{quote(args.key_id, safe='')}")
    print(f"retired signing key {args.key_id}")
    return 0


# -- audit verify --------------------------------------------------------------------------


def _expect_head(text: str) -> tuple[int, str]:
    match = re.fullmatch(r"(\d+):([0-9a-f]{64})", text)
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError("expected SEQ:HASH (a seq >= 1 and 64 lowercase hex)")
    return int(match.group(1)), match.group(2)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    if not (data_dir / "audit").is_dir():
        print(f"vm-tenant: {data_dir} holds no audit log", file=sys.stderr)
        return 1
    try:
        report = verify_data_dir(
            data_dir,
            expect_head=args.expect_head,
            public_key=Path(args.public_key) if args.public_key else None,
        )
    except (OSError, ValueError) as error:
        print(f"vm-tenant: cannot verify: {error}", file=sys.stderr)
        return 1
    head = f"head {report.head_seq}:{report.head_hash}"
    if report.verdict == "ok":
        print(f"intact: {report.entries} entries, {head}")
        return 0
    if report.verdict == "torn":
        intact = f"{report.entries} entries intact, {head}"
        print(f"torn at seq {report.bad_seq} ({report.reason}); {intact}")
        return 0
    verified = f"{report.entries} entries verified before it"
    print(f"{report.verdict} at seq {report.bad_seq}: {report.reason} ({verified})")
    return 1


# -- argument parsing ----------------------------------------------------------------------


def _ttl(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 2**31 - 1:
        raise argparse.ArgumentTypeError(f"expected whole seconds in 1..2^31-1, not {text!r}")
    return int(text)


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vm-tenant", description="tenant proxy of a VM pool")
    commands = parser.add_subparsers(dest="command", required=True)

    data_dir = argparse.ArgumentParser(add_help=False)
    data_dir.add_argument("--data-dir", default=_env("VM_TENANT_DATA_DIR", DEFAULT_DATA_DIR))

    client = argparse.ArgumentParser(add_help=False, parents=[data_dir])
    client.add_argument("--url", default=_env("VM_TENANT_URL", DEFAULT_URL))
    client.add_argument("--admin-token", default=None)

    setting_flags = settings.flag_parser()
    serve_p = commands.add_parser("serve", parents=[setting_flags], help="run the proxy")
    serve_p.set_defaults(func=cmd_serve)
    config_p = commands.add_parser("config", help="settings tools").add_subparsers(
        dest="action", required=True
    )
    show = config_p.add_parser(
        "show", parents=[setting_flags], help="print the effective settings of serve as TOML"
    )
    show.set_defaults(func=cmd_config_show)

    tenant = commands.add_parser("tenant", help="provision tenants").add_subparsers(
        dest="action", required=True
    )
    create = tenant.add_parser("create", parents=[client], help="provision a tenant")
    create.add_argument("id")
    create.add_argument("--vcpus", type=int, required=True)
    create.add_argument("--memory-mib", type=int, required=True)
    create.add_argument("--vms", type=int, required=True)
    create.add_argument("--ttl", type=_ttl, default=None, help="first token's lifetime (s)")
    create.set_defaults(func=cmd_tenant_create)
    listing = tenant.add_parser("list", parents=[client], help="list every tenant")
    listing.add_argument("--limit", type=int, default=100, help="page size (1..1000)")
    listing.set_defaults(func=cmd_tenant_list)

    token = commands.add_parser("token", help="issue and revoke tokens").add_subparsers(
        dest="action", required=True
    )
    issue = token.add_parser("issue", parents=[client], help="issue a token")
    issue.add_argument("id")
    issue.add_argument("--ttl", type=_ttl, default=None, help="lifetime in seconds")
    issue.set_defaults(func=cmd_token_issue)
    revoke = token.add_parser("revoke", parents=[client], help="revoke a token")
    revoke.add_argument("id")
    revoke.add_argument("token_id")
    revoke.set_defaults(func=cmd_token_revoke)

    keys = commands.add_parser("keys", help="rotate the token signing keys").add_subparsers(
        dest="action", required=True
    )
    keys.add_parser("list", parents=[client], help="list the keys").set_defaults(func=cmd_keys_list)
    keys.add_parser("rotate", parents=[client], help="add a signing key").set_defaults(
        func=cmd_keys_rotate
    )
    retire = keys.add_parser("retire", parents=[client], help="retire a key")
    retire.add_argument("key_id")
    retire.set_defaults(func=cmd_keys_retire)

    audit = commands.add_parser("audit", help="audit log tools").add_subparsers(
        dest="action", required=True
    )
    verify = audit.add_parser("verify", parents=[data_dir], help="verify the audit chain")
    verify.add_argument("--expect-head", type=_expect_head, default=None, metavar="SEQ:HASH")
    verify.add_argument("--public-key", default=None, help="checkpoint public key (PEM)")
    verify.set_defaults(func=cmd_audit_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Client commands print their own results; httpx's per-request lines are noise there.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
