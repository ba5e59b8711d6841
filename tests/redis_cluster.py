"""A real Redis Cluster for tests: three primaries and three replicas as plain child processes.

`RedisCluster` starts six ``redis-server --cluster-enabled yes`` processes side by side (each a
`RedisServer` with its own directory, port and cluster bus port, no persistence), joins them as
``redis-cli --cluster create ... --cluster-replicas 1`` would, with the same CLUSTER commands
(SET-CONFIG-EPOCH, ADDSLOTSRANGE, MEET, REPLICATE) but without its fixed one-second pause, and
waits, bounded and on conditions, until the cluster is usable: every node answers ``CLUSTER
INFO`` with ``cluster_state:ok`` and all 16384 slots assigned and ok, every node agrees on which
node owns each slot, and every replica's link to its primary is up. A test can `kill -9
<kill_primary>` the primary holding a slot and wait for its replica's promotion
(`wait_promoted`), start the killed node again (it rejoins as a replica), and find who owns a
slot now (`owner`).

``cluster-node-timeout`` is short (one second) so that a failover takes a few seconds, not the
default fifteen; ``repl-diskless-sync-delay`` is 0 so that a replica's first sync starts at
once, not after Redis's five-second wait for other replicas to share it. Under ``CI=true`` a
cluster that cannot start fails the test; locally a missing ``redis-server`` skips it.

The session shares one cluster, the ``redis_cluster`` fixture of ``tests/conftest.py`` (a
fixture imported into a test module would be one cluster per module); tests keep apart by key
prefix (`tests.redis_server.redis_prefix`). A test that kills nodes or moves slots makes its own
`RedisCluster` (with ``tmp_path``), so the shared one stays whole.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.helpers import free_port
from tests.redis_server import RedisServer

#: seconds the cluster may take to form, or a replica to take over
CLUSTER_TIMEOUT = 30.0
#: ``cluster-node-timeout`` of the test cluster, milliseconds
NODE_TIMEOUT_MS = 1000
SLOTS = 16384


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisCluster:
    """A local Redis Cluster of *primaries* primaries with *replicas* replicas each.

    :param directory: where each node gets a directory of its own (``nodes.conf``, log).
    """

    def __init__(self, directory: Path, *, primaries: int = 3, replicas: int = 1) -> None:
        self.directory = directory
        self.primaries = primaries
        self.replicas = replicas
        self.nodes: list[RedisServer] = []
        #: the cluster bus port of each node, by its port
        self.bus_ports: dict[int, int] = {}

    # ------------------------------------------------------------------ start and stop

    def start(self) -> None:
        """Start every node, create the cluster, wait until it is usable (bounded)."""
        count = self.primaries * (1 + self.replicas)
        try:
            # Each node waits for its own PING: start them side by side.
            with ThreadPoolExecutor(count) as pool:
                starting = [pool.submit(self._start_node, n) for n in range(count)]
            # every start has ended: keep those that worked (for stop), then raise if one failed
            self.nodes = [future.result() for future in starting if future.exception() is None]
            for future in starting:
                future.result()
            self._create()
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    def _create(self) -> None:
        """Make the nodes one cluster, as ``redis-cli --cluster create ... --cluster-replicas``
        does (without its fixed one-second wait for the join): a config epoch of its own to
        each node, an equal range of slots to each primary, every node met, then each replica
        told its primary."""
        primaries = self.nodes[: self.primaries]
        for epoch, node in enumerate(self.nodes, start=1):
            node.call("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for n, node in enumerate(primaries):
            first, end = n * SLOTS // self.primaries, (n + 1) * SLOTS // self.primaries
            node.call("CLUSTER", "ADDSLOTSRANGE", first, end - 1)
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            node.call("CLUSTER", "MEET", "127.0.0.1", seed.port, self.bus_ports[seed.port])
        self._wait_for(self._unmet, "the nodes did not meet")
        ids = [self.node_id(node) for node in primaries]
        for n, node in enumerate(self.nodes[self.primaries :]):
            node.call("CLUSTER", "REPLICATE", ids[n // self.replicas])

    def _unmet(self) -> str | None:
        """A node that does not know every other node yet (or is still in handshake), or None."""
        for node in self.nodes:
            known = [
                line
                for line in _text(node.call("CLUSTER", "NODES")).splitlines()
                if line.strip() and "handshake" not in line.split()[2]
            ]
            if len(known) != len(self.nodes):
                return f"node {node.port} knows {len(known)} of {len(self.nodes)} nodes"
        return None

    def _start_node(self, n: int) -> RedisServer:
        directory = self.directory / f"node{n}"
        directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            node = RedisServer(directory)
            # The port and the cluster bus port are both fixed before the start: RedisServer
            # retries the same port a few times, and a bus port taken in between fails the start.
            node.port = free_port()
            bus = free_port()
            node.args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
                "--cluster-port",
                str(bus),
                # a replica's full sync starts at once (Redis waits 5 s for more replicas to
                # share a diskless transfer: the cluster was not usable for 5 s)
                "--repl-diskless-sync-delay",
                "0",
            ]
            try:
                node.start()
            except RuntimeError:
                (directory / "nodes.conf").unlink(missing_ok=True)
                continue
            self.bus_ports[node.port] = bus
            return node
        raise RuntimeError(f"cluster node {n} did not start")

    def stop(self) -> None:
        """Stop every node this cluster started, side by side (a primary stopping alone waits
        for its replicas to acknowledge its writes). Idempotent."""
        if self.nodes:
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                stopping = [pool.submit(node.stop) for node in self.nodes]
            for future in stopping:
                future.result()

    def __enter__(self) -> RedisCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ what the cluster says

    @property
    def live(self) -> list[RedisServer]:
        """The nodes whose process runs."""
        return [node for node in self.nodes if node.process is not None]

    @property
    def url(self) -> str:
        """The URL of one live node (any node will do for a cluster client)."""
        return self.live[0].url

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.live]

    def owner(self, slot: int) -> RedisServer:
        """The live primary that owns *slot*, as the first live node sees it."""
        for start, end, primary, *_ in self._slots(self.live[0]):
            if int(start) <= slot <= int(end):
                port = int(primary[1])
                for node in self.live:
                    if node.port == port:
                        return node
                raise RuntimeError(f"slot {slot} is owned by {port}, which is not running")
        raise RuntimeError(f"slot {slot} is not served")

    def _slots(self, node: RedisServer) -> list[list[object]]:
        reply = node.call("CLUSTER", "SLOTS")
        assert isinstance(reply, list)
        return reply

    def keyslot(self, key: str) -> int:
        reply = self.live[0].call("CLUSTER", "KEYSLOT", key)
        assert isinstance(reply, int)
        return reply

    def _problem(self) -> str | None:
        """What keeps the cluster from being usable now, or None."""
        maps = []
        for node in self.live:
            try:
                info = _text(node.call("CLUSTER", "INFO"))
                fields = dict(
                    line.split(":", 1) for line in info.splitlines() if ":" in line.strip()
                )
                if fields.get("cluster_state", "").strip() != "ok":
                    return f"node {node.port}: cluster_state {fields.get('cluster_state')}"
                for field in ("cluster_slots_assigned", "cluster_slots_ok"):
                    if fields.get(field, "").strip() != str(SLOTS):
                        return f"node {node.port}: {field} {fields.get(field)}"
                replication = node.info("replication")
                if replication.get("role") == "slave":
                    if replication.get("master_link_status") != "up":
                        return f"replica {node.port}: link to its primary down"
                slots = self._slots(node)
                maps.append({int(entry[0]): int(entry[2][1]) for entry in slots})
            except Exception as exc:  # a node still starting or being told of a change
                return f"node {node.port}: {exc}"
        if any(other != maps[0] for other in maps[1:]):
            return "nodes disagree on the slot owners"
        live_ports = {node.port for node in self.live}
        if not set(maps[0].values()) <= live_ports:
            return "a slot is still owned by a node that is not running"
        return None

    def wait_ok(self, timeout: float = CLUSTER_TIMEOUT) -> None:
        """Wait (bounded) until every live node says the cluster is ok, every slot is covered
        by a running primary, the nodes agree on the owners and the replicas are linked."""
        self._wait_for(self._problem, "redis cluster not usable", timeout)

    def _wait_for(
        self, problem: Callable[[], str | None], what: str, timeout: float = CLUSTER_TIMEOUT
    ) -> None:
        """Wait (bounded) until *problem* says None; raise with *what* and its last word."""
        deadline = time.monotonic() + timeout
        while True:
            now = problem()
            if now is None:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} within {timeout}s: {now}")
            time.sleep(0.02)

    # ------------------------------------------------------------------ faults

    def kill_primary(self, slot: int) -> RedisServer:
        """``kill -9`` the primary that owns *slot* now; return it (stopped)."""
        node = self.owner(slot)
        node.kill()
        return node

    def wait_promoted(self, slot: int, old: RedisServer) -> RedisServer:
        """After `kill_primary`: wait (bounded) until another node owns *slot* and the cluster
        is ok again; return the new owner."""
        deadline = time.monotonic() + CLUSTER_TIMEOUT
        while True:
            try:
                owner = self.owner(slot)
                if owner is not old:
                    break
            except RuntimeError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica took over slot {slot} within {CLUSTER_TIMEOUT}s")
            time.sleep(0.02)
        self.wait_ok(max(1.0, deadline - time.monotonic()))
        return owner

    def node_id(self, node: RedisServer) -> str:
        return _text(node.call("CLUSTER", "MYID"))

    def replicas_of(self, primary: RedisServer) -> list[RedisServer]:
        """The live replicas of *primary*."""
        found = []
        for node in self.live:
            replication = node.info("replication")
            if replication.get("role") == "slave" and replication["master_port"] == str(
                primary.port
            ):
                found.append(node)
        return found

    def pause(self, node: RedisServer) -> None:
        """SIGSTOP *node*: it holds its data and connections but answers nothing (a replica
        paused this way misses the writes its primary acknowledges meanwhile)."""
        assert node.process is not None
        node.process.send_signal(signal.SIGSTOP)

    def resume(self, node: RedisServer) -> None:
        """SIGCONT a node `pause` stopped."""
        assert node.process is not None
        node.process.send_signal(signal.SIGCONT)

    def move_slot(self, slot: int, target: RedisServer, batch: int = 10) -> None:
        """Migrate *slot* to the primary *target*, as ``redis-cli --cluster reshard`` does for
        each slot it moves: ``IMPORTING`` on the target, ``MIGRATING`` on the owner, ``MIGRATE``
        of its keys *batch* at a time, then ``SETSLOT ... NODE`` on every node. (redis-cli
        picks which slots to move; a test needs to move one shard's slot.)"""
        source = self.owner(slot)
        source_id, target_id = self.node_id(source), self.node_id(target)
        target.call("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.call("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while True:
            keys = source.call("CLUSTER", "GETKEYSINSLOT", slot, batch)
            assert isinstance(keys, list)
            if not keys:
                break
            source.call("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        for node in (target, source, *self.live):
            if node.info("replication").get("role") == "master":
                node.call("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.wait_ok()

    def restart(self, node: RedisServer) -> None:
        """Start a killed node again on its ports; it rejoins (as a replica, if it was
        replaced) and the cluster is waited for."""
        node.start()
        self.wait_ok()
