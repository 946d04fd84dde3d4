"""`moe-serve run` as a subprocess: its output read line by line, waited on for a banner."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


class RunProcess:
    """A started `moe-serve run` whose merged stdout/stderr lines are queued as they come."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "moe_serve.deploy.cli", "run", *args]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str, timeout_s: float) -> str:
        """The first line containing `text`; fails with the recent output if none comes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.log.append(line)
            if text in line:
                return line
        pytest.fail(f"{text!r} never printed:\n{''.join(self.log[-40:])}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def private_env() -> dict[str, str]:
    """This environment without RAY_ADDRESS (`moe-serve run` starts its own Ray) nor an API
    key (each test says whether it wants one)."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MOE_SERVE_API_KEY")}


@contextmanager
def served(config: Path, timeout_s: float = 300) -> Iterator[RunProcess]:
    """`moe-serve run --config config`, ready; stopped (SIGTERM) on exit."""
    run = RunProcess(["--config", str(config)], env=private_env())
    try:
        run.wait_for("ready in", timeout_s)
        yield run
    finally:
        run.stop()
