"""`moe-serve run` as users start it: serves, then SIGTERM shuts its whole Ray down cleanly."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.conftest import free_port

pytestmark = pytest.mark.slow
RAY_TMP = Path("/tmp/ray")


def _session_processes(session: str) -> list[str]:
    """Command lines of live processes started for one Ray session."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().split()[2]
        except (OSError, IndexError):  # NOTE: the process ended meanwhile
            continue
        if session in cmdline and state != "Z":
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def _wait_for(lines: queue.Queue, text: str, log: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        log.append(line)
        if text in line:
            return
    pytest.fail(f"{text!r} never printed:\n{''.join(log[-40:])}")


def test_run_serves_then_sigterm_leaves_no_process(tiny_dirs, tmp_path):
    http_port, grpc_port = free_port(), free_port()
    config = tmp_path / "serve.yaml"
    model = {
        "name": "m",
        "source": str(tiny_dirs["olmoe"]),
        "device": "cpu",
        "expert_parallel_size": 2,
        "resources": {"replica_cpus": 0.25, "shard_cpus": 0.25},
    }
    config.write_text(
        yaml.safe_dump(
            {"http": {"port": http_port}, "grpc": {"port": grpc_port}, "models": [model]}
        )
    )
    sessions_before = set(RAY_TMP.glob("session_2*"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "deploy.cli", "run", "--config", str(config)]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    log: list[str] = []
    try:
        _wait_for(lines, "ready in", log, timeout_s=300)
        (session,) = set(RAY_TMP.glob("session_2*")) - sessions_before
        base = f"http://127.0.0.1:{http_port}"
        assert httpx.get(f"{base}/health", timeout=30).json()["models"] == ["m"]
        body = {"model": "m", "prompt": "hi", "max_tokens": 3}
        done = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
        assert done["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        _wait_for(lines, "shutting down", log, timeout_s=5)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 60  # NOTE: Ray's processes exit on their own once told to
    while _session_processes(session.name) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _session_processes(session.name) == []
