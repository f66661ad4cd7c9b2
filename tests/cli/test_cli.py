"""The ``vm-tenant`` command itself, without a server: help, version, completion, usage errors.

In-process through click's ``CliRunner`` where that is enough; the entry point and shell
completion as real subprocesses of the installed ``vm-tenant`` script.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import vm_tenant
from server import settings
from server.cli.main import COMMANDS, cli, main
from server.cli.shared import CLIENT_ENV

#: a port nothing listens on (bound and closed again would race; port 1 is privileged)
NOWHERE = "http://127.0.0.1:1"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``VM_TENANT_*`` from the machine running the tests leaks into them."""
    for name in list(os.environ):
        if name.startswith("VM_TENANT_"):
            monkeypatch.delenv(name)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, prog_name="vm-tenant")


def every_command() -> Iterator[tuple[str, click.Command]]:
    """Every leaf command of the tree, with its full name (lazy groups loaded)."""

    def walk(prefix: str, command: click.Command) -> Iterator[tuple[str, click.Command]]:
        if isinstance(command, click.Group):
            with click.Context(command) as ctx:
                for name in command.list_commands(ctx):
                    sub = command.get_command(ctx, name)
                    assert sub is not None, f"{prefix} {name}"
                    yield from walk(f"{prefix} {name}".strip(), sub)
        else:
            yield prefix, command

    yield from walk("", cli)


# -- version, help, completion -----------------------------------------------------------------


def test_version_names_the_installed_package() -> None:
    expected = f"vm-tenant {version('service-vm-tenant')}\n"
    assert invoke("--version").stdout == expected
    installed = vm_tenant("--version")
    assert installed.returncode == 0
    assert installed.stdout == expected
    as_module = subprocess.run(
        [sys.executable, "-m", "server.cli", "--version"], capture_output=True, text=True
    )
    assert as_module.stdout == expected


def test_every_command_of_the_contract_exists() -> None:
    names = {name for name, _ in every_command()}
    assert names >= {
        "serve",
        "config show",
        "tenant create",
        "tenant get",
        "tenant update",
        "tenant delete",
        "tenant list",
        "token issue",
        "token revoke",
        "keys list",
        "keys rotate",
        "keys retire",
        "audit head",
        "audit list",
        "audit verify",
        "audit check",
        "witness",
        "vm spawn",
        "vm list",
        "vm get",
        "vm destroy",
        "usage",
    }
    assert set(COMMANDS) == {name.split()[0] for name in names}


@pytest.mark.parametrize("name", [name for name, _ in every_command()])
def test_help_describes_every_option_with_its_env_var_and_an_example(name: str) -> None:
    result = invoke(*name.split(), "--help")
    assert result.exit_code == 0, result.output
    command = dict(every_command())[name]
    assert command.help, f"{name} has no description"
    assert re.search(r"Examples:\n +\S*vm-tenant ", result.stdout), f"{name} shows no example"
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        assert param.help, f"{name} {param.opts[0]} has no description"
        assert param.opts[-1] in result.stdout
        if param.envvar:
            shown = " ".join(result.stdout.split())
            assert f"env var: {param.envvar}" in shown, f"{name} {param.opts[0]}: no env var"


def test_client_commands_take_the_connection_options_and_tokens_from_env() -> None:
    for name, command in every_command():
        options = {opt for param in command.params for opt in param.opts}
        envvars = {param.envvar for param in command.params if isinstance(param, click.Option)}
        if name.split()[0] in {"tenant", "token", "keys"} or name in {"audit head", "audit list"}:
            assert {"--url", "-o", "--admin-token", "--data-dir"} <= options, name
            assert "VM_TENANT_ADMIN_TOKEN" in envvars
        if name.split()[0] in {"vm", "usage", "witness"} or name == "audit check":
            assert {"--url", "-o", "--token"} <= options, name
            assert "VM_TENANT_TOKEN" in envvars


def test_serve_flags_are_made_from_the_settings_table() -> None:
    for name in ("serve", "config show"):
        command = dict(every_command())[name]
        by_flag = {param.opts[0]: param for param in command.params}
        for option in settings.OPTIONS:
            assert option.flag in by_flag, f"{name} lacks {option.flag}"
            assert by_flag[option.flag].envvar == option.env
        assert by_flag["--config"].envvar == settings.CONFIG_ENV


