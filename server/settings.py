"""Settings of ``vm-tenant serve``: one schema, four sources, one merged, validated result.

Precedence, lowest first: built-in defaults, the TOML file (``--config PATH`` or
``VM_TENANT_CONFIG``), ``VM_TENANT_*`` environment variables, command-line flags. Every
value from every source goes through the same msgspec schema (file values strictly, env
and flag values, which are strings, non-strictly), one key at a time, so that a start
reports every bad key at once rather than the first. Nothing here opens the data dir or
a socket: the whole configuration is judged before the service starts.

The schema names each setting once (:data:`OPTIONS`); its flag, env var and TOML key are
derived from that table, so ``serve`` and ``config show`` accept exactly the same flags.
There is no secret among the settings, and there must never be one: ``config show``
prints them all (the admin token stays in ``<data-dir>/admin.token``).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, get_args
from urllib.parse import urlsplit

import msgspec
import tomli_w

from actors.service import ServiceConfig
from server.serving.options import ServingOptions
from server.serving.proxies import parse_networks
from server.serving.tls import TlsError, server_context

CONFIG_ENV = "VM_TENANT_CONFIG"
#: ``metrics_bind`` values that mean "no metrics listener" (TOML has no null).
OFF = frozenset({"off", "none"})

Seconds = Annotated[float, msgspec.Meta(gt=0, le=86_400)]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class Limits(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Per-tenant admission limits: the ``[limits]`` table of the file."""

    #: requests per second per tenant; 0 turns the limit off
    rate: Annotated[float, msgspec.Meta(ge=0, le=1_000_000)] = 50.0
    burst: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 100
    #: spawns of one tenant waiting for the fleet at once; 0 turns the limit off
    max_inflight_spawns: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 32


