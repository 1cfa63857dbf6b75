"""A real three-master Redis Cluster on loopback, for the tests that need one.

Three ``redis-server --cluster-enabled yes`` processes in a temporary folder,
each on a free port (and its cluster bus port, the port + 10000, free too),
joined with ``redis-cli --cluster create``. Nothing is persisted; the
processes are terminated when the session ends.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

#: Masters in the test cluster (the fewest ``redis-cli --cluster create`` accepts).
MASTERS = 3
#: Seconds the cluster may take to come up before the fixture fails.
START_WITHIN = 30.0


def cluster_tools_missing() -> str | None:
    """Why a cluster cannot be started here, or None when the binaries are present."""
    missing = [name for name in ("redis-server", "redis-cli") if shutil.which(name) is None]
    return f"{' and '.join(missing)} not on PATH" if missing else None


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Ports whose cluster bus port (port + 10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10000 < 65536 and port not in ports and _port_free(port + 10000):
            ports.append(port)
    return ports


def _cluster_ok(port: int) -> bool:
    info = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "cluster", "info"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    ).stdout
    return "cluster_state:ok" in info


@contextlib.contextmanager
def running_cluster(folder: Path) -> Iterator[list[int]]:
    """Start a three-master cluster in ``folder``; yields the masters' ports.

    Raises:
        RuntimeError: The cluster did not come up within :data:`START_WITHIN` seconds
            (the servers' log files in ``folder`` say why).
    """
    ports = _free_ports(MASTERS)
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            node = folder / str(port)
            node.mkdir()
            servers.append(
                subprocess.Popen(
                    [
                        "redis-server",
                        "--port", str(port),
                        "--bind", "127.0.0.1",
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", str(node / "nodes.conf"),
                        "--cluster-node-timeout", "5000",
                        "--dir", str(node),
                        "--save", "",
                        "--appendonly", "no",
                        "--logfile", str(node / "redis.log"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        deadline = time.monotonic() + START_WITHIN
        for port in ports:
            while _port_free(port):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not listen on {port}; see {folder}")
                time.sleep(0.05)
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=START_WITHIN,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-500:]}{created.stderr}")
        while not all(_cluster_ok(p) for p in ports):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not reach cluster_state:ok; see {folder}")
            time.sleep(0.1)
        yield ports
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
