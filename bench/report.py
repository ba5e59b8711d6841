"""Results of a benchmark run as JSON, a markdown table and (with matplotlib) plots.

Ratios are against the asyncio floor of the same run: on a shared machine the absolute figures
move from run to run, the ratios much less.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["environment", "markdown", "plots", "storm_markdown", "write", "write_storm"]

FLOOR = "floor"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _nginx_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"nginx": None, "nchan": None}
    try:
        out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=5)
        versions["nginx"] = out.stderr.strip().rpartition("/")[2] or None
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "libnginx-mod-nchan"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        versions["nchan"] = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return versions


def environment() -> dict[str, Any]:
    """The machine and the versions of everything compared."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = None
    try:
        with open("/proc/meminfo") as fh:
            memory = int(fh.readline().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    versions = {
        dist: _version(dist)
        for dist in (
            "tornado-sse",
            "tornado",
            "uvloop",
            "aiohttp",
            "aiohttp-sse",
            "sse-starlette",
            "starlette",
            "uvicorn",
            "httptools",
        )
    }
    versions.update(_nginx_versions())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_mb": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "versions": versions,
        "loadavg_at_start": os.getloadavg(),
    }


# ---------------------------------------------------------------------- markdown


def _num(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _ratio(value: Any, floor: Any) -> str:
    if not value or not floor:
        return ""
    return f" ({value / floor:.2f}x)"


def _only(results: dict[str, Any], scenario: str) -> dict[str, Any]:
    """The peers that take part in *scenario* (reference peers run only some)."""
    return {k: v for k, v in results.items() if scenario in v.get("scenarios", (scenario,))}


def _ok(peer: dict[str, Any]) -> bool:
    return peer.get("status") == "ok"


def _fanout_table(results: dict[str, Any], sizes: Sequence[str]) -> list[str]:
    floor = results.get(FLOOR, {}).get("fanout", {})
    head = "| server | " + " | ".join(
        f"{n} subs: deliveries/s | {n} subs: CPU us/delivery" for n in sizes
    )
    lines = [head + " |", "|---" * (1 + 2 * len(sizes)) + "|"]
    for peer in results.values():
        cells = [peer["label"]]
        fanout = peer.get("fanout")
        if not _ok(peer) and not fanout:
            cells += [peer["status"]] + [""] * (2 * len(sizes) - 1)
        else:
            for size in sizes:
                row = (fanout or {}).get(size)
                base = floor.get(size) or {}
                if not row or "error" in (fanout or {}):
                    cells += [(fanout or {}).get("error", "-"), ""]
                    continue
                cells.append(
                    _num(row.get("deliveries_per_s"))
                    + _ratio(row.get("deliveries_per_s"), base.get("deliveries_per_s"))
                )
                cells.append(
                    _num(row.get("cpu_us_per_delivery"), 2)
                    + _ratio(row.get("cpu_us_per_delivery"), base.get("cpu_us_per_delivery"))
                )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _latency_table(results: dict[str, Any]) -> list[str]:
    floor = (results.get(FLOOR, {}).get("latency") or {}).get("latency_ms", {})
    lines = [
        "| server | p50 ms | p99 ms | max ms | CPU us/delivery | lost / dup / reordered |",
        "|---|---|---|---|---|---|",
    ]
    for peer in results.values():
        row = peer.get("latency")
        if not row or "error" in row:
            reason = (row or {}).get("error") or peer["status"]
            lines.append(f"| {peer['label']} | {reason} | | | | |")
            continue
        lat = row.get("latency_ms", {})
        lines.append(
            f"| {peer['label']} | {_num(lat.get('p50'), 2)} | "
            f"{_num(lat.get('p99'), 2)}{_ratio(lat.get('p99'), floor.get('p99'))} | "
            f"{_num(lat.get('max'), 2)} | {_num(row.get('cpu_us_per_delivery'), 2)} | "
            f"{row['lost']} / {row['duplicated']} / {row['reordered']} |"
        )
    return lines


def _idle_table(results: dict[str, Any], settle: float) -> list[str]:
    not_released = f"not within {settle:g} s / unknown"
    lines = [
        "| server | streams | connect all (s) | server CPU to connect (s) | of which GC (s) "
        "| KB per stream | idle CPU % | all released after (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for peer in results.values():
        row = peer.get("idle")
        if not row or "error" in row:
            reason = (row or {}).get("error") or peer["status"]
            lines.append(f"| {peer['label']} | {reason} | | | | | | |")
            continue
        released = row.get("release_seconds")
        gc_seconds = row.get("connect_gc_s")
        lines.append(
            f"| {peer['label']} | {_num(row['streams'])} | {_num(row['connect_seconds'], 2)} | "
            f"{_num(row.get('connect_server_cpu_s'), 2)} | "
            f"{'-' if gc_seconds is None else _num(gc_seconds, 2)} | "
            f"{_num(row['kb_per_stream'], 1)} | {_num(row['idle_cpu_percent'], 1)} | "
            f"{_num(released, 2) if released is not None else not_released} |"
        )
    return lines


def _churn_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| server | connects/s | connect p99 ms | steady p99 ms | CPU us/delivery | "
        "lost / dup / reordered (steady + churning) | streams settled |",
        "|---|---|---|---|---|---|---|",
    ]
    for peer in results.values():
        row = peer.get("churn")
        if not row or "error" in row:
            reason = (row or {}).get("error") or peer["status"]
            lines.append(f"| {peer['label']} | {reason} | | | | | |")
            continue
        steady, churners = row["steady"], row["churners"]
        bad = [steady[k] + churners.get(k, 0) for k in ("lost", "duplicated", "reordered")]
        settled = row.get("streams_settled_after_s")
        lines.append(
            f"| {peer['label']} | {_num(churners.get('connects_per_s'))} | "
            f"{_num(churners.get('connect_p99_ms'), 1)} | "
            f"{_num(steady.get('latency_ms', {}).get('p99'), 2)} | "
            f"{_num(steady.get('cpu_us_per_delivery'), 2)} | "
            f"{bad[0]} / {bad[1]} / {bad[2]} | "
            f"{'yes' if settled is not None else 'unknown'} |"
        )
    return lines


def _slow_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| server | stalled clients cut off | server memory growth (MB) | others: lost / dup / "
        "reordered | others: p99 ms |",
        "|---|---|---|---|---|",
    ]
    for peer in results.values():
        row = peer.get("slow")
        if not row or "error" in row:
            reason = (row or {}).get("error") or peer["status"]
            lines.append(f"| {peer['label']} | {reason} | | | |")
            continue
        lines.append(
            f"| {peer['label']} | "
            f"{'unknown' if row['stalled_cut_off'] is None else row['stalled_cut_off']} of "
            f"{row['stalled']} | "
            f"{_num(row['rss_growth_mb'], 1)} | "
            f"{row['lost']} / {row['duplicated']} / {row['reordered']} | "
            f"{_num(row.get('latency_ms', {}).get('p99'), 1)} |"
        )
    return lines