def test_bash_completion_script_and_answers() -> None:
    script = vm_tenant(env={"_VM_TENANT_COMPLETE": "bash_source"})
    assert script.returncode == 0
    assert "_vm_tenant_completion()" in script.stdout
    assert "complete -o nosort -F _vm_tenant_completion vm-tenant" in script.stdout
    for shell in ("zsh", "fish"):
        other = vm_tenant(env={"_VM_TENANT_COMPLETE": f"{shell}_source"})
        assert other.returncode == 0 and "vm-tenant" in other.stdout, shell

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        answer = vm_tenant(
            env={
                "_VM_TENANT_COMPLETE": "bash_complete",
                "COMP_WORDS": line,
                "COMP_CWORD": str(len(words) - 1),
            }
        )
        assert answer.returncode == 0, answer.stderr
        return answer.stdout.splitlines()

    assert complete("vm-tenant te") == ["plain,tenant"]
    assert complete("vm-tenant vm ") == [
        "plain,destroy",
        "plain,get",
        "plain,list",
        "plain,spawn",
    ]
    assert complete("vm-tenant vm list -o ") == ["plain,text", "plain,json"]
    assert "plain,--idempotency-key" in complete("vm-tenant vm spawn --")


# -- usage errors (exit 2, the flag named, nothing on stdout) ----------------------------------

QUOTA = ["--vcpus", "1", "--memory-mib", "1", "--vms", "1"]
SPEC = ["--vcpus", "1", "--memory-mib", "256", "--image", "debian-12"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["tenant", "create", "acme", "--vcpus", "-1", "--memory-mib", "1", "--vms", "1"],
            "Invalid value for '--vcpus': -1 is not in the range 0<=x<=2147483647.",
        ),
        (
            [
                "tenant",
                "update",
                "acme",
                "--vcpus",
                "1",
                "--memory-mib",
                "2147483648",
                "--vms",
                "1",
            ],
            "Invalid value for '--memory-mib': 2147483648 is not in the range 0<=x<=2147483647.",
        ),
        (
            ["tenant", "create", "acme", "--vcpus", "1.5", "--memory-mib", "1", "--vms", "1"],
            "Invalid value for '--vcpus': '1.5' is not a valid integer",
        ),
        (["tenant", "create", "acme", "--vcpus", "1"], "Missing option '--memory-mib'"),
        (["tenant", "create", "acme", *QUOTA, "--ttl", "0"], "Invalid value for '--ttl'"),
        (["tenant", "list", "--limit", "1001"], "Invalid value for '--limit'"),
        (["tenant", "get", ""], "Invalid value for 'ID': must be 1..4096 characters long"),
        (["token", "revoke", "acme"], "Missing argument 'TOKEN_ID'"),
        (
            ["vm", "spawn", "--vcpus", "0", "--memory-mib", "1", "--image", "x", "--token", "t"],
            "Invalid value for '--vcpus': 0 is not in the range 1<=x<=2147483647.",
        ),
        (["vm", "spawn", *SPEC, "--image", "", "--token", "t"], "Invalid value for '--image'"),
        (["vm", "spawn", *SPEC, "--name", "x" * 64, "--token", "t"], "'--name': must be 1..63"),
        (
            ["vm", "spawn", *SPEC, "--idempotency-key", "caf\u00e9", "--token", "t"],
            "Invalid value for '--idempotency-key': an idempotency key is 1..255 printable ASCII",
        ),
        (["vm", "list"], "Missing option '--token' (env var: 'VM_TENANT_TOKEN')"),
        (["vm", "get", "x", "--token", "t", "-o", "yaml"], "Invalid value for '-o' / '--output'"),
        (["usage", "--token", "t", "--url", "localhost:8080"], "Invalid value for '--url'"),
        (["usage", "--token", "t", "--timeout", "0"], "Invalid value for '--timeout'"),
        (["audit", "verify", "--expect-head", "12:abc"], "Invalid value for '--expect-head'"),
        (["vm", "reboot"], "No such command 'reboot'"),
    ],
)
def test_usage_errors_name_the_flag(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split()), result.stderr
    assert result.stdout == ""


def test_a_token_that_cannot_be_sent_is_a_usage_error() -> None:
    result = invoke("usage", "--token", "has space", "--url", NOWHERE)
    assert result.exit_code == 2
    assert result.stderr == "vm-tenant: a bearer token is printable ASCII without spaces\n"
    assert result.stdout == ""


def test_no_admin_token_anywhere_is_a_usage_error(tmp_path: Path) -> None:
    result = invoke("tenant", "list", "--data-dir", str(tmp_path), "--url", NOWHERE)
    assert result.exit_code == 2
    where = tmp_path / "admin.token"
    assert result.stderr == (
        f"vm-tenant: no admin token (--admin-token, VM_TENANT_ADMIN_TOKEN or {where}): "
        "No such file or directory\n"
    )
    assert result.stdout == ""


