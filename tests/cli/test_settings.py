"""Settings of ``vm-tenant serve``: file, env and flags, their precedence, their errors.

Everything goes through the real command line (``main([...])``), the real TOML parser and
real files; one test starts a real server from a config file alone and reaches it on the
address the file names.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors.service import ServiceConfig
from conftest import LISTEN_RE
from server import settings
from server.cli import main

ROOT = Path(__file__).resolve().parents[2]
ENV_NAMES = [option.env for option in settings.OPTIONS] + [settings.CONFIG_ENV]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``VM_TENANT_*`` from the machine running the tests leaks into them."""
    for name in list(os.environ):
        if name.startswith("VM_TENANT_"):
            monkeypatch.delenv(name)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def show(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[dict[str, Any], str]:
    """Run ``vm-tenant config show``; its output parsed back, and the raw text."""
    assert main(["config", "show", *argv]) == 0
    out = capsys.readouterr().out
    return tomllib.loads(out), out


def source_of(out: str, key: str) -> str:
    match = re.search(rf"^{re.escape(key)} = .*  # (.+)$", out, re.MULTILINE)
    assert match, out
    return match.group(1)


def problems(capsys: pytest.CaptureFixture[str], *argv: str, command: str = "show") -> str:
    """Run a command that must refuse its settings; the error text."""
    args = ["config", "show", *argv] if command == "show" else [command, *argv]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    return captured.err


# -- precedence ----------------------------------------------------------------------------


def test_defaults_file_env_flag_precedence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path / "vm.toml",
        'bind = "127.0.0.1:9001"\nfleet_timeout = 3\nlog_format = "json"\n'
        "[limits]\nburst = 7\nrate = 2.5\n",
    )
    monkeypatch.setenv("VM_TENANT_BIND", "127.0.0.1:9002")
    monkeypatch.setenv("VM_TENANT_RATE_BURST", "8")
    monkeypatch.setenv("VM_TENANT_PASSIVATE_AFTER", "12.5")
    shown, out = show(capsys, "--config", str(config), "--bind", "127.0.0.1:9003")

    assert shown["bind"] == "127.0.0.1:9003"  # flag > env > file
    assert shown["limits"]["burst"] == 8  # env > file
    assert shown["passivate_after"] == 12.5  # env > default
    assert shown["fleet_timeout"] == 3.0  # file > default
    assert shown["log_format"] == "json"
    assert shown["limits"]["rate"] == 2.5
    assert shown["limits"]["max_inflight_spawns"] == 32  # default
    assert shown["metrics_bind"] == "off"
    assert source_of(out, "bind") == "flag --bind"
    assert source_of(out, "burst") == "env VM_TENANT_RATE_BURST"
    assert source_of(out, "fleet_timeout") == f"file {config}"
    assert source_of(out, "max_inflight_spawns") == "default"


