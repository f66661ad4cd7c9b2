"""Per-tenant limits: the token bucket under a mock clock, and the 429s over HTTP.

The HTTP tests run the real core and app in-process with time frozen (``mock_clock``):
the bucket refills only when a test jumps the clock, so every count is exact.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from quart import Response

from actors.errors import Busy, StartupError
from actors.service import open_service
from actors.tenants.limits import (
    LimitSettings,
    TenantLimiter,
    TenantLimits,
    TokenBucket,
    retry_after,
)
from conftest import QUOTA, Api, service_config
from server import settings
from server.app import create_app
from server.auth import Authority
from server.cli import build_parser

PROBLEM_MEMBERS = {"type", "title", "status", "detail", "code"}
SPEC = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}


# -- the bucket, the limiter, the settings ------------------------------------------------------


def refused(limiter: TenantLimiter) -> int:
    """The ``Retry-After`` of a request the limiter refuses (fails if it admits it)."""
    with pytest.raises(Busy) as caught:
        limiter.admit()
    return caught.value.retry_after


async def test_burst_then_refusal(mock_clock: trio.testing.MockClock) -> None:
    limiter = TenantLimiter(LimitSettings(rate=2.0, burst=5))
    for _ in range(5):
        limiter.admit()
    assert refused(limiter) == 1
    # Refusals take nothing: they do not push the next admission further away.
    for _ in range(100):
        refused(limiter)
    mock_clock.jump(0.5)
    limiter.admit()
    assert refused(limiter) == 1


async def test_refill_is_capped_at_the_burst(mock_clock: trio.testing.MockClock) -> None:
    limiter = TenantLimiter(LimitSettings(rate=10.0, burst=3))
    for _ in range(3):
        limiter.admit()
    mock_clock.jump(3600)
    for _ in range(3):
        limiter.admit()
    refused(limiter)


async def test_refill_follows_the_rate(mock_clock: trio.testing.MockClock) -> None:
    limiter = TenantLimiter(LimitSettings(rate=4.0, burst=1))
    limiter.admit()
    admitted = 0
    for _ in range(40):  # ten seconds in steps of a quarter second: one token each
        mock_clock.jump(0.25)
        limiter.admit()
        admitted += 1
        refused(limiter)
    assert admitted == 40


async def test_retry_after_is_computed_from_the_bucket(mock_clock: trio.testing.MockClock) -> None:
    limiter = TenantLimiter(LimitSettings(rate=0.25, burst=1))  # one token per 4 s
    limiter.admit()
    assert refused(limiter) == 4
    mock_clock.jump(1.5)  # 2.5 s to go: rounded up
    assert refused(limiter) == 3
    mock_clock.jump(2.4)  # 0.1 s to go: never 0
    assert refused(limiter) == 1
    mock_clock.jump(0.1)
    limiter.admit()


def test_retry_after_rounding() -> None:
    assert retry_after(0.0001) == 1
    assert retry_after(1.0) == 1
    assert retry_after(1.0 + 1e-12) == 1  # float noise does not cost a second
    assert retry_after(1.01) == 2
    assert retry_after(59.5) == 60


async def test_rate_zero_is_off(mock_clock: trio.testing.MockClock) -> None:
    limiter = TenantLimiter(LimitSettings(rate=0.0, burst=1))
    for _ in range(10_000):
        limiter.admit()


async def test_tenants_have_separate_buckets(mock_clock: trio.testing.MockClock) -> None:
    limits = TenantLimits(LimitSettings(rate=1.0, burst=2))
    for _ in range(2):
        limits.of("acme").admit()
    refused(limits.of("acme"))
    for _ in range(2):
        limits.of("globex").admit()
    limits.forget("acme")
    limits.of("acme").admit()  # a re-created tenant starts with a full bucket


def test_spawn_slots() -> None:
    limiter = TenantLimiter(LimitSettings(rate=0.0, max_inflight_spawns=2))
    with limiter.spawn_slot(), limiter.spawn_slot():
        with pytest.raises(Busy) as caught, limiter.spawn_slot():
            pass
        assert caught.value.retry_after == 1
        assert limiter.spawns_in_flight == 2
    assert limiter.spawns_in_flight == 0
    with pytest.raises(RuntimeError), limiter.spawn_slot():
        raise RuntimeError("the request failed")
    assert limiter.spawns_in_flight == 0  # freed on every way out
    unlimited = TenantLimiter(LimitSettings(rate=0.0, max_inflight_spawns=0))
    with unlimited.spawn_slot(), unlimited.spawn_slot(), unlimited.spawn_slot():
        assert unlimited.spawns_in_flight == 3


def test_token_bucket_ignores_a_clock_that_steps_back() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=100.0)
    assert bucket.take(100.0) == 0.0
    assert bucket.take(50.0) == pytest.approx(1.0)
    assert bucket.take(101.0) == 0.0


@pytest.mark.parametrize(
    "settings",
    [
        {"rate": -1.0},
        {"rate": float("nan")},
        {"rate": float("inf")},
        {"burst": 0},
        {"max_inflight_spawns": -1},
    ],
)
async def test_bad_settings_stop_the_start(tmp_path: Path, settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LimitSettings(**settings)
    names = {"rate": "rate_limit", "burst": "rate_burst"}
    config = service_config(tmp_path / "data", **{names.get(k, k): v for k, v in settings.items()})
    with pytest.raises(StartupError, match="bad limits"):
        async with open_service(config):
            pass


# -- settings of `vm-tenant serve` ---------------------------------------------------------------


def serve_limits(argv: list[str], environ: dict[str, str]) -> tuple[float, int, int]:
    """The limits ``vm-tenant serve`` would run with, through the real settings layer."""
    args = build_parser().parse_args(["serve", *argv])
    config = settings.from_args(args, environ).settings.service_config()
    return config.rate_limit, config.rate_burst, config.max_inflight_spawns


def test_serve_defaults_and_flags() -> None:
    assert serve_limits([], {}) == (50.0, 100, 32)
    flags = ["--rate-limit", "0", "--rate-burst", "7", "--max-inflight-spawns", "0"]
    assert serve_limits(flags, {}) == (0.0, 7, 0)
    env = {
        "VM_TENANT_RATE_LIMIT": "2.5",
        "VM_TENANT_RATE_BURST": "3",
        "VM_TENANT_MAX_INFLIGHT_SPAWNS": "4",
    }
    assert serve_limits([], env) == (2.5, 3, 4)
    assert serve_limits(["--rate-limit", "9"], env) == (9.0, 3, 4)  # the flag wins


@pytest.mark.parametrize(
    "argv",
    [
        ["--rate-limit", "-1"],
        ["--rate-limit", "nan"],
        ["--rate-limit", "fast"],
        ["--rate-burst", "0"],
        ["--rate-burst", "1.5"],
        ["--max-inflight-spawns", "-1"],
    ],
)
def test_serve_refuses_bad_limits(argv: list[str]) -> None:
    with pytest.raises(settings.SettingsError) as caught:
        serve_limits(argv, {})
    assert len(caught.value.problems) == 1
    assert argv[0] in caught.value.problems[0]


# -- over HTTP ------------------------------------------------------------------------------------


@asynccontextmanager
async def limited(data_dir: Path, **limits: Any) -> AsyncIterator[Api]:
    """The real core and app with the given limits; the caller's test holds the mock clock."""
    async with open_service(service_config(data_dir, **limits)) as service:
        app = create_app(service, Authority.for_data_dir(data_dir))
        token = (data_dir / "admin.token").read_text().strip()
        api = Api(app.test_client(), service, token)
        try:
            yield api
        finally:
            api.fleet.knobs.latency = 0.0