def integrity(results: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Lost, duplicated, reordered and dropped events (streams) per peer, all scenarios."""
    out: dict[str, dict[str, int]] = {}
    for name, peer in results.items():
        totals = {"lost": 0, "duplicated": 0, "reordered": 0, "dropped": 0}
        rows: list[dict[str, Any]] = []
        fanout = peer.get("fanout") or {}
        rows += [v for v in fanout.values() if isinstance(v, dict)]
        for scenario in ("latency", "slow"):
            if isinstance(peer.get(scenario), dict):
                rows.append(peer[scenario])
        churn = peer.get("churn")
        if isinstance(churn, dict) and "steady" in churn:
            rows += [churn["steady"], churn["churners"]]
        for row in rows:
            for key in totals:
                totals[key] += int(row.get(key, 0) or 0)
        out[name] = totals
    return out


def markdown(data: dict[str, Any]) -> str:
    """The results as markdown: environment, command, one table per scenario."""
    results: dict[str, Any] = data["results"]
    env = data["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        f"Command: `{data['command']}`  ",
        f"Machine: {env['cpu']}, {env['cores']} cores, {env['memory_mb']} MB, Linux "
        f"{env['kernel']}, {env['implementation']} {env['python']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in env['loadavg_at_start'])}  ",
        f"Versions: {versions}  ",
        f"Placement: server on core(s) {data['placement']['server']}, load generator on "
        f"{data['placement']['clients']}; {data['plan']['size']}-byte events; heartbeats every "
        f"{data['plan']['heartbeat']} s; ratios in parentheses are against the asyncio floor of "
        "this run.",
        "",
    ]
    sizes = [str(n) for n in data["plan"]["fanout_subscribers"]]
    if any("fanout" in p for p in results.values()):
        lines += [
            "### Fan-out throughput",
            "",
            "Events published as fast as the server's loop goes, one per loop iteration; "
            f"median of {data['plan']['fanout_repeats']} run(s).",
            "",
            *_fanout_table(_only(results, "fanout"), sizes),
            "",
        ]
    if any("latency" in p for p in results.values()):
        plan = data["plan"]
        lines += [
            "### Latency",
            "",
            f"{plan['latency_subscribers']} subscribers, {plan['latency_rate']:g} events/s for "
            f"{plan['latency_duration']:g} s; publish to receive.",
            "",
            *_latency_table(_only(results, "latency")),
            "",
        ]
    if any("idle" in p for p in results.values()):
        lines += [
            "### Idle streams",
            "",
            f"{data['plan']['idle_streams']} streams; memory is the server's RSS growth; idle "
            f"CPU over {data['plan']['idle_window']:g} s with heartbeats on.",
            "",
            *_idle_table(_only(results, "idle"), data["plan"].get("settle_timeout", 10.0)),
            "",
        ]
    if any("churn" in p for p in results.values()):
        plan = data["plan"]
        lines += [
            "### Churn",
            "",
            f"{plan['churn_steady']} steady subscribers, {plan['churn_clients']} clients "
            f"connecting and leaving (each stays {plan['churn_life'][0]:g}-"
            f"{plan['churn_life'][1]:g} s) for {plan['churn_duration']:g} s while "
            f"{plan['churn_rate']:g} events/s flow.",
            "",
            *_churn_table(_only(results, "churn")),
            "",
        ]
    if any("slow" in p for p in results.values()):
        plan = data["plan"]
        lines += [
            "### Slow consumers",
            "",
            f"{plan['slow_subscribers']} subscribers, of which one per load generator process "
            f"stops reading; {plan['slow_events']} events of {plan['slow_size']} bytes "
            "published as fast as the server goes (more than the kernel's socket buffers "
            "hold for a stalled client).",
            "",
            *_slow_table(_only(results, "slow")),
            "",
        ]
    for name, run in (data.get("scaling") or {}).items():
        lines += [f"### Scaling out: {name}", ""]
        if run.get("status") == "ok":
            lines += [f"Command: `{run['command']}`", "", run["markdown"].strip(), ""]
        else:
            lines += [str(run.get("status")), ""]
    lines += [
        "### Integrity (all scenarios)",
        "",
        "| server | lost | duplicated | reordered | streams dropped by the server |",
        "|---|---|---|---|---|",
    ]
    for name, totals in integrity(results).items():
        if "scenarios" in results[name] and "fanout" not in results[name]["scenarios"]:
            continue  # a reference peer that delivers nothing measured
        lines.append(
            f"| {results[name]['label']} | {totals['lost']} | {totals['duplicated']} | "
            f"{totals['reordered']} | {totals['dropped']} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- the restart storm

#: what each case of `tornado_sse.bench.storm` does, for the table's readers
STORM_CASES = {
    "a": "one hub (in-process broker) SIGTERMed, drained, started again on its port",
    "b": "`--processes 2`: the worker not running the hub killed with kill -9",
    "b-hub": "`--processes 2`: the worker running the hub killed with kill -9",
    "c": "two `--redis` hubs: hub A SIGTERMed and drained, its clients fail over to B",
}


def _span(row: dict[str, Any] | None, digits: int) -> str:
    if not row:
        return "-"
    return " / ".join(_num(row[key], digits) for key in ("min", "median", "max"))


def storm_table(cases: dict[str, Any]) -> list[str]:
    """One row per storm case."""
    lines = [
        "| case | streams | every stream back after (s) | lost / dup / reordered | streams "
        "reset / events missed after a reset | live p99 ms: steady -> storm | replayed: "
        "events, p99 s | retry: held at the close (ms) min / median / max | close to back (s) "
        "min / median / max | publishes refused / answer lost |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in cases.items():
        what = f"{name}: {STORM_CASES.get(name, name)}"
        if row.get("status") != "ok":
            lines.append(f"| {what} | {row.get('status')} | | | | | | | | |")
            continue
        steady = row["latency_steady_ms"].get("p99")
        storm = row["latency_storm_ms"].get("p99")
        replay = row.get("latency_replayed_ms") or {}
        lines.append(
            f"| {what} | {_num(row['streams'])} ({_num(row['streams_closed'])} closed) | "
            f"{_num(row['all_back_s'], 2)} | "
            f"{row['lost']} / {row['duplicated']} / {row['reordered']} | "
            f"{_num(row['streams_reset'])} / {_num(row['missed_after_reset'])} | "
            f"{_num(steady, 1)} -> {_num(storm, 1)}{_ratio(storm, steady)} | "
            f"{_num(row['replayed'])}, {_num(replay.get('p99', 0) / 1000, 2)} | "
            f"{_span(row['retry_ms'], 0)} | {_span(row['outage_s'], 2)} | "
            f"{row['publishes_refused']} / {row['publishes_unknown']} |"
        )
    return lines


def storm_markdown(data: dict[str, Any]) -> str:
    """A storm run as markdown: the command, the machine, the plan and one table."""
    plan = data["plan"]
    env = data["environment"]
    lines = [
        f"Command: `{data['command']}`  ",
        f"Machine: {env['cpu']}, {env['cores']} cores, Linux {env['kernel']}, "
        f"{env['implementation']} {env['python']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in env['loadavg_at_start'])}  ",
        f"Placement: hubs (and redis-server) on core(s) {data['placement']['server']}, load "
        f"generator on {data['placement']['clients']}.  ",
        f"{_num(plan['streams'])} streams over {plan['channels']} channels, "
        f"{plan['rate']:g} events/s in all ({plan['size']}-byte events), "
        f"{plan['steady']:g} s steady before the storm; hubs with `--retry {plan['retry']}` "
        f"(jittered up to 1.5x), `--drain {plan['drain']:g}`, `--history {plan['history']}`.",
        "",
        *storm_table(data["cases"]),
        "",
    ]
    return "\n".join(lines)


def write_storm(data: dict[str, Any], out: Path) -> list[Path]:
    """Write ``storm.json`` and ``storm.md`` into *out*; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "storm.json"
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    md_path = out / "storm.md"
    md_path.write_text(storm_markdown(data))
    return [json_path, md_path]


# ---------------------------------------------------------------------- plots


def plots(data: dict[str, Any], out: Path) -> list[Path]:
    """Write PNG plots into *out*; nothing (an empty list) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    results = {k: v for k, v in data["results"].items() if v.get("fanout") or v.get("idle")}
    written: list[Path] = []
    labels = {name: peer["label"].split(" (")[0] for name, peer in results.items()}

    sizes = [str(n) for n in data["plan"]["fanout_subscribers"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, peer in results.items():
        fanout = peer.get("fanout") or {}
        xs = [int(s) for s in sizes if isinstance(fanout.get(s), dict)]
        if not xs:
            continue
        rate = [fanout[str(x)]["deliveries_per_s"] or 0 for x in xs]
        cpu = [fanout[str(x)]["cpu_us_per_delivery"] or 0 for x in xs]
        left.plot(xs, rate, marker="o", label=labels[name])
        right.plot(xs, cpu, marker="o", label=labels[name])
    for axis, title in ((left, "deliveries/s"), (right, "server CPU us per delivery")):
        axis.set_xscale("log")
        axis.set_xlabel("subscribers")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    right.set_yscale("log")
    right.legend(fontsize=8)
    fig.tight_layout()
    path = out / "fanout.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    names = [
        n
        for n, p in results.items()
        if isinstance(p.get("latency"), dict) and "latency_ms" in p["latency"]
    ]
    if names:
        fig, axis = plt.subplots(figsize=(8, 3.5))
        p50 = [results[n]["latency"]["latency_ms"]["p50"] for n in names]
        p99 = [results[n]["latency"]["latency_ms"]["p99"] for n in names]
        xs = range(len(names))
        axis.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50")
        axis.bar([x + 0.2 for x in xs], p99, width=0.4, label="p99")
        axis.set_xticks(list(xs), [labels[n] for n in names], rotation=20, ha="right", fontsize=8)
        axis.set_ylabel("ms")
        axis.set_title("publish-to-receive latency")
        axis.legend()
        fig.tight_layout()
        path = out / "latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    names = [
        n
        for n, p in results.items()
        if isinstance(p.get("idle"), dict) and p["idle"].get("kb_per_stream") is not None
    ]
    if names:
        fig, axis = plt.subplots(figsize=(8, 3.5))
        axis.bar(range(len(names)), [results[n]["idle"]["kb_per_stream"] for n in names])
        axis.set_xticks(
            range(len(names)), [labels[n] for n in names], rotation=20, ha="right", fontsize=8
        )
        axis.set_ylabel("KB")
        axis.set_title(f"server memory per idle stream ({data['plan']['idle_streams']} streams)")
        fig.tight_layout()
        path = out / "memory.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write(data: dict[str, Any], out: Path) -> list[Path]:
    """Write ``results.json``, ``results.md`` and the plots into *out*; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    md_path = out / "results.md"
    md_path.write_text(markdown(data))
    return [json_path, md_path, *plots(data, out)]