class Serving(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Deadlines and ceilings of the HTTP listeners: the ``[serving]`` table of the file."""

    keep_alive_timeout: Seconds = 5.0
    head_timeout: Seconds = 10.0
    body_timeout: Seconds = 30.0
    send_timeout: Seconds = 30.0
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 4096
    max_connections_per_peer: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 256
    reserved_fds: Annotated[int, msgspec.Meta(ge=16, le=1_000_000)] = 128
    backlog: Annotated[int, msgspec.Meta(ge=1, le=65_535)] = 4096


class Settings(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The effective settings of ``vm-tenant serve``, validated and merged."""

    data_dir: Text = "./vm-tenant-data"
    #: ``file`` (the data dir) or ``postgresql://USER@HOST:PORT/DB`` (replicas share it)
    store: Text = "file"
    bind: Text = "127.0.0.1:8080"
    fleet: Text = "embedded"
    fleet_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    snapshot_interval: Seconds = 60.0
    checkpoint_interval: Seconds = 10.0
    #: HOST:PORT of the metrics listener, or None (``"off"`` in the file) for none
    metrics_bind: Text | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    #: lines below this level are not written (the start-up lines always are)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: idle tenant actors end after this many seconds
    passivate_after: Seconds = 300.0
    #: seconds between two sweeps that copy the fleet's VM states
    fleet_sync_interval: Seconds = 10.0
    #: HTTPS on ``bind``: the certificate (PEM chain) and its key, or None (``"off"``)
    tls_cert: Text | None = None
    tls_key: Text | None = None
    #: ``CIDR[,CIDR...]`` of the proxies whose X-Forwarded-For names the client
    trusted_proxies: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    limits: Limits = msgspec.field(default_factory=Limits)
    serving: Serving = msgspec.field(default_factory=Serving)

    def serving_options(self) -> ServingOptions:
        """The HTTP listeners' share of the settings (loading the TLS files, if any).

        Raises :class:`SettingsError` if they no longer load (they did when validated).
        """
        serving = self.serving
        tls = None
        if self.tls_cert is not None and self.tls_key is not None:
            try:
                tls = server_context(self.tls_cert, self.tls_key)
            except TlsError as error:
                raise SettingsError([f"tls_cert: {error}"]) from None
        return ServingOptions(
            keep_alive_timeout=serving.keep_alive_timeout,
            head_timeout=serving.head_timeout,
            body_timeout=serving.body_timeout,
            send_timeout=serving.send_timeout,
            # In-flight requests may wait for the fleet's deadline; let them finish.
            graceful_timeout=self.fleet_timeout * 2 + 5,
            max_connections=serving.max_connections,
            max_connections_per_peer=serving.max_connections_per_peer,
            reserved_fds=serving.reserved_fds,
            backlog=serving.backlog,
            tls=tls,
            trusted_proxies=parse_networks(self.trusted_proxies),
        )

    def service_config(self) -> ServiceConfig:
        """The core's share of the settings."""
        return ServiceConfig(
            data_dir=Path(self.data_dir),
            store=self.store,
            fleet=self.fleet,
            fleet_timeout=self.fleet_timeout,
            snapshot_interval=self.snapshot_interval,
            checkpoint_interval=self.checkpoint_interval,
            rate_limit=self.limits.rate,
            rate_burst=self.limits.burst,
            max_inflight_spawns=self.limits.max_inflight_spawns,
            passivate_after=self.passivate_after,
            fleet_sync_interval=self.fleet_sync_interval,
        )


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its dotted TOML key, its flag and env var, and its help line."""

    key: str
    flag: str
    env: str
    metavar: str
    help: str

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option("data_dir", "--data-dir", "VM_TENANT_DATA_DIR", "DIR", "data directory"),
    Option(
        "store", "--store", "VM_TENANT_STORE", "file|URL",
        "where the state lives: the data dir, or a postgresql:// database replicas share",
    ),
    Option("bind", "--bind", "VM_TENANT_BIND", "HOST:PORT", "where the API listens"),
    Option("fleet", "--fleet", "VM_TENANT_FLEET", "embedded|URL", "the fleet controller"),
    Option(
        "fleet_timeout", "--fleet-timeout", "VM_TENANT_FLEET_TIMEOUT", "SECONDS",
        "deadline of one fleet call",
    ),
    Option(
        "snapshot_interval", "--snapshot-interval", "VM_TENANT_SNAPSHOT_INTERVAL", "SECONDS",
        "seconds between snapshots",
    ),
    Option(
        "checkpoint_interval", "--checkpoint-interval", "VM_TENANT_CHECKPOINT_INTERVAL",
        "SECONDS", "seconds between signed audit checkpoints",
    ),
    Option(
        "metrics_bind", "--metrics-bind", "VM_TENANT_METRICS_BIND", "HOST:PORT|off",
        "where the metrics listener listens",
    ),
    Option(
        "log_format", "--log-format", "VM_TENANT_LOG_FORMAT", "auto|json|console",
        "log line format (auto: console on a TTY, else JSON)",
    ),
    Option(
        "log_level", "--log-level", "VM_TENANT_LOG_LEVEL", "debug|info|warning|error",
        "lowest level of the lines logged (debug adds health probes)",
    ),
    Option(
        "passivate_after", "--passivate-after", "VM_TENANT_PASSIVATE_AFTER", "SECONDS",
        "idle tenant actors end after this",
    ),
    Option(
        "fleet_sync_interval", "--fleet-sync-interval", "VM_TENANT_FLEET_SYNC_INTERVAL",
        "SECONDS", "how often VM states are read from the fleet",
    ),
    Option(
        "tls_cert", "--tls-cert", "VM_TENANT_TLS_CERT", "FILE",
        "HTTPS: the certificate chain (PEM), with --tls-key",
    ),
    Option("tls_key", "--tls-key", "VM_TENANT_TLS_KEY", "FILE", "HTTPS: the private key (PEM)"),
    Option(
        "trusted_proxies", "--trusted-proxies", "VM_TENANT_TRUSTED_PROXIES", "CIDR[,CIDR...]",
        "peers whose X-Forwarded-For names the client",
    ),
    Option(
        "limits.rate", "--rate-limit", "VM_TENANT_RATE_LIMIT", "RPS",
        "per-tenant requests per second (0 = off)",
    ),
    Option("limits.burst", "--rate-burst", "VM_TENANT_RATE_BURST", "N", "rate limit burst"),
    Option(
        "limits.max_inflight_spawns", "--max-inflight-spawns", "VM_TENANT_MAX_INFLIGHT_SPAWNS",
        "N", "per-tenant spawns in flight (0 = off)",
    ),
    Option(
        "serving.keep_alive_timeout", "--keep-alive-timeout", "VM_TENANT_KEEP_ALIVE_TIMEOUT",
        "SECONDS", "an idle connection closes after this",
    ),
    Option(
        "serving.head_timeout", "--head-timeout", "VM_TENANT_HEAD_TIMEOUT", "SECONDS",
        "a request head must arrive within this of its first byte",
    ),
    Option(
        "serving.body_timeout", "--body-timeout", "VM_TENANT_BODY_TIMEOUT", "SECONDS",
        "a request body must arrive within this of its head",
    ),
    Option(
        "serving.send_timeout", "--send-timeout", "VM_TENANT_SEND_TIMEOUT", "SECONDS",
        "a response write that takes longer ends its connection",
    ),
    Option(
        "serving.max_connections", "--max-connections", "VM_TENANT_MAX_CONNECTIONS", "N",
        "connections at once (lowered to what descriptors allow)",
    ),
    Option(
        "serving.max_connections_per_peer", "--max-connections-per-peer",
        "VM_TENANT_MAX_CONNECTIONS_PER_PEER", "N", "connections at once from one address",
    ),
    Option(
        "serving.reserved_fds", "--reserved-fds", "VM_TENANT_RESERVED_FDS", "N",
        "descriptors kept from connections for the journal",
    ),
    Option("serving.backlog", "--backlog", "VM_TENANT_BACKLOG", "N", "listen backlog"),
)  # fmt: skip
BY_KEY = {option.key: option for option in OPTIONS}
TABLES: dict[str, type[msgspec.Struct]] = {"limits": Limits, "serving": Serving}


def _field_types() -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (type, default), read off the schema itself."""
    found: dict[str, tuple[Any, Any]] = {}
    for field in msgspec.structs.fields(Settings):
        if field.name in TABLES:
            for sub in msgspec.structs.fields(TABLES[field.name]):
                found[f"{field.name}.{sub.name}"] = (sub.type, sub.default)
        else:
            found[field.name] = (field.type, field.default)
    return found


FIELDS = _field_types()
assert set(FIELDS) == set(BY_KEY), "every setting needs exactly one Option"


class Resolved(NamedTuple):
    """The merged settings and, per dotted key, where its value came from."""

    settings: Settings
    sources: dict[str, str]


class SettingsError(Exception):
    """The settings are not usable; one line per problem, all of them."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        self.problems = problems

    def __str__(self) -> str:
        count = len(self.problems)
        head = f"vm-tenant: invalid settings ({count} problem{'s' if count > 1 else ''}):"
        return "\n  ".join([head, *self.problems])


# -- reading the sources ----------------------------------------------------------------------


def _convert(key: str, value: Any, *, strict: bool) -> tuple[Any, str | None]:
    """Convert one value with the schema's type for ``key``: (value, problem)."""
    try:
        return msgspec.convert(value, FIELDS[key][0], strict=strict), None
    except msgspec.ValidationError as error:
        text = str(error)
        if text.startswith("Invalid enum value"):
            choices = ", ".join(get_args(FIELDS[key][0]))
            return None, f"expected one of {choices}, got {value!r}"
        text = text[:1].lower() + text[1:]
        shown = f"{value!r}"[:80]
        if not strict:
            # env and flag values are always strings: name the text, not its type
            text = text.replace(", got `str`", "")
        return None, f"{text} ({shown})" if ", got " in text else f"{text}, got {shown}"


def _unknown(key: str, prefix: str) -> str:
    """The problem line for an unknown key, with a close known key if there is one."""
    full = f"{prefix}{key}"
    candidates = [k for k in (*FIELDS, *TABLES) if k.startswith(prefix)]
    near = difflib.get_close_matches(full, candidates, n=1, cutoff=0.6)
    if not near:
        # a table's key written at top level (``rate = 5``) or the reverse
        leaves = {k.rpartition(".")[2]: k for k in FIELDS}
        near = [leaves[m] for m in difflib.get_close_matches(key, leaves, n=1, cutoff=0.75)]
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"{full}: unknown key{hint}"


def _read_file(path: str) -> tuple[dict[str, Any], list[str]]:
    """The file's settings as dotted keys, and its problems."""
    origin = f"file {path}"
    try:
        text = Path(path).read_bytes().decode("utf-8")
        document = tomllib.loads(text)
    except OSError as error:
        return {}, [f"{origin}: cannot read the config file: {error.strerror or error}"]
    except UnicodeDecodeError:
        return {}, [f"{origin}: the config file is not UTF-8 text"]
    except tomllib.TOMLDecodeError as error:
        return {}, [f"{origin}: TOML syntax error: {error}"]
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in document.items():
        if key in TABLES:
            if not isinstance(value, dict):
                problems.append(f"{origin}: {key}: expected a table ([{key}]), got {value!r}")
                continue
            entries = [(f"{key}.{sub}", sub_value) for sub, sub_value in value.items()]
        else:
            entries = [(key, value)]
        for dotted, item in entries:
            if dotted not in FIELDS:
                table, _, leaf = dotted.rpartition(".")
                problems.append(f"{origin}: {_unknown(leaf, table + '.' if table else '')}")
                continue
            converted, problem = _convert(dotted, item, strict=True)
            if problem:
                problems.append(f"{origin}: {dotted}: {problem}")
            else:
                values[dotted] = converted
    return values, problems


def _host_port_problem(text: str) -> str | None:
    match = re.fullmatch(
        r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?))"
        r":(?P<port>[0-9]{1,5})",
        text,
    )
    if not match:
        return f"expected HOST:PORT (e.g. 127.0.0.1:8080 or [::1]:8080), got {text!r}"
    if match["v6"]:
        try:
            ipaddress.IPv6Address(match["v6"])
        except ValueError:
            return f"{match['v6']!r} is not an IPv6 address"
    if int(match["port"]) > 65535:
        return f"port must be 0..65535, got {match['port']}"
    return None