async def assert_rate_limited(response: Response, retry: int) -> None:
    raw = await response.get_data()
    assert response.status_code == 429, raw
    assert response.mimetype == "application/problem+json"
    body = json.loads(raw)
    assert set(body) >= PROBLEM_MEMBERS
    assert (body["status"], body["code"]) == (429, "rate_limited")
    assert response.headers["Retry-After"] == str(retry)


async def get_usage(api: Api, token: str) -> Response:
    return await api.client.get("/v1/usage", headers={"Authorization": token})


async def test_http_429_changes_nothing(tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    async with limited(tmp_path / "data", rate_limit=1.0, rate_burst=3) as api:
        acme = await api.create_tenant("acme")
        assert (await api.spawn(acme)).status_code == 201
        assert (await get_usage(api, acme)).status_code == 200
        assert (await get_usage(api, acme)).status_code == 200
        seq, vms = api.service.audit.seq, api.fleet.vm_ids()
        await assert_rate_limited(await api.spawn(acme), 1)
        await assert_rate_limited(await api.spawn(acme, vcpus=1.5), 1)  # before the body
        auth = {"Authorization": acme}
        await assert_rate_limited(await api.client.get("/v1/vms", headers=auth), 1)
        [vm_id] = vms
        await assert_rate_limited(await api.client.delete(f"/v1/vms/{vm_id}", headers=auth), 1)
        # Not audited (a 429 is neither a quota refusal nor an unowned id), not forwarded.
        assert api.service.audit.seq == seq
        assert api.fleet.vm_ids() == vms
        # Admin endpoints are not limited per tenant.
        for _ in range(10):
            admin_view = await api.client.get("/v1/admin/tenants/acme", headers=api.admin)
            assert admin_view.status_code == 200
        assert (await admin_view.get_json())["allocated"] == {
            "vcpus": 1,
            "memory_mib": 256,
            "vms": 1,
        }
        mock_clock.jump(1.0)
        assert (await get_usage(api, acme)).status_code == 200
        await assert_rate_limited(await get_usage(api, acme), 1)


async def test_http_other_tenant_unaffected(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with limited(tmp_path / "data", rate_limit=0.5, rate_burst=2) as api:
        acme = await api.create_tenant("acme")
        globex = await api.create_tenant("globex")
        for _ in range(2):
            assert (await get_usage(api, acme)).status_code == 200
        await assert_rate_limited(await get_usage(api, acme), 2)
        for _ in range(2):
            assert (await api.spawn(globex)).status_code == 201
        await assert_rate_limited(await api.spawn(globex), 2)
        await assert_rate_limited(await get_usage(api, acme), 2)


async def test_http_retry_after_counts_down(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with limited(tmp_path / "data", rate_limit=0.1, rate_burst=1) as api:
        acme = await api.create_tenant("acme")
        assert (await get_usage(api, acme)).status_code == 200
        await assert_rate_limited(await get_usage(api, acme), 10)
        mock_clock.jump(6.5)
        await assert_rate_limited(await get_usage(api, acme), 4)
        mock_clock.jump(3.5)
        assert (await get_usage(api, acme)).status_code == 200


async def test_http_deleted_tenant_starts_afresh(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with limited(tmp_path / "data", rate_limit=1.0, rate_burst=1) as api:
        acme = await api.create_tenant("acme")
        assert (await get_usage(api, acme)).status_code == 200
        await assert_rate_limited(await get_usage(api, acme), 1)
        deleted = await api.client.delete("/v1/admin/tenants/acme", headers=api.admin)
        assert deleted.status_code == 204
        assert (await get_usage(api, acme)).status_code == 401  # auth comes first
        acme = await api.create_tenant("acme")
        assert (await get_usage(api, acme)).status_code == 200


async def test_http_inflight_spawn_limit(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with limited(tmp_path / "data", rate_limit=0.0, max_inflight_spawns=2) as api:
        acme = await api.create_tenant("acme")
        globex = await api.create_tenant("globex")
        api.fleet.knobs.latency = 1.0  # the fleet holds every spawn until the clock jumps
        held: list[Response] = []

        async def hold(token: str) -> None:
            held.append(await api.spawn(token))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold, acme)
            nursery.start_soon(hold, acme)
            await until(lambda: api.fleet.calls == 2)
            seq = api.service.audit.seq
            key = {"Idempotency-Key": "third"}
            third = await api.client.post(
                "/v1/vms", json=SPEC, headers={"Authorization": acme, **key}
            )
            await assert_rate_limited(third, 1)
            assert api.service.audit.seq == seq
            usage = await (await get_usage(api, acme)).get_json()
            assert usage["allocated"]["vms"] == 2  # the held two only; reads still answer
            # Another tenant has slots of its own.
            nursery.start_soon(hold, globex)
            await until(lambda: api.fleet.calls == 3)
            mock_clock.jump(1.0)
        assert [r.status_code for r in held] == [201, 201, 201]
        api.fleet.knobs.latency = 0.0
        # Slots are freed with the answers; the refused key kept no record.
        again = await api.client.post(
            "/v1/vms", json=SPEC, headers={"Authorization": acme, "Idempotency-Key": "third"}
        )
        assert again.status_code == 201
        assert "Idempotent-Replayed" not in again.headers
        usage = await (await get_usage(api, acme)).get_json()
        assert usage == {
            "tenant": "acme",
            "quota": QUOTA,
            "allocated": {"vcpus": 3, "memory_mib": 768, "vms": 3},
        }


async def until(predicate: Any) -> None:
    """Let every other task run until ``predicate`` holds (no sleeping, no clock jumps)."""
    for _ in range(20_000):
        if predicate():
            return
        await trio.testing.wait_all_tasks_blocked(0.001)
    raise AssertionError("the condition never became true")