def test_every_setting_has_a_flag_and_an_env_var(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    env_values = {
        "VM_TENANT_DATA_DIR": "/srv/env",
        "VM_TENANT_STORE": "postgresql://vmtenant@db.example:5432/vmtenant",
        "VM_TENANT_BIND": "0.0.0.0:81",
        "VM_TENANT_FLEET": "http://fleet.example:7000",
        "VM_TENANT_FLEET_TIMEOUT": "2",
        "VM_TENANT_SNAPSHOT_INTERVAL": "30",
        "VM_TENANT_CHECKPOINT_INTERVAL": "5",
        "VM_TENANT_METRICS_BIND": "127.0.0.1:9100",
        "VM_TENANT_LOG_FORMAT": "console",
        "VM_TENANT_LOG_LEVEL": "debug",
        "VM_TENANT_PASSIVATE_AFTER": "60",
        "VM_TENANT_FLEET_SYNC_INTERVAL": "20",
        "VM_TENANT_RATE_LIMIT": "0",
        "VM_TENANT_RATE_BURST": "1",
        "VM_TENANT_MAX_INFLIGHT_SPAWNS": "0",
        "VM_TENANT_KEEP_ALIVE_TIMEOUT": "7",
        "VM_TENANT_HEAD_TIMEOUT": "8",
        "VM_TENANT_BODY_TIMEOUT": "9",
        "VM_TENANT_SEND_TIMEOUT": "11",
        "VM_TENANT_MAX_CONNECTIONS": "500",
        "VM_TENANT_MAX_CONNECTIONS_PER_PEER": "50",
        "VM_TENANT_RESERVED_FDS": "64",
        "VM_TENANT_BACKLOG": "128",
        "VM_TENANT_TLS_CERT": "off",
        "VM_TENANT_TLS_KEY": "off",
        "VM_TENANT_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.1",
    }
    assert set(env_values) == {option.env for option in settings.OPTIONS}
    for name, value in env_values.items():
        monkeypatch.setenv(name, value)
    from_env, _ = show(capsys)
    assert from_env["data_dir"] == "/srv/env"
    assert from_env["store"] == "postgresql://vmtenant@db.example:5432/vmtenant"
    assert from_env["bind"] == "0.0.0.0:81"
    assert from_env["fleet"] == "http://fleet.example:7000"
    assert from_env["metrics_bind"] == "127.0.0.1:9100"
    assert from_env["log_format"] == "console"
    assert from_env["log_level"] == "debug"
    assert from_env["fleet_sync_interval"] == 20.0
    assert from_env["limits"] == {"rate": 0.0, "burst": 1, "max_inflight_spawns": 0}
    assert from_env["trusted_proxies"] == "10.0.0.0/8, 192.0.2.1"
    assert from_env["serving"] == {
        "keep_alive_timeout": 7.0,
        "head_timeout": 8.0,
        "body_timeout": 9.0,
        "send_timeout": 11.0,
        "max_connections": 500,
        "max_connections_per_peer": 50,
        "reserved_fds": 64,
        "backlog": 128,
    }

    flags = [
        "--data-dir", "/srv/flag", "--store", "file", "--bind", "[::1]:82", "--fleet", "embedded",
        "--fleet-timeout", "4", "--snapshot-interval", "31", "--checkpoint-interval", "6",
        "--metrics-bind", "off", "--log-format", "json", "--log-level", "warning",
        "--passivate-after", "61", "--fleet-sync-interval", "2.5",
        "--rate-limit", "9.5", "--rate-burst", "3", "--max-inflight-spawns", "4",
        "--keep-alive-timeout", "1.5", "--head-timeout", "2", "--body-timeout", "3",
        "--send-timeout", "4", "--max-connections", "100", "--max-connections-per-peer", "10",
        "--reserved-fds", "32", "--backlog", "64", "--tls-cert", "off", "--tls-key", "off",
        "--trusted-proxies", "::1",
    ]  # fmt: skip
    from_flags, out = show(capsys, *flags)
    assert from_flags == {
        "data_dir": "/srv/flag",
        "store": "file",
        "bind": "[::1]:82",
        "fleet": "embedded",
        "fleet_timeout": 4.0,
        "snapshot_interval": 31.0,
        "checkpoint_interval": 6.0,
        "metrics_bind": "off",
        "log_format": "json",
        "log_level": "warning",
        "passivate_after": 61.0,
        "fleet_sync_interval": 2.5,
        "tls_cert": "off",
        "tls_key": "off",
        "trusted_proxies": "::1",
        "limits": {"rate": 9.5, "burst": 3, "max_inflight_spawns": 4},
        "serving": {
            "keep_alive_timeout": 1.5,
            "head_timeout": 2.0,
            "body_timeout": 3.0,
            "send_timeout": 4.0,
            "max_connections": 100,
            "max_connections_per_peer": 10,
            "reserved_fds": 32,
            "backlog": 64,
        },
    }
    assert "env " not in out


def test_config_path_from_env_and_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    by_env = write(tmp_path / "env.toml", 'data_dir = "/from/env-file"\n')
    by_flag = write(tmp_path / "flag.toml", 'data_dir = "/from/flag-file"\n')
    monkeypatch.setenv("VM_TENANT_CONFIG", str(by_env))
    assert show(capsys)[0]["data_dir"] == "/from/env-file"
    assert show(capsys, "--config", str(by_flag))[0]["data_dir"] == "/from/flag-file"


def test_empty_env_var_counts_as_unset(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VM_TENANT_BIND", "")
    monkeypatch.setenv("VM_TENANT_DATA_DIR", "")
    shown, _ = show(capsys)
    assert shown["bind"] == "127.0.0.1:8080"
    assert shown["data_dir"] == "./vm-tenant-data"


def test_settings_reach_the_service_config() -> None:
    resolved = settings.resolve(
        {"data_dir": "/d", "fleet_timeout": "2.5", "checkpoint_interval": "7"},
        {"VM_TENANT_SNAPSHOT_INTERVAL": "40", "VM_TENANT_FLEET": "https://f.example"},
    )
    assert resolved.settings.service_config() == ServiceConfig(
        data_dir=Path("/d"),
        fleet="https://f.example",
        fleet_timeout=2.5,
        snapshot_interval=40.0,
        checkpoint_interval=7.0,
    )
    assert resolved.settings.metrics_bind is None
    assert resolved.settings.limits == settings.Limits(rate=50.0, burst=100, max_inflight_spawns=32)


# -- config show ---------------------------------------------------------------------------


def test_show_round_trips_through_a_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VM_TENANT_RATE_LIMIT", "12")
    argv = ["--metrics-bind", "127.0.0.1:9100", "--data-dir", str(tmp_path / "d")]
    shown, out = show(capsys, *argv)
    original = settings.resolve(
        {"metrics_bind": "127.0.0.1:9100", "data_dir": str(tmp_path / "d")},
        {"VM_TENANT_RATE_LIMIT": "12"},
    ).settings

    again = settings.resolve({}, {}, str(write(tmp_path / "shown.toml", out))).settings
    assert again == original
    assert shown["limits"]["rate"] == 12.0
    assert original.metrics_bind == "127.0.0.1:9100"


def test_show_never_prints_the_admin_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    token = "secret-admin-token-0123456789"
    (data_dir / "admin.token").write_text(token + "\n")
    shown, out = show(capsys, "--data-dir", str(data_dir))
    assert shown["data_dir"] == str(data_dir)
    assert token not in out
    assert "token" not in out


def test_example_file_validates_and_holds_the_defaults() -> None:
    example = ROOT / "vm-tenant.example.toml"
    resolved = settings.resolve({}, {}, str(example))
    assert resolved.settings == settings.Settings()
    assert set(resolved.sources.values()) == {f"file {example}"}


def test_readme_example_validates(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"### Configuration.*?```toml\n(.*?)```", readme, re.DOTALL)
    assert block, "README lost its configuration example"
    example = write(tmp_path / "readme.toml", block.group(1))
    resolved = settings.resolve({}, {}, str(example))
    assert resolved.settings.bind == "0.0.0.0:8080"
    assert resolved.sources["limits.burst"] == f"file {example}"


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('bnd = "127.0.0.1:1"\n', "bnd: unknown key (did you mean 'bind'?)"),
        ("[limits]\nbrust = 3\n", "limits.brust: unknown key (did you mean 'limits.burst'?)"),
        ("rate = 3\n", "rate: unknown key (did you mean 'limits.rate'?)"),
        ("zzz = 1\n", "zzz: unknown key\n"),
        ('fleet_timeout = "ten"\n', "fleet_timeout: expected `float`, got `str` ('ten')"),
        ("[limits]\nburst = 1.5\n", "limits.burst: expected `int`, got `float` (1.5)"),
        ("limits = 5\n", "limits: expected a table ([limits]), got 5"),
        ("[limits]\nburst = 0\n", "limits.burst: expected `int` >= 1, got 0"),
        ("fleet_timeout = 3601\n", "fleet_timeout: expected `float` <= 3600.0, got 3601"),
        ("passivate_after = -1\n", "passivate_after: expected `float` > 0.0, got -1"),
        ('log_format = "xml"\n', "log_format: expected one of auto, json, console, got 'xml'"),
        (
            'log_level = "trace"\n',
            "log_level: expected one of debug, info, warning, error, got 'trace'",
        ),
        ('bind = "localhost"\n', "bind: expected HOST:PORT"),
        ('bind = "host:65536"\n', "bind: port must be 0..65535, got 65536"),
        ('metrics_bind = "[zz]:1"\n', "metrics_bind: expected HOST:PORT"),
        ('metrics_bind = "[1::2::3]:1"\n', "metrics_bind: '1::2::3' is not an IPv6 address"),
        ('fleet = "ftp://x"\n', "fleet: expected 'embedded' or an http(s):// URL"),
        ('store = "mysql://db/x"\n', "store: expected 'file' or a postgresql://USER@HOST:PORT/DB"),
        (
            'store = "postgresql://u:secret@db:5432/x"\n',
            "store: no password in the URL: give it in PGPASSWORD or ~/.pgpass",
        ),
        ('bind = "a:1"\nfoo = = 3\n', "TOML syntax error: Invalid value (at line 2, column 7)"),
    ],
)
def test_each_bad_file_key_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    config = write(tmp_path / "vm.toml", text)
    err = problems(capsys, "--config", str(config))
    assert f"file {config}: {expected}" in err + "\n"


