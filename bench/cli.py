"""``tornado-sse bench``: run the benchmark beside the peers and write the results.

Examples::

    tornado-sse bench --quick                       # about a minute
    tornado-sse bench --out docs/benchmarks         # the full run behind docs/benchmarks.md
    tornado-sse bench --scenario fanout --peers floor,tornado_sse
    tornado-sse bench storm --out docs/benchmarks   # the restart storm (bench/storm.py)
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import click

from . import report
from .harness import PEERS, SCENARIOS, Plan, Progress, cores, run_peers, steps


def _peer_names(value: str | None) -> list[str]:
    if not value:
        return list(PEERS)
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise click.BadParameter(
            f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}"
        )
    return names


#: the scaling-out and cost benchmarks (other modules of tornado_sse.bench), run by
#: ``--scaling``: module, arguments, and the arguments ``--quick`` adds
SCALING: dict[str, tuple[str, list[str], list[str]]] = {
    "bridge": (
        "tornado_sse.bench.bridge_cost",
        ["--subscribers", "1000"],
        ["--burst", "500", "--seconds", "2"],
    ),
    "redis": (
        "tornado_sse.bench.redis_cost",
        ["--subscribers", "1000"],
        ["--burst", "500", "--seconds", "2"],
    ),
    "serve --processes 2 against 1 (CPU per delivery)": (
        "tornado_sse.bench.serve_cost",
        ["--subscribers", "1000", "--rounds", "5"],
        ["--events", "300", "--rounds", "1"],
    ),
    "connect CPU against the empty Tornado handler": (
        "tornado_sse.bench.connect_cost",
        ["--streams", "10000", "--rounds", "5"],
        ["--streams", "1000", "--rounds", "1"],
    ),
}


def _run_scaling(
    module: str, args: list[str], quick_args: list[str], quick: bool, out: Path
) -> dict[str, Any]:
    """Run one scaling benchmark as a subprocess; its Markdown table and JSON, or why not."""
    slug = module.rsplit(".", 1)[-1]
    argv = [sys.executable, "-m", module, *args, "--out", str(out / f"{slug}.json")]
    if quick:
        argv += quick_args
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"status": f"failed: {exc}"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"status": f"failed (exit {done.returncode}): {' / '.join(tail)}"}
    return {"status": "ok", "command": shlex.join(["python", *argv[1:]]), "markdown": done.stdout}


def _override(plan: Plan, item: str) -> None:
    """Set one field of *plan* from ``FIELD=VALUE`` (a comma-separated list for sequences)."""
    name, sep, text = item.partition("=")
    current = getattr(plan, name, None) if sep else None
    if current is None or name.startswith("_"):
        names = ", ".join(f.name for f in fields(plan))
        raise click.BadParameter(
            f"expected FIELD=VALUE with FIELD one of {names}", param_hint="--set"
        )
    try:
        if isinstance(current, (tuple, list)):
            kind = type(current[0]) if current else float
            value: Any = tuple(kind(part) for part in text.split(","))
        else:
            value = type(current)(text)
    except ValueError as exc:
        raise click.BadParameter(f"{item}: {exc}", param_hint="--set") from exc
    setattr(plan, name, value)


def _command_line(
    quick: bool,
    scenarios: tuple[str, ...],
    peers: str | None,
    out: Path,
    repeats: int | None,
    streams: int | None,
    scaling: bool = False,
    overrides: tuple[str, ...] = (),
) -> str:
    """The command that reproduces this run."""
    argv = ["tornado-sse", "bench"]
    if quick:
        argv.append("--quick")
    for name in scenarios:
        argv += ["--scenario", name]
    if peers:
        argv += ["--peers", peers]
    if repeats is not None:
        argv += ["--repeats", str(repeats)]
    if streams is not None:
        argv += ["--streams", str(streams)]
    if scaling:
        argv.append("--scaling")
    for item in overrides:
        argv += ["--set", item]
    argv += ["--out", str(out)]
    return shlex.join(argv)


@click.group(name="bench", invoke_without_command=True)
@click.option(
    "--quick",
    is_flag=True,
    help="Small sizes, one run each, without the uvloop variant: about a minute.",
)
@click.option(
    "--scenario",
    "scenarios",
    multiple=True,
    type=click.Choice(SCENARIOS),
    help="Run only this scenario (repeatable). Default: all.",
)
@click.option(
    "--peers",
    default=None,
    metavar="NAMES",
    help=f"Comma-separated servers to compare. Default: all of {', '.join(PEERS)}.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench-results"),
    show_default=True,
    help="Directory for results.json, results.md and the plots.",
)
@click.option("--repeats", type=int, default=None, help="Fan-out runs per size (median kept).")
@click.option("--streams", type=int, default=None, help="Streams in the idle scenario.")
@click.option(
    "--scaling",
    is_flag=True,
    help="Also run the cost benchmarks: the bridge and Redis (bench/bridge_cost.py, redis_cost.py),"
    " serve --processes 2 against one process (serve_cost.py) and the connect CPU against the"
    " empty Tornado handler, interleaved (connect_cost.py).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Override a field of the plan (repeatable), e.g. fanout_subscribers=100,1000 or "
    "latency_duration=5; see tornado_sse.bench.harness.Plan.",
)
@click.pass_context
def bench_command(
    ctx: click.Context,
    quick: bool,
    scenarios: tuple[str, ...],
    peers: str | None,
    out: Path,
    repeats: int | None,
    streams: int | None,
    scaling: bool,
    overrides: tuple[str, ...],
) -> None:
    """Benchmark tornado_sse beside other SSE servers on this machine.

    Each server runs in its own process pinned to one core, the load generator on the other;
    events carry their publish time and a sequence number so every client checks latency,
    loss, duplication and order. Writes JSON, a markdown table and plots (with matplotlib).
    ``tornado-sse bench storm`` runs the restart storm instead.
    """
    if ctx.invoked_subcommand is not None:
        return
    plan = Plan.quick() if quick else Plan()
    if repeats is not None:
        plan.fanout_repeats = max(1, repeats)
    if streams is not None:
        plan.idle_streams = max(1, streams)
    for item in overrides:
        _override(plan, item)
    names = _peer_names(peers)
    if quick and not peers:
        names.remove("tornado_sse_uvloop")  # a variant; --peers brings it back
    chosen = [PEERS[name] for name in names]
    wanted = [name for name in SCENARIOS if not scenarios or name in scenarios]
    server_core, client_core = cores()
    if server_core is None:
        click.echo("warning: fewer than 2 cores; server and load generator share them", err=True)
    total = steps(plan, wanted) * len(chosen)
    started = time.monotonic()
    with click.progressbar(
        length=total,
        label="bench",
        show_eta=True,
        item_show_func=lambda item: item,
        file=sys.stderr,
    ) as bar:
        state: dict[str, Any] = {"label": None}

        def advance(count: int) -> None:
            bar.update(count, state["label"])

        def describe(label: str) -> None:
            state["label"] = label
            bar.update(0, label)

        results = asyncio.run(
            run_peers(chosen, wanted, plan, Progress(advance=advance, describe=describe))
        )
    scaling_results: dict[str, Any] = {}
    if scaling:
        out.mkdir(parents=True, exist_ok=True)
        for name, (module, args, quick_args) in SCALING.items():
            click.echo(f"running {module} ...", err=True)
            scaling_results[name] = _run_scaling(module, args, quick_args, quick, out)
    data = {
        "command": _command_line(
            quick, scenarios, peers, out, repeats, streams, scaling, overrides
        ),
        "environment": report.environment(),
        "placement": {
            "server": sorted(server_core) if server_core else "any",
            "clients": sorted(client_core) if client_core else "any",
        },
        "plan": asdict(plan),
        "scenarios": wanted,
        "elapsed_s": time.monotonic() - started,
        "results": results,
        "scaling": scaling_results,
    }
    written = report.write(data, out)
    click.echo(report.markdown(data))
    for path in written:
        click.echo(f"wrote {path}", err=True)


def _cases(value: str) -> list[str]:
    from .storm import CASES

    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in CASES]
    if unknown or not names:
        raise click.BadParameter(
            f"unknown case(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(CASES)}"
        )
    return names


@bench_command.command(name="storm")
@click.option(
    "--streams",
    type=click.IntRange(1, 100_000),
    default=10_000,
    show_default=True,
    help="Streams open during the storm.",
)
@click.option(
    "--cases",
    default="a,b,b-hub,c",
    show_default=True,
    help="Comma-separated cases: a (one hub SIGTERMed and started again), b (one worker of "
    "--processes 2 killed with kill -9), b-hub (the worker running the hub), c (two --redis "
    "hubs, one SIGTERMed).",
)
@click.option(
    "--channels", type=click.IntRange(1), default=100, show_default=True, help="Channels."
)
@click.option(
    "--rate",
    type=click.FloatRange(0.1, 10_000),
    default=100.0,
    show_default=True,
    help="Events per second published, over all channels.",
)
@click.option(
    "--retry", type=click.IntRange(1), default=3000, show_default=True, help="The hubs' --retry."
)
@click.option(
    "--drain",
    type=click.FloatRange(0, 60),
    default=2.0,
    show_default=True,
    help="The hubs' --drain.",
)
@click.option(
    "--steady",
    type=click.FloatRange(0.1, 600),
    default=3.0,
    show_default=True,
    help="Seconds of steady state measured before the storm.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    help="Load generator processes.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench-results"),
    show_default=True,
    help="Directory for storm.json, storm.md and storm-logs/ (the hubs' logs).",
)
def storm_command(
    streams: int,
    cases: str,
    channels: int,
    rate: float,
    retry: int,
    drain: float,
    steady: float,
    workers: int,
    out: Path,
) -> None:
    """The restart storm: streams open while events flow, then a hub goes away.

    Browser-like clients (retry:, then Last-Event-ID) count per stream the events lost,
    duplicated, reordered and missed after a stream-reset; the report gives the time until
    every stream is back, the latency in the storm against the steady state and the spread of
    the reconnects. See docs/benchmarks.md.
    """
    from .storm import StormPlan, run_storm

    names = _cases(cases)
    plan = StormPlan(
        streams=streams,
        channels=min(channels, streams),
        rate=rate,
        retry=retry,
        drain=drain,
        steady=steady,
        workers=workers,
    )
    server_core, client_core = cores()
    if server_core is None:
        click.echo("warning: fewer than 2 cores; hubs and load generator share them", err=True)
    argv = ["tornado-sse", "bench", "storm", "--streams", str(streams), "--cases", cases]
    argv += ["--channels", str(channels), "--rate", f"{rate:g}", "--retry", str(retry)]
    argv += ["--drain", f"{drain:g}", "--steady", f"{steady:g}", "--workers", str(workers)]
    argv += ["--out", str(out)]
    started = time.monotonic()
    logs = out / "storm-logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    results = asyncio.run(run_storm(plan, names, logs))
    data = {
        "command": shlex.join(argv),
        "environment": report.environment(),
        "placement": {
            "server": sorted(server_core) if server_core else "any",
            "clients": sorted(client_core) if client_core else "any",
        },
        "plan": asdict(plan),
        "elapsed_s": time.monotonic() - started,
        "cases": results,
    }
    written = report.write_storm(data, out)
    click.echo(report.storm_markdown(data))
    for path in written:
        click.echo(f"wrote {path}", err=True)
    if any(row.get("status") != "ok" for row in results.values()):
        raise click.ClickException("a case did not run: see its status above")