def _check(values: dict[str, Any]) -> dict[str, str]:
    """What the types cannot say, per key: addresses, the fleet, clashing listeners."""
    problems: dict[str, str] = {}
    if "bind" in values and (problem := _host_port_problem(values["bind"])):
        problems["bind"] = problem
    metrics = values.get("metrics_bind")
    if metrics is not None and metrics.lower() in OFF:
        values["metrics_bind"] = None
    elif metrics is not None:
        if problem := _host_port_problem(metrics):
            problems["metrics_bind"] = problem
        elif metrics == values.get("bind") and not metrics.endswith(":0"):
            problems["metrics_bind"] = f"must differ from bind ({metrics})"
    for name in ("tls_cert", "tls_key"):
        if values.get(name) is not None and values[name].lower() in OFF:
            values[name] = None
    cert, key = values.get("tls_cert"), values.get("tls_key")
    if (cert is None) != (key is None):
        missing = "tls_key" if key is None else "tls_cert"
        problems[missing] = "HTTPS needs both tls_cert and tls_key"
    elif cert is not None and key is not None:
        try:
            server_context(cert, key)
        except TlsError as error:
            problems["tls_cert"] = str(error)
    try:
        parse_networks(values.get("trusted_proxies", ""))
    except ValueError as error:
        problems["trusted_proxies"] = str(error)
    store = values.get("store")
    if store is not None and (problem := _store_problem(store)):
        problems["store"] = problem
    fleet = values.get("fleet")
    if fleet is not None and fleet != "embedded":
        url = urlsplit(fleet)
        if url.scheme not in {"http", "https"} or not url.hostname:
            problems["fleet"] = f"expected 'embedded' or an http(s):// URL, got {fleet!r}"
    return problems


