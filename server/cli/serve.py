"""``vm-tenant serve`` and ``vm-tenant config show``: run the proxy, show its settings.

Their flags are made from the settings table (:data:`server.settings.OPTIONS`), one per
setting, so a setting added there is a flag here without more code. The flags only
collect text: :mod:`server.settings` merges them with the TOML file, the ``VM_TENANT_*``
env and the defaults, and validates everything at once. That is why the env vars are
shown in ``--help`` but not read by click (the settings layer reads them, and says
where each value came from).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, TypeVar

import click
import trio
from prometheus_client import CollectorRegistry

from actors.errors import StartupError
from actors.service import Service, ServiceConfig, open_service
from server import serving, settings
from server.app import create_app
from server.auth import Authority
from server.cli.shared import CLIENT_ENV, CONTEXT, example
from server.keyring import KeyringError
from server.logs import announce, serving_log
from server.metrics_http import metrics_app
from server.serving import Endpoint, ListenError, ServingOptions
from server.startup import claim_data_dir, configure_serve

log = logging.getLogger("vm_tenant")
F = TypeVar("F", bound=Callable[..., Any])


# -- serve ---------------------------------------------------------------------------------


def _announce(line: str) -> None:
    # In the log format at every level: scripts and tests wait for this text.
    announce(line)


async def _listen(
    nursery: trio.Nursery,
    endpoints: list[Endpoint],
    options: ServingOptions,
    stop: trio.Event,
    registry: CollectorRegistry,
) -> list[str]:
    """Start serving ``endpoints`` in ``nursery``; a bind that fails is a StartupError."""
    try:
        urls: list[str] = await nursery.start(
            partial(
                serving.serve, endpoints, options, shutdown_trigger=stop.wait, registry=registry
            )
        )
        return urls
    except (OSError, ExceptionGroup) as error:
        reason = _only(error, OSError)
        if reason is None:
            raise
        where = reason.bind if isinstance(reason, ListenError) else endpoints[0].bind
        raise StartupError(f"cannot listen on {where}: {reason}") from None


def _only(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The one error of ``kind`` behind nested single-error groups, if that is all."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error if isinstance(error, kind) else None


async def serve(
    config: ServiceConfig,
    bind: str,
    metrics_bind: str | None = None,
    options: ServingOptions | None = None,
) -> None:
    """Run the proxy until SIGINT/SIGTERM, then shut down in order.

    The log pipeline is set up already (:func:`~server.startup.configure_serve`): the
    request log writes to its sink.
    """
    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        claim_data_dir(config.data_dir) as claimed,
    ):
        async with open_service(config) as service:
            request_log = serving_log(service.metrics.registry)
            app = create_app(service, _authority(service), request_log)
            # What is alive now (modules, the recovered state) lives as long as the
            # process: keep it out of every later full collection, which would scan it
            # all while the event loop stands still.
            gc.collect()
            gc.freeze()
            if options is None:
                # In-flight requests may wait for the fleet's deadline; let them finish.
                options = ServingOptions(graceful_timeout=config.fleet_timeout * 2 + 5)
            stop = trio.Event()

            async def watch_signals() -> None:
                async for signum in signals:
                    log.info("received %s; draining", signal.Signals(signum).name)
                    stop.set()
                    return

            endpoints = [Endpoint(app, bind)]
            if metrics_bind:
                metrics = metrics_app(service.metrics.registry)
                endpoints.append(Endpoint(metrics, metrics_bind, front=False))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_signals)
                registry = service.metrics.registry
                urls = await _listen(nursery, endpoints, options, stop, registry)
                claimed.started()
                if metrics_bind:
                    _announce(f"vm-tenant metrics on {urls[1]}/metrics")
                _announce(f"vm-tenant listening on {urls[0]}")
                await stop.wait()
            log.info("HTTP drained; stopping actors")


def _authority(service: Service) -> Authority:
    """The store's keyring and admin token; an unusable keyring stops the start."""
    try:
        return Authority.for_store(service.store)
    except KeyringError as error:
        raise StartupError(f"cannot start on {service.config.data_dir}: {error}") from None


