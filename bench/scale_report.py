"""The scale figures of ``bench.scale`` as a table and as checks against the issue's targets.

``bench.run --scale`` runs ``bench.scale`` after the HTTP matrix and puts its figures in
the same result document; this module renders them next to the HTTP tables.
"""

from __future__ import annotations

from typing import Any

#: entries per second that full replay and ``audit verify`` must each reach
RATE_TARGET = 150_000
#: start-up over a snapshot with the longest history, in seconds
STARTUP_TARGET_S = 3.0


def table(figures: dict[str, Any]) -> str:
    """The figures as a Markdown table, one measured quantity a row."""
    summary, full = figures["summary"], figures["memory_full"]
    replay = figures["replay"]
    histories = sorted(
        int(key.removeprefix("restart_history_"))
        for key in figures
        if key.startswith("restart_history_")
    )
    rows = [
        ("tenants / VMs loaded", f"{figures['tenants']:,} / {figures['vms']:,}"),
        ("RSS with everything loaded", f"{summary['rss_loaded_mib']} MiB"),
        (
            "bytes per tenant / per VM",
            f"{summary['bytes_per_tenant']:,} / {summary['bytes_per_vm']:,}",
        ),
        (
            f"RSS with {full['active_actors']:,} tenant actors running at once",
            f"{summary['rss_all_active_mib']} MiB "
            f"({summary['bytes_per_active_actor']:,} B per actor)",
        ),
        (
            "actors left after idling",
            f"{full['active_after_idle']} of {full['active_actors']:,} "
            f"(passivate after {full['passivated_after_s']} s); RSS then "
            f"{summary['rss_passivated_mib']} MiB",
        ),
        ("start-up over the full state", f"{figures['restart_full']['startup_s']} s"),
        *(
            (
                f"start-up, snapshot + {n:,} entries of history",
                f"{figures[f'restart_history_{n}']['startup_s']} s",
            )
            for n in histories
        ),
        ("full replay", f"{replay['replay_per_s']:,} entries/s ({replay['entries']:,} entries)"),
        ("audit verify", f"{replay['verify_per_s']:,} entries/s"),
    ]
    listing = full.get("listing")
    if listing:
        rows.append(
            (
                f"one page of 100 of {listing['tenant_vms']:,} VMs: cursor at start / middle / end",
                f"{listing['page_start_us']} / {listing['page_middle_us']} / "
                f"{listing['page_end_us']} µs",
            )
        )
    lines = ["| figure | measured |", "| --- | ---: |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def targets(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Checks in the shape of ``bench.report.targets`` (scenario ``scale``)."""
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float, limit: float, ok: bool) -> None:
        checks.append(
            {
                "target": name,
                "scenario": "scale",
                "concurrency": "-",
                "value": value,
                "limit": limit,
                "ok": ok,
            }
        )

    replay = figures["replay"]
    check(
        "full replay >= 150k entries/s",
        replay["replay_per_s"],
        RATE_TARGET,
        replay["replay_per_s"] >= RATE_TARGET,
    )
    check(
        "audit verify >= 150k entries/s",
        replay["verify_per_s"],
        RATE_TARGET,
        replay["verify_per_s"] >= RATE_TARGET,
    )
    longest = max(
        (int(k.removeprefix("restart_history_")), v["startup_s"])
        for k, v in figures.items()
        if k.startswith("restart_history_")
    )
    check(
        f"start-up < 3 s with {longest[0]:,} entries",
        longest[1],
        STARTUP_TARGET_S,
        longest[1] < STARTUP_TARGET_S,
    )
    full = figures["memory_full"]
    check(
        "no actor left after idling", full["active_after_idle"], 0, full["active_after_idle"] == 0
    )
    return checks