def test_an_empty_admin_token_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text("\n")
    result = invoke("tenant", "list", "--data-dir", str(tmp_path), "--url", NOWHERE)
    assert result.exit_code == 2
    assert result.stderr.endswith(f"{tmp_path / 'admin.token'}): the file is empty\n")


def test_admin_token_from_the_data_dir_file_then_env_then_flag(tmp_path: Path) -> None:
    """The token actually used decides nothing here; which one is read is shown by a 3."""
    (tmp_path / "admin.token").write_text("from-file\n")
    for extra, env in (
        ([], {}),
        ([], {"VM_TENANT_ADMIN_TOKEN": "from-env"}),
        (["--admin-token", "from-flag"], {"VM_TENANT_ADMIN_TOKEN": "from-env"}),
    ):
        args = ["tenant", "list", "--data-dir", str(tmp_path), "--url", NOWHERE, *extra]
        result = invoke(*args, env=env)
        assert result.exit_code == 3, result.output  # found a token, then nothing listens


# -- unreachable: exit 3, nothing on stdout ------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["tenant", "list", "--admin-token", "t"],
        ["tenant", "create", "acme", *QUOTA, "--admin-token", "t", "-o", "json"],
        ["vm", "list", "--token", "t"],
        ["vm", "spawn", *SPEC, "--token", "t"],
        ["audit", "head", "--admin-token", "t"],
    ],
)
def test_nothing_listening_is_exit_3_with_nothing_on_stdout(args: list[str]) -> None:
    result = vm_tenant(*args, "--url", NOWHERE)
    assert result.returncode == 3, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(f"vm-tenant: cannot reach {NOWHERE}: ")
    assert "Traceback" not in result.stderr


def test_a_silent_server_is_exit_3_after_the_timeout() -> None:
    """A peer that accepts and never answers: the command gives up; the outcome is unknown."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        result = invoke("usage", "--token", "t", "--url", url, "--timeout", "0.2")
    assert result.exit_code == 3
    assert result.stdout == ""
    assert result.stderr.startswith(f"vm-tenant: no answer from {url} in time")


def test_client_env_vars_are_not_taken_for_misspelt_settings(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a setting whose env var is close to VM_TENANT_TOKEN (as a store setting would be)
    store = settings.Option("store", "--store", "VM_TENANT_STORE", "URL", "the store")
    monkeypatch.setattr(settings, "OPTIONS", (*settings.OPTIONS, store))
    for name in CLIENT_ENV:
        monkeypatch.setenv(name, "x")
    assert main(["config", "show"]) == 0
    assert "ignoring" not in caplog.text
    monkeypatch.setenv("VM_TENANT_RATE_BRUST", "3")  # the control: a real typo is still named
    assert main(["config", "show"]) == 0
    assert "ignoring VM_TENANT_RATE_BRUST" in caplog.text


# -- https --------------------------------------------------------------------------------------


def write_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate it signed for 127.0.0.1: (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: str
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        certificate("test CA", ca_key, "test CA")
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        certificate("127.0.0.1", key, "test CA")
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class UsageAnswer(http.server.BaseHTTPRequestHandler):
    """Answers every GET with a fixed ``/v1/usage`` body."""

    BODY = b'{"tenant":"acme","quota":{"vcpus":1,"memory_mib":1,"vms":1},' + (
        b'"allocated":{"vcpus":0,"memory_mib":0,"vms":0}}'
    )

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.BODY)))
        self.end_headers()
        self.wfile.write(self.BODY)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_https_with_a_private_ca(tmp_path: Path) -> None:
    ca, cert, key = write_ca_and_server_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), UsageAnswer)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}"
        trusted = invoke("usage", "--token", "t", "--url", url, "--cacert", str(ca), "-o", "json")
        assert trusted.exit_code == 0, trusted.output
        assert trusted.stdout.encode() == UsageAnswer.BODY + b"\n"
        from_env = invoke("usage", "--token", "t", "--url", url, env={"VM_TENANT_CACERT": str(ca)})
        assert from_env.exit_code == 0, from_env.output
        untrusted = invoke("usage", "--token", "t", "--url", url)
        assert untrusted.exit_code == 3
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
        missing = invoke("usage", "--token", "t", "--url", url, "--cacert", str(tmp_path / "no"))
        assert missing.exit_code == 2
        assert missing.stderr.startswith(f"vm-tenant: cannot use --cacert {tmp_path / 'no'}: ")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
