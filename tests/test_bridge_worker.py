"""Not tests: the worker process the bridge tests drive, and its test-side handle.

``python -m tests.test_bridge_worker PATH [--no-takeover] [--history-size N]`` starts a
`BridgeBroker` on PATH, prints one JSON line ``{"ready": ..., "pid": ..., "is_hub": ...}`` and then
answers one JSON command per stdin line with one JSON line on stdout. The file is named like the
bridge tests so that it belongs with them; it defines no tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from tornado_sse.broker.base import Frame, Subscription
from tornado_sse.broker.bridge import BridgeBroker
from tornado_sse.errors import BrokerError
from tornado_sse.protocol import parse

TIMEOUT = 15.0


class _Collector:
    def __init__(self) -> None:
        self.frames: list[Frame] = []

    def deliver(self, frame: Frame) -> None:
        self.frames.append(frame)


async def _serve(args: argparse.Namespace) -> None:
    broker = BridgeBroker(args.path, history_size=args.history_size, takeover=args.takeover)
    await broker.start()
    subs: dict[str, tuple[Subscription, _Collector]] = {}
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(value: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(value) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "pid": os.getpid(), "is_hub": broker.hub is not None})
    while True:
        line = await reader.readline()
        if not line:
            break
        command = json.loads(line)
        op = command["op"]
        try:
            if op == "subscribe":
                collector = _Collector()
                sub = await broker.subscribe(
                    command["channels"],
                    collector,
                    command.get("last_event_id"),
                    identity=command.get("identity"),
                    announce=command.get("announce", ()),
                    grace=command.get("grace", 3.0),
                )
                collector.frames.extend(sub.replay)
                replayed = len(sub.replay)
                sub.start()
                subs[command["name"]] = (sub, collector)
                reply({"position": sub.position, "reset": sub.reset, "replay": replayed})
            elif op == "events":
                _, collector = subs[command["name"]]
                events = [
                    [event.id, event.event, event.data]
                    for frame in collector.frames
                    for event in parse(frame.data)
                ]
                reply({"events": events})
            elif op == "unsubscribe":
                subs.pop(command["name"])[0].close(grace=command.get("grace"))
                reply({})
            elif op == "presence":
                found = await broker.presence(command["channel"])
                reply(
                    {
                        "subscribers": found.subscribers,
                        "users": dict(found.users),
                        "announced": sorted(found.announced),
                    }
                )
            elif op == "publish":
                event_id = await broker.publish(command["channel"], command["data"])
                reply({"id": event_id})
            elif op == "stats":
                hub = broker.hub
                reply(
                    {
                        "is_hub": hub is not None,
                        "hub_pid": broker.hub_pid,
                        "healthy": broker.healthy,
                        "resets": broker.resets,
                        "peers": hub.peer_count if hub is not None else None,
                    }
                )
            elif op == "exit":
                reply({})
                break
            else:
                reply({"error": f"unknown op {op}"})
        except BrokerError as exc:
            reply({"error": type(exc).__name__, "message": str(exc)})
    await broker.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--no-takeover", dest="takeover", action="store_false")
    parser.add_argument("--history-size", type=int, default=1000)
    asyncio.run(_serve(parser.parse_args()))


class Worker:
    """Test-side handle of one worker process."""

    def __init__(self, proc: asyncio.subprocess.Process, hello: dict[str, Any]) -> None:
        self.proc = proc
        self.pid: int = hello["pid"]
        self.started_as_hub: bool = hello["is_hub"]

    @classmethod
    async def start(cls, path: str, *args: str) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.test_bridge_worker",
            path,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            limit=1 << 24,
        )
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
        except BaseException:
            proc.kill()
            raise
        if not line:
            await proc.wait()
            raise AssertionError(f"worker exited with {proc.returncode} before it was ready")
        return cls(proc, json.loads(line))

    async def call(self, op: str, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise AssertionError(f"worker {self.pid} died (op {op})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def events(self, name: str) -> list[list[Any]]:
        answer = await self.call("events", name=name)
        events: list[list[Any]] = answer["events"]
        return events

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), TIMEOUT)


if __name__ == "__main__":
    main()