def test_unreadable_config_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.toml"
    assert "cannot read the config file: No such file" in problems(capsys, "--config", str(missing))
    assert "cannot read the config file: Is a directory" in problems(
        capsys, "--config", str(tmp_path)
    )
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"bind = '\xff'\n")
    assert "the config file is not UTF-8 text" in problems(capsys, "--config", str(binary))


def test_all_problems_are_reported_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path / "vm.toml", 'bnd = 1\nlog_format = "x"\n[limits]\nburst = 0\n')
    monkeypatch.setenv("VM_TENANT_RATE_LIMIT", "fast")
    monkeypatch.setenv("VM_TENANT_METRICS_BIND", "nowhere")
    err = problems(capsys, "--config", str(config), "--fleet-timeout", "0", "--bind", "x")
    lines = err.splitlines()
    assert lines[0] == "vm-tenant: invalid settings (7 problems):"
    assert lines[1:] == [
        f"  file {config}: bnd: unknown key (did you mean 'bind'?)",
        f"  file {config}: log_format: expected one of auto, json, console, got 'x'",
        f"  file {config}: limits.burst: expected `int` >= 1, got 0",
        "  env VM_TENANT_RATE_LIMIT: limits.rate: expected `float`, got 'fast'",
        "  flag --fleet-timeout: fleet_timeout: expected `float` > 0.0, got '0'",
        "  flag --bind: bind: expected HOST:PORT (e.g. 127.0.0.1:8080 or [::1]:8080), got 'x'",
        "  env VM_TENANT_METRICS_BIND: metrics_bind: expected HOST:PORT (e.g. 127.0.0.1:8080"
        " or [::1]:8080), got 'nowhere'",
    ]


