"""The local Ray head listens on loopback only: every TCP listener of its processes, workers
and a job's driver included, is on 127.0.0.0/8 or ::1."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from train_helpers import REPO

pytestmark = pytest.mark.slow

DASHBOARD_PORT, RAY_PORT = 8465, 6579
SCRIPT = str(REPO / "cluster" / "local_head.sh")
# The probe job: a task and an actor (worker processes with their own gRPC servers) stay up
# while the test looks; the driver itself is a core worker with a gRPC server too.
JOB = """
import pathlib, sys, time, ray

@ray.remote
class Holder:
    def ping(self):
        return 1

ray.init()
ray.get(ray.remote(lambda: 1).remote())
holder = Holder.remote()
ray.get(holder.ping.remote())
pathlib.Path(sys.argv[1]).write_text("ready")
time.sleep(300)
"""


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback address (``::ffff:127.0.0.1``)."""
    addr = ipaddress.ip_address(host.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def head_processes(sid: int) -> set[int]:
    """Pids of session ``sid`` (`start` gives the head a session of its own; Ray's workers keep
    it) and of all their descendants (a job's driver runs in a session of its own)."""
    pids = set()
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                pids.add(proc.pid)
                pids.update(child.pid for child in proc.children(recursive=True))
        except (ProcessLookupError, psutil.Error):
            continue
    return pids


def listeners(pids: set[int]) -> list[tuple[str, int, str]]:
    """(host, port, command line) of every listening TCP socket of ``pids``."""
    out = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                name = " ".join(psutil.Process(conn.pid).cmdline())[:100]
            except psutil.Error:
                name = "?"
            out.append((conn.laddr.ip, conn.laddr.port, name))
    return out


def alive(pids: set[int]) -> set[int]:
    """The ``pids`` that are still running (zombies count as gone)."""
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.Error:
            continue
    return out


def test_local_head_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items()  # nothing of an in-process Ray of this session
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(DASHBOARD_PORT=str(DASHBOARD_PORT), RAY_PORT=str(RAY_PORT), NUM_CPUS="2",
               START_TIMEOUT="150", RAY_AUTH_MODE="disabled")
    record = Path(os.environ.get("TMPDIR", "/tmp")) / (
        f"codebook-ray-head-{os.getuid()}-{RAY_PORT}.sid")
    ready = tmp_path / "ready"
    ray_cli = str(Path(sys.executable).parent / "ray")
    pids: set[int] = set()
    try:
        subprocess.run(["bash", SCRIPT, "start"], env=env, check=True, timeout=200)
        sid = int(record.read_text())
        probe = [sys.executable, "-c", JOB, str(ready)]
        submitted = subprocess.run([ray_cli, "job", "submit", "--no-wait", "--address",
                                    f"http://127.0.0.1:{DASHBOARD_PORT}", "--", *probe],
                                   env=env, timeout=120, capture_output=True, text=True)
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        deadline = time.time() + 150
        while not ready.exists():
            assert time.time() < deadline, "the probe job did not start its actor in 150 s"
            time.sleep(1)
        pids = head_processes(sid)
        found = listeners(pids)
        shown = "\n".join(map(str, found))
        ports = {port for _, port, _ in found}
        assert {RAY_PORT, DASHBOARD_PORT} <= ports, f"head not found in session {sid}:\n{shown}"
        # the probe's actor and its driver were looked at too, not only the head's daemons
        assert any(name.startswith("ray::Holder") for _, _, name in found), shown
        assert any(" -c " in name for _, _, name in found), shown
        exposed = [item for item in found if not is_loopback(item[0])]
        assert not exposed, "Ray head listens outside loopback:\n" + "\n".join(map(str, exposed))
    finally:
        subprocess.run(["bash", SCRIPT, "stop"], env=env, timeout=120)
    assert not record.exists()
    assert not alive(pids), f"`stop` left processes of the head running: {sorted(alive(pids))}"
