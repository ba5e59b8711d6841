"""The benchmark harness end to end, tiny: real server processes, real load generator workers.

Speed is not asserted here (that is what the benchmark reports); what is asserted is that the
harness runs, measures, and that every event reached every client once and in order.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the benchmark reads /proc"
)


def _tiny_plan():  # type: ignore[no-untyped-def]
    from tornado_sse.bench.harness import Plan

    return Plan(
        idle_streams=50,
        idle_window=0.2,
        fanout_subscribers=(20,),
        fanout_deliveries=2_000,
        fanout_seconds=0.2,
        fanout_repeats=1,
        latency_subscribers=20,
        latency_rate=50.0,
        latency_duration=0.5,
        churn_steady=10,
        churn_clients=5,
        churn_rate=50.0,
        churn_duration=0.6,
        churn_life=(0.05, 0.2),
        slow_subscribers=4,
        slow_events=3_000,
        slow_size=4_096,
        heartbeat=15.0,
        workers=2,
    )


@pytest.mark.timeout(60)
def test_every_event_reaches_every_client_once_in_order() -> None:
    from tornado_sse.bench.harness import PEERS, Progress, run_peers
    from tornado_sse.bench.report import integrity

    steps: list[int] = []
    results = asyncio.run(
        run_peers(
            [PEERS["floor"], PEERS["tornado_sse"]],
            ["idle", "fanout", "latency", "churn", "slow"],
            _tiny_plan(),
            Progress(advance=steps.append),
        )
    )
    assert sum(steps) > 0
    for name in ("floor", "tornado_sse"):
        peer = results[name]
        assert peer["status"] == "ok", peer
        for scenario in ("idle", "fanout", "latency", "churn", "slow"):
            assert "error" not in peer[scenario], (name, scenario, peer[scenario])
        fanout = peer["fanout"]["20"]
        assert fanout["subscribers"] == 20
        assert fanout["deliveries"] == fanout["expected"] > 0
        assert fanout["cpu_us_per_delivery"] is not None
        latency = peer["latency"]
        assert latency["deliveries"] == latency["expected"] == 20 * latency["events"]
        assert latency["latency_ms"]["samples"] == latency["deliveries"]
        assert peer["idle"]["streams"] == 50
        assert peer["churn"]["churners"]["cycles"] > 0
        assert peer["churn"]["steady"]["deliveries"] == peer["churn"]["steady"]["expected"]
    # 12 MB for each client that stopped reading, more than the kernel's socket buffers take:
    # tornado_sse cuts both off at its 1 MiB bound, the floor holds everything
    assert results["tornado_sse"]["slow"]["stalled"] == 2
    assert results["tornado_sse"]["slow"]["stalled_cut_off"] == 2
    assert results["floor"]["slow"]["stalled_cut_off"] == 0
    assert integrity(results) == {
        name: {"lost": 0, "duplicated": 0, "reordered": 0, "dropped": 0}
        for name in ("floor", "tornado_sse")
    }


@pytest.mark.timeout(60)
def test_bench_command_writes_json_and_markdown(tmp_path: Path) -> None:
    from tornado_sse.bench.cli import bench_command

    result = CliRunner().invoke(
        bench_command,
        [
            "--quick",
            "--scenario",
            "fanout",
            "--peers",
            "tornado_sse,nchan",
            "--set",
            "fanout_subscribers=20",
            "--set",
            "fanout_seconds=0.2",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["command"].startswith("tornado-sse bench --quick --scenario fanout")
    assert data["results"]["tornado_sse"]["fanout"]["20"]["lost"] == 0
    assert data["environment"]["versions"]["tornado"]
    markdown = (tmp_path / "results.md").read_text()
    assert "| tornado_sse (in-process broker) |" in markdown
    # Nchan either ran or is reported as not installed, never a crash
    nchan = data["results"]["nchan"]
    assert nchan["status"] == "ok" or nchan["status"].startswith("not installed"), nchan


@pytest.mark.timeout(90)
def test_bench_runs_the_bridge_and_redis_variants_and_the_reference_peers(tmp_path: Path) -> None:
    """tornado_sse over the bridge and with Redis (a redis-server of its own) in the same run as
    the others, and the empty Tornado handler in the idle scenario only."""
    from tornado_sse.bench.cli import bench_command

    peers = "tornado_sse_bridge,tornado_sse_redis,tornado_empty"
    result = CliRunner().invoke(
        bench_command,
        [
            *("--quick", "--scenario", "fanout", "--scenario", "idle", "--peers", peers),
            *("--set", "fanout_subscribers=20", "--set", "fanout_seconds=0.2"),
            *("--set", "idle_streams=30", "--set", "idle_window=0.2"),
            *("--out", str(tmp_path)),
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    for name in ("tornado_sse_bridge", "tornado_sse_redis"):
        assert results[name]["status"] == "ok", results[name]
        run = results[name]["fanout"]["20"]
        assert run["lost"] == run["duplicated"] == run["reordered"] == 0, run
        assert run["deliveries_per_s"] > 0
        assert results[name]["idle"]["streams"] == 30
    empty = results["tornado_empty"]
    assert empty["status"] == "ok" and empty["scenarios"] == ["idle"], empty
    assert "fanout" not in empty and empty["idle"]["streams"] == 30
    assert empty["idle"]["connect_gc_s"] is not None
    markdown = (tmp_path / "results.md").read_text()
    fanout_table = markdown.split("### Fan-out")[1].split("###")[0]
    assert "tornado_sse with Redis" in fanout_table and "empty Tornado" not in fanout_table
    assert "empty Tornado handler" in markdown.split("### Idle")[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--peers", "floor,bogus"], "unknown peer(s) bogus"),
        (["--set", "nonsense=1"], "expected FIELD=VALUE"),
        (["--set", "fanout_subscribers=ten"], "fanout_subscribers=ten"),
    ],
)
def test_bench_command_rejects_bad_options(args: list[str], message: str) -> None:
    from tornado_sse.bench.cli import bench_command

    result = CliRunner().invoke(bench_command, args)
    assert result.exit_code == 2
    assert message in result.output


def test_presence_cost_measures_every_broker_on_and_off(tmp_path: Path) -> None:
    """bench/presence_cost.py with a real bridge hub and a real redis-server (issue 14)."""
    import subprocess

    out = tmp_path / "presence.json"
    command = [sys.executable, "-m", "tornado_sse.bench.presence_cost"]
    done = subprocess.run(
        [*command, "--streams", "30", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert [(row["broker"], row["presence"]) for row in rows] == [
        (broker, state) for broker in ("memory", "bridge", "redis") for state in ("off", "on")
    ]
    redis_off, redis_on = rows[4], rows[5]
    # presence is paid for on connect and close only: a few more Redis commands each
    assert (
        redis_on["redis_commands_per_connect_close"] > redis_off["redis_commands_per_connect_close"]
    )
    assert "| redis | on |" in done.stdout


@pytest.mark.timeout(120)
def test_connect_cost_compares_the_hub_with_the_empty_handler(tmp_path: Path) -> None:
    """bench/connect_cost.py (issue 15, item 2): the peers take turns, every stream connects,
    each ratio is taken to the first peer (here the empty handler, then the real hub)."""
    import subprocess

    out = tmp_path / "connect.json"
    peers = "tornado_empty,tornado_sse_hub"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "tornado_sse.bench.connect_cost"),
            *("--streams", "60", "--rounds", "1", "--peers", peers, "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [row["peer"] for row in result["summary"]] == peers.split(",")
    assert result["summary"][0]["ratios"] == [1.0]
    for run in (run for round_ in result["rounds"] for run in round_):
        assert run["streams"] == 60 and run["seen"], run
        assert run["server_cpu_s"] > 0
    assert "| tornado-sse serve (the hub's" in done.stdout


@pytest.mark.timeout(120)
def test_connect_cost_counts_instructions_under_callgrind(tmp_path: Path) -> None:
    """``connect_cost --instructions``: the server runs under valgrind's callgrind, and the
    instructions from the first connect to the last stream counted are read from its dump."""
    import subprocess

    out = tmp_path / "instructions.json"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "tornado_sse.bench.connect_cost", "--instructions"),
            *("--streams", "10", "--peers", "tornado_sse_hub_nogc", "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(out.read_text())["results"]
    assert row["peer"] == "tornado_sse_hub_nogc" and row["streams"] == 10
    # a connect runs hundreds of thousands of instructions (about a million in this hub)
    assert 100_000 < row["per_stream"] < 10_000_000, row
    assert "| tornado-sse serve, cyclic GC off |" in done.stdout


@pytest.mark.timeout(120)
def test_serve_cost_sums_every_process_of_the_group(tmp_path: Path) -> None:
    """bench/serve_cost.py (issue 15, item 5): the real serve, one process and two; every
    event reaches every subscriber once and in order in both."""
    import subprocess

    out = tmp_path / "serve.json"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "tornado_sse.bench.serve_cost"),
            *("--subscribers", "40", "--events", "30", "--rounds", "1", "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    runs = result["rounds"][0]
    assert set(runs) == {"1", "2"}
    for run in runs.values():
        assert run["deliveries"] == 40 * 30, run
        assert run["lost"] == run["duplicated"] == run["reordered"] == 0, run
        assert run["server_cpu_s"] > 0
    assert result["ratios"][0] > 0
    assert "| --processes 2 |" in done.stdout


def test_redis_shards_measures_each_shard_and_a_one_shard_hub(tmp_path: Path) -> None:
    """bench/redis_shards.py (issue 17) with three real redis-servers, tiny: every event is
    delivered (it fails otherwise), each shard is measured, and a hub that follows channels of
    shard 0 only makes the other shards run (almost) nothing."""
    import subprocess

    out = tmp_path / "shards.json"
    command = [sys.executable, "-m", "tornado_sse.bench.redis_shards", "--events", "90"]
    done = subprocess.run(
        [*command, "--channels", "12", "--repeat", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    rows = results["sharded"]
    assert [row["shards"] for row in rows] == [1, 2, 3]
    for row in rows:
        shards = row["runs"][0]["shards"]
        assert len(shards) == row["shards"]
        assert sum(shard["events"] for shard in shards) == 90 * row["shards"]
        assert all(shard["commands_per_event"] > 1 for shard in shards if shard["events"])
    ((one, two, three),) = results["one_shard_hub"]
    assert one["commands"] >= 30  # a publish script per event, and the reads
    assert two["commands"] <= 5 and three["commands"] <= 5  # an idle reader's XREAD at most
    assert "| 3 |" in done.stdout


def test_ratelimit_cost_reports_takes_and_bytes_per_bucket(tmp_path: Path) -> None:
    """bench/ratelimit_cost.py (issue 20): churn leaves a small table; max_keys bounds memory."""
    import subprocess

    out = tmp_path / "ratelimit.json"
    command = [sys.executable, "-m", "tornado_sse.bench.ratelimit_cost"]
    done = subprocess.run(
        [*command, "--takes", "2000", "--keys", "1000", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["hot"]["ns_per_take"] > 0
    assert results["churn"]["table_at_end"] <= 110  # of 2,000 addresses seen
    assert results["memory"]["unbounded"]["table"] == 1000
    assert results["memory"]["max_keys_tenth"]["table"] == 100
    assert results["memory"]["max_keys_tenth"]["bytes"] < results["memory"]["unbounded"]["bytes"]


@pytest.mark.timeout(90)
def test_storm_brings_every_stream_back_and_loses_nothing_history_covers(tmp_path: Path) -> None:
    """``tornado-sse bench storm`` with 50 streams, every case (issue 15, item 3): real hubs
    SIGTERMed and killed, browser-like clients reconnecting. Every stream comes back and catches
    up; nothing is lost, duplicated or reordered without a ``stream-reset`` saying so; where
    history survives (another worker, Redis) there is no ``stream-reset`` at all."""
    from tornado_sse.bench.cli import bench_command

    from tests.redis_server import redis_server_path

    redis_server_path()  # case c: skips locally without redis-server, fails under CI
    result = CliRunner().invoke(
        bench_command,
        [
            *("storm", "--streams", "50", "--channels", "5", "--rate", "50"),
            *("--retry", "300", "--drain", "0.3", "--steady", "0.5", "--out", str(tmp_path)),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "storm.json").read_text())
    cases = data["cases"]
    assert list(cases) == ["a", "b", "b-hub", "c"]
    for name, case in cases.items():
        assert case["status"] == "ok", (name, case)
        assert case["connected"] == case["streams"] == 50, (name, case)
        assert case["down_at_start"] == case["behind_at_end"] == 0, (name, case)
        assert case["lost"] == case["duplicated"] == case["reordered"] == 0, (name, case)
        assert case["streams_closed"] > 0 and case["all_back_s"] > 0, (name, case)
        assert case["latency_storm_ms"]["samples"] > 0, (name, case)
        # each stream waited the jittered retry: it held (300 to 450 ms) before reconnecting
        assert 300 <= case["retry_ms"]["min"] <= case["retry_ms"]["max"] <= 450, (name, case)
        assert case["reconnect_delay_s"]["min"] >= 0.3, (name, case)
    # history survived: every resume exact, what was missed replayed
    for name in ("b", "c"):
        assert cases[name]["stream_resets"] == cases[name]["missed_after_reset"] == 0, cases[name]
        assert cases[name]["replayed"] > 0, cases[name]
    assert 0 < cases["b"]["streams_closed"] < 50  # only the killed worker's streams
    assert cases["c"]["failed_connects"] >= cases["c"]["streams_closed"] > 0  # failed over
    # history died with the hub (in-process; the bridge's hub): every stream told so
    assert cases["a"]["streams_closed"] == cases["a"]["streams_reset"] == 50
    assert cases["b-hub"]["streams_reset"] == 50
    markdown = (tmp_path / "storm.md").read_text()
    assert "| c: two `--redis` hubs" in markdown
    assert data["command"].startswith("tornado-sse bench storm --streams 50")


def test_storm_rejects_an_unknown_case() -> None:
    from tornado_sse.bench.cli import bench_command

    result = CliRunner().invoke(bench_command, ["storm", "--cases", "a,z"])
    assert result.exit_code == 2
    assert "unknown case(s) z" in result.output