def test_metrics_bind_must_differ_from_bind(capsys: pytest.CaptureFixture[str]) -> None:
    err = problems(capsys, "--bind", "127.0.0.1:9000", "--metrics-bind", "127.0.0.1:9000")
    assert "flag --metrics-bind: metrics_bind: must differ from bind (127.0.0.1:9000)" in err


def test_serve_refuses_bad_settings_before_opening_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "never-created"
    config = write(tmp_path / "vm.toml", f'data_dir = "{data_dir}"\n[limits]\nburst = -1\n')
    err = problems(capsys, "--config", str(config), command="serve")
    assert "limits.burst: expected `int` >= 1, got -1" in err
    assert not data_dir.exists()


def test_a_misspelt_env_var_is_warned_about() -> None:
    assert settings.typo_warnings({"VM_TENANT_RATE_BRUST": "3", "VM_TENANT_URL": "x"}) == [
        "ignoring VM_TENANT_RATE_BRUST (did you mean VM_TENANT_RATE_BURST?)"
    ]


# -- live ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_a_server_started_with_config_listens_where_the_file_says(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "from-file"
    config = write(
        tmp_path / "vm.toml",
        f'bind = "127.0.0.1:{port}"\ndata_dir = "{data_dir}"\nfleet_timeout = 2\n',
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VM_TENANT_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    urls: list[str] = []
    log: list[str] = []
    found = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        with proc.stderr:
            for line in proc.stderr:
                log.append(line)
                if match := LISTEN_RE.search(line):
                    urls.append(match.group(1))
                    found.set()
        found.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        found.wait(30)
        assert urls == [f"http://127.0.0.1:{port}"], "".join(log)
        assert httpx.get(f"{urls[0]}/healthz", timeout=30).status_code == 200
        assert (data_dir / "admin.token").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        reader.join(10)
