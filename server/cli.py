"""The ``vm-tenant`` command: ``serve``, the operator's client commands, ``audit verify``."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from actors.service import ServiceConfig, StartupError, open_service
from actors.verify import verify_data_dir
from server.app import create_app
from server.auth import Authority, admin_token_path

log = logging.getLogger("vm_tenant")

DEFAULT_DATA_DIR = "./vm-tenant-data"
DEFAULT_BIND = "127.0.0.1:8080"
DEFAULT_URL = "http://127.0.0.1:8080"


# -- serve ---------------------------------------------------------------------------------


async def serve(config: ServiceConfig, bind: str) -> None:
    """Run the proxy until SIGINT/SIGTERM, then shut down in order."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_service(config) as service:
            authority = Authority.for_data_dir(config.data_dir)
            app = create_app(service, authority)
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
                binds = await nursery.start(
                    partial(hypercorn_serve, app, hconfig, shutdown_trigger=stop.wait)
                )
                log.info("vm-tenant listening on %s", " ".join(binds))
                await stop.wait()
            log.info("HTTP drained; stopping actors")


def cmd_serve(args: argparse.Namespace) -> int:
    config = ServiceConfig(
        data_dir=Path(args.data_dir), fleet=args.fleet, fleet_timeout=args.fleet_timeout
    )
    config.passivate_after = args.passivate_after
    try:
        trio.run(serve, config, args.bind)
    except StartupError as error:
        log.error("%s", error)
        return 1
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


def cmd_tenant_create(args: argparse.Namespace) -> int:
    quota = {"vcpus": args.vcpus, "memory_mib": args.memory_mib, "vms": args.vms}
    result = _request(args, "POST", "/v1/admin/tenants", {"id": args.id, "quota": quota})
    print(f"created tenant {result['id']} (token id {result['token_id']})", file=sys.stderr)
    print(result["token"])
    return 0


def cmd_token_issue(args: argparse.Namespace) -> int:
    result = _request(args, "POST", f"/v1/admin/tenants/{args.id}/tokens")
    print(f"issued token id {result['token_id']}", file=sys.stderr)
    print(result["token"])
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    _request(args, "DELETE", f"/v1/admin/tenants/{args.id}/tokens/{args.token_id}")
    print(f"revoked token {args.token_id} of tenant {args.id}")
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


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds in (0, 3600], not {text!r}")
    return value


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

    serve_p = commands.add_parser("serve", parents=[data_dir], help="run the proxy")
    serve_p.add_argument("--bind", default=_env("VM_TENANT_BIND", DEFAULT_BIND))
    serve_p.add_argument("--fleet", default=_env("VM_TENANT_FLEET", "embedded"))
    serve_p.add_argument(
        "--fleet-timeout",
        type=_positive_seconds,
        default=_env("VM_TENANT_FLEET_TIMEOUT", "10"),
        help="deadline of one fleet call, in seconds (default 10)",
    )
    serve_p.add_argument(
        "--passivate-after",
        type=_positive_seconds,
        default=_env("VM_TENANT_PASSIVATE_AFTER", "300"),
        help="end a tenant's idle actor after this many seconds (default 300)",
    )
    serve_p.set_defaults(func=cmd_serve)

    tenant = commands.add_parser("tenant", help="provision tenants").add_subparsers(
        dest="action", required=True
    )
    create = tenant.add_parser("create", parents=[client], help="provision a tenant")
    create.add_argument("id")
    create.add_argument("--vcpus", type=int, required=True)
    create.add_argument("--memory-mib", type=int, required=True)
    create.add_argument("--vms", type=int, required=True)
    create.set_defaults(func=cmd_tenant_create)

    token = commands.add_parser("token", help="issue and revoke tokens").add_subparsers(
        dest="action", required=True
    )
    issue = token.add_parser("issue", parents=[client], help="issue a token")
    issue.add_argument("id")
    issue.set_defaults(func=cmd_token_issue)
    revoke = token.add_parser("revoke", parents=[client], help="revoke a token")
    revoke.add_argument("id")
    revoke.add_argument("token_id")
    revoke.set_defaults(func=cmd_token_revoke)

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