def _store_problem(store: str) -> str | None:
    """What is wrong with a ``store`` value, if anything.

    A password in the URL is refused: settings are no place for a secret (``config show``
    prints them all); PostgreSQL's own ``PGPASSWORD`` or ``~/.pgpass`` hold it instead.
    """
    if store == "file":
        return None
    url = urlsplit(store)
    if url.scheme not in {"postgresql", "postgres"} or not url.hostname:
        return f"expected 'file' or a postgresql://USER@HOST:PORT/DB URL, got {store!r}"
    if url.password is not None:
        return "no password in the URL: give it in PGPASSWORD or ~/.pgpass"
    return None


def resolve(
    flags: Mapping[str, str], environ: Mapping[str, str], config: str | None = None
) -> Resolved:
    """Merge defaults < ``config`` file < env < ``flags`` (dotted key -> flag text).

    ``config`` falls back to ``VM_TENANT_CONFIG``. An empty env var counts as unset, as
    it always has for ``VM_TENANT_DATA_DIR``, ``VM_TENANT_BIND`` and ``VM_TENANT_FLEET``.
    Raises :class:`SettingsError` listing every problem found.
    """
    values = {key: default for key, (_, default) in FIELDS.items()}
    sources = dict.fromkeys(FIELDS, "default")
    problems: list[str] = []

    def take(key: str, value: Any, source: str, *, strict: bool) -> None:
        converted, problem = _convert(key, value, strict=strict)
        if problem:
            problems.append(f"{source}: {key}: {problem}")
        else:
            values[key], sources[key] = converted, source

    path = config or environ.get(CONFIG_ENV) or None
    if path is not None:
        from_file, file_problems = _read_file(path)
        problems.extend(file_problems)
        values.update(from_file)
        sources.update(dict.fromkeys(from_file, f"file {path}"))
    for option in OPTIONS:
        if text := environ.get(option.env):
            take(option.key, text, f"env {option.env}", strict=False)
    for key, text in flags.items():
        take(key, text, f"flag {BY_KEY[key].flag}", strict=False)
    for key, problem in _check(values).items():
        problems.append(f"{sources[key]}: {key}: {problem}")
    if problems:
        raise SettingsError(problems)
    nested: dict[str, Any] = {table: {} for table in TABLES}
    for key, value in values.items():
        table, _, leaf = key.rpartition(".")
        (nested[table] if table else nested)[leaf] = value
    return Resolved(msgspec.convert(nested, Settings), sources)


