"""`moe-serve bench profile`'s reading of py-spy samples: what each sample is charged to."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from moe_serve.deploy.bench.profile import CpuMeter, cpu_seconds, read_samples, where

SITE = "/venv/lib/python3.11/site-packages"
STDLIB = "/usr/lib/python3.11"


def frame(function: str, path: str, line: int = 1) -> str:
    return f"{function} ({path}:{line})"


def test_samples_are_charged_to_the_innermost_frame_that_names_a_concern(tmp_path):
    loop = frame("BaseEventLoop._run_once", f"{STDLIB}/asyncio/base_events.py")
    waits = frame("Condition.wait", f"{STDLIB}/threading.py")
    forward = frame("Linear.forward", "/src/moe-serve/models/layers.py")
    torch_op = frame("_call_impl", f"{SITE}/torch/nn/modules/module.py")
    dumps = frame("JSONEncoder.encode", f"{STDLIB}/json/encoder.py")
    chunk = frame("chunk", "/src/moe-serve/deploy/openai_format.py")
    ray = frame("ObjectRefGenerator.__anext__", f"{SITE}/ray/_raylet.py")
    native = frame("Thread.run", f"{STDLIB}/threading.py")
    raw = tmp_path / "raw.txt"
    raw.write_text(
        f"{loop};{forward};{torch_op} 7\n"  # torch called from the model: the forward pass
        f"{loop};{chunk};{dumps} 3\n"  # json from our body builder: JSON
        f"{loop};{ray} 5\n"
        f"{native} 2\n"  # a thread in native code
        f"{loop};{waits} 40\n"  # waiting: left out
    )
    spots, concerns, kept = read_samples(raw)
    assert kept == 17
    assert concerns == {
        "model forward": 7,
        "JSON / SSE bodies": 3,
        "Ray calls, streams, serialization": 5,
        "native code on threads (Ray core, gRPC)": 2,
    }
    assert spots["torch"] == 7 and spots["ray"] == 5 and spots["stdlib:encoder"] == 3
    assert where(forward) == "models/layers.py"


def test_cpu_seconds_reads_a_process_cpu_time():
    busy = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
    proc = subprocess.Popen(
        [sys.executable, "-c", busy + "\nimport sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        used = 0.0
        while used < 0.5 and proc.poll() is None:
            used = cpu_seconds(proc.pid)
        assert 0.5 <= used < 5.0
    finally:
        proc.communicate(b"", timeout=30)
    assert cpu_seconds(os.getpid()) > 0


def test_cpu_meter_counts_this_process_cpu_since_it_was_made():
    meter, started = CpuMeter(), time.process_time()
    while time.process_time() - started < 0.3:  # NOTE: busy: CPU time, read by another clock
        pass
    spent = time.process_time() - started
    assert abs(meter.own_used() - spent) < 0.05
    assert set(meter.used()) == set(meter.roles)