def _server_environ() -> dict[str, str]:
    """The environment without the client commands' variables (not typos of settings)."""
    return {name: value for name, value in os.environ.items() if name not in CLIENT_ENV}


def _settings(args: Mapping[str, Any]) -> settings.Resolved | None:
    """The validated settings, or None after printing every problem with them."""
    environ = _server_environ()
    for warning in settings.typo_warnings(environ):
        log.warning("%s", warning)
    try:
        return settings.from_args(args)
    except settings.SettingsError as error:
        print(error, file=sys.stderr)
        return None


def cmd_serve(args: Mapping[str, Any]) -> int:
    resolved = configure_serve(args, _server_environ())
    if resolved is None:
        return 2
    chosen = resolved.settings
    config = chosen.service_config()
    try:
        options = chosen.serving_options()
    except settings.SettingsError as error:
        # the log is set up by now: this line too comes in the chosen format
        log.error("%s", error)
        return 2
    try:
        trio.run(serve, config, chosen.bind, chosen.metrics_bind, options)
    except (StartupError, ExceptionGroup) as error:
        # A StartupError raised while listening comes out of the server's nursery.
        startup = _only(error, StartupError)
        if startup is None:
            raise
        log.error("%s", startup)
        return 1
    return 0


def cmd_config_show(args: Mapping[str, Any]) -> int:
    resolved = _settings(args)
    if resolved is None:
        return 2
    print(settings.to_toml(resolved), end="")
    return 0


# -- the commands ------------------------------------------------------------------------------


class SettingOption(click.Option):
    """A settings flag: its env var is shown in ``--help``, but :mod:`server.settings` reads it.

    Click reading it too would make an env value look like a flag, and the settings
    layer could no longer say where a value came from, nor keep its precedence.
    """

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        return None


def setting_options(command: F) -> F:
    """``--config`` and one flag per setting of :data:`server.settings.OPTIONS`."""
    for option in reversed(settings.OPTIONS):
        default = settings.FIELDS[option.key][1]
        shown = "off" if default is None else default
        text = option.help[:1].upper() + option.help[1:]
        command = click.option(
            option.flag,
            option.dest,
            cls=SettingOption,
            metavar=option.metavar,
            envvar=option.env,
            show_envvar=True,
            help=f"{text} (TOML {option.key}; default {shown}).",
        )(command)
    return click.option(
        "--config",
        cls=SettingOption,
        metavar="PATH",
        envvar=settings.CONFIG_ENV,
        show_envvar=True,
        help="TOML settings file. Precedence: flag > VM_TENANT_* env > this file > default.",
    )(command)


@click.command(
    context_settings=CONTEXT,
    epilog=example(
        "vm-tenant serve",
        "vm-tenant serve --data-dir /var/lib/vm-tenant --bind 0.0.0.0:8080",
        "VM_TENANT_CONFIG=/etc/vm-tenant.toml vm-tenant serve",
    ),
)
@setting_options
def serve_command(**params: Any) -> None:
    """Run the proxy until SIGINT/SIGTERM, then drain and exit 0.

    It logs "vm-tenant listening on URL" once it accepts connections. Exit 2: bad
    settings (all of them are listed); exit 1: it could not start.
    """
    click.get_current_context().exit(cmd_serve(params))


@click.group(context_settings=CONTEXT)
def config() -> None:
    """Settings tools."""


@config.command(
    epilog=example(
        "vm-tenant config show",
        "vm-tenant config show --config /etc/vm-tenant.toml --bind 0.0.0.0:8080",
    ),
)
@setting_options
def show(**params: Any) -> None:
    """Print the settings serve would run with, as TOML, each with where it came from.

    The output is itself a valid config file; it never holds a secret.
    """
    click.get_current_context().exit(cmd_config_show(params))