def typo_warnings(environ: Mapping[str, str]) -> list[str]:
    """``VM_TENANT_*`` variables that look like a misspelt setting (they are ignored)."""
    known = {option.env for option in OPTIONS} | {CONFIG_ENV}
    warnings: list[str] = []
    for name in sorted(environ):
        if name.startswith("VM_TENANT_") and name not in known:
            near = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
            if near:
                warnings.append(f"ignoring {name} (did you mean {near[0]}?)")
    return warnings


# -- the command line -------------------------------------------------------------------------


def from_args(args: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Resolved:
    """Resolve the settings named by the command line: flag dest -> text, None when absent.

    ``args`` holds one entry per flag of :data:`OPTIONS` (by :attr:`Option.dest`) and
    ``config``; the command line builds its flags from that table.
    """
    flags = {o.key: args[o.dest] for o in OPTIONS if args.get(o.dest) is not None}
    return resolve(flags, os.environ if environ is None else environ, args.get("config"))


def to_toml(resolved: Resolved) -> str:
    """The settings as a TOML file, each value followed by a comment naming its source."""
    lines = ["# effective settings of `vm-tenant serve`; after each value: where it came from"]
    settings = msgspec.to_builtins(resolved.settings)
    for table in (None, *TABLES):
        section = settings if table is None else settings[table]
        if table is not None:
            lines += ["", f"[{table}]"]
        for leaf, value in section.items():
            if table is None and leaf in TABLES:
                continue
            key = leaf if table is None else f"{table}.{leaf}"
            shown = "off" if value is None else value
            line = tomli_w.dumps({leaf: shown}).rstrip("\n")
            lines.append(f"{line}  # {resolved.sources[key]}")
    return "\n".join(lines) + "\n"
