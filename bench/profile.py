"""Profile one peer's server under load: where its CPU goes while idle or fanning out.

    python -m tornado_sse.bench.profile --peer tornado_sse --streams 1000 --mode fanout

Starts the peer and the load generator as the benchmark does, connects the streams, then runs
cProfile inside the server for a few seconds (while it publishes as fast as it goes in
``fanout`` mode, sits with heartbeats on in ``idle`` mode, or accepts the streams in ``connect``
mode) and prints the top functions.
Profiling slows every Python call, so read it for proportions, not absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

from .harness import PEERS, PeerRun, Plan, Progress, Server, Workers, cores


async def main(args: argparse.Namespace) -> None:
    peer = PEERS[args.peer]
    plan = Plan(heartbeat=args.heartbeat)
    server_core, client_core = cores()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runner = PeerRun(peer, plan, work, Progress(), server_core, client_core)
        runner.server = Server(peer, plan, server_core, work)
        runner.workers = Workers(plan.workers, client_core, work)
        runner.clients = list(range(plan.workers))
        runner.publisher = None
        await runner.workers.start()
        await runner.server.start()
        try:
            if args.mode == "census":
                before = await runner.server.control({"cmd": "census", "top": 60})
                await runner.server.control({"cmd": "tracemalloc", "start": True})
                await runner.connect(args.streams)
                await asyncio.sleep(0.5)
                after = await runner.server.control({"cmd": "census", "top": 60})
                traced = await runner.server.control({"cmd": "tracemalloc", "top": 40})
                print("\n".join(traced["top"]))
                was = {name: (n, size) for name, n, size in before["types"]}
                print(f"per stream, {args.streams} streams: type, objects, bytes (shallow)")
                for name, n, size in after["types"]:
                    n0, size0 = was.get(name, (0, 0))
                    if n - n0 >= args.streams // 2:
                        count = (n - n0) / args.streams
                        print(f"{name:40s} {count:6.2f} {(size - size0) / args.streams:8.0f}")
                return
            if args.mode != "connect":
                await runner.connect(args.streams)
            reader, writer = await asyncio.open_connection("127.0.0.1", runner.server.control_port)
            writer.write(json.dumps({"cmd": "profile", "seconds": args.seconds}).encode() + b"\n")
            if args.mode == "connect":
                await asyncio.sleep(0.2)
                print(await runner.connect(args.streams))
            elif args.mode == "fanout":
                await runner.start_publishing(0)
                await asyncio.sleep(args.seconds)
                await runner.stop_publishing()
            stats = json.loads(await reader.readline())["stats"]
            writer.close()
            print(stats)
        finally:
            await runner.workers.stop()
            await runner.server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peer", default="tornado_sse", choices=list(PEERS))
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--mode", choices=["idle", "fanout", "connect", "census"], default="fanout")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--heartbeat", type=float, default=5.0)
    asyncio.run(main(parser.parse_args()))
