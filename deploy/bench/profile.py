"""`moe-serve bench profile`: where the served path spends its CPU. Serves the bench checkpoint
on a private Ray instance, drives the benchmark load over HTTP, and meanwhile records every
process of the session with py-spy (Python frames, 100 Hz, without pausing them) and reads each
one's CPU time from /proc: CPU ms per generated token per process, and within each process the
share of samples by where the innermost frame runs."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from moe_serve.deploy.bench.online import Target, run_load, summarize
from moe_serve.deploy.bench.workload import Workload

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
NATIVE = {"raylet": "raylet", "gcs_server": "gcs_server", "haproxy": "haproxy"}  # NOTE: C/C++
TOP = 12
MODEL = "olmoe-512"
VOCAB_LIMIT = 512  # NOTE: what `bench engine` draws prompts from: the same requests both ways
# NOTE: py-spy counts a thread blocked in these as running: they are left out of the shares
WAITS = ("Condition.wait ", "Event.wait ", "select (", "poll (", "Thread.join ", "sleep (")
# NOTE: a sample counts for the concern of the innermost frame that names one (in this order
# of precedence at a frame); frames in none (the stdlib, say) pass it on to their callers.
CONCERNS = {
    "tokenization": ("/models/tokenizer.py", "/tokenizers/"),
    "detokenization": ("/cluster/detokenizer.py",),
    "model forward": ("/models/", "/torch/"),
    "sampling": ("/cluster/sampler.py",),
    "grammar": ("/cluster/grammar.py", "/llguidance/"),
    "engine bookkeeping": ("/cluster/",),
    "pydantic": ("/pydantic/", "/pydantic_core/"),
    "JSON / SSE bodies": ("/deploy/openai_format.py", "/json/"),
    "metrics": ("/deploy/metrics.py", "/prometheus_client/", "/opentelemetry/"),
    "gateway / replica code": ("/deploy/",),
    "HTTP stack": ("/starlette/", "/uvicorn/", "/fastapi/", "/httptools", "/h11/", "/anyio/"),
    "Ray calls, streams, serialization": ("/ray/", "/cloudpickle/", "/msgpack/", "/grpc/"),
    "asyncio": ("/asyncio/",),
    # NOTE: a thread whose innermost Python frame is its run loop runs native code: Ray's
    # Cython core worker and gRPC threads (py-spy shows no frames below them)
    "native code on threads (Ray core, gRPC)": ("Thread.run (", "_WorkItem.run (", "_worker ("),
}


def concern(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, markers in CONCERNS.items():
            if any(marker in frame for marker in markers):
                return name
    return "other"


def process_title(pid: int) -> str:
    """What a process calls itself (argv[0]; a Ray worker's is `ray::Role.method`); OSError
    once it has ended."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")


def ray_role(title: str) -> str | None:
    """A Ray worker's role from its title, without the method it runs (`ray::EngineActor.step`
    -> `EngineActor`); None for a process that is not a Ray worker."""
    if not title.startswith("ray::"):
        return None
    return title.removeprefix("ray::").split(".")[0].split(" ")[0]


def stat_fields(stat: Path) -> list[str]:
    """The fields of a /proc/<pid>/stat (or task/<tid>/stat) after the command name, whose
    parentheses may hold anything: [0] is the state, [1] the parent, [16] the niceness."""
    return stat.read_text().rsplit(")", 1)[1].split()


def session_processes() -> dict[int, str]:
    """pid -> role of this machine's Ray processes: workers by their title (`ray::Role...`),
    the raylet and the GCS by their executable."""
    roles = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = process_title(int(entry.name))
        except OSError:
            continue
        role = ray_role(title) or NATIVE.get(Path(title).name)
        if role is not None:
            roles[int(entry.name)] = role
    return roles


def cpu_seconds(pid: int) -> float:
    try:
        fields = stat_fields(Path(f"/proc/{pid}/stat"))
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # NOTE: utime, stime


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU seconds used since it was made by each Ray process of this machine (`roles`, as
    `session_processes` finds them) and by this process (the load generator)."""

    def __init__(self) -> None:
        self.roles = session_processes()
        self.before = {pid: cpu_seconds(pid) for pid in self.roles}
        self.own_before = own_cpu_seconds()

    def used(self) -> dict[int, float]:
        return {pid: cpu_seconds(pid) - before for pid, before in self.before.items()}

    def own_used(self) -> float:
        return own_cpu_seconds() - self.own_before


def _start_recorders(py_spy: str, roles: dict[int, str], out: Path) -> dict[int, subprocess.Popen]:
    recorders = {}
    for pid, role in roles.items():
        if role in NATIVE.values():
            continue
        command = [py_spy, "record", "--format", "raw", "--rate", "100", "--nonblocking"]
        command += ["--full-filenames", "--pid", str(pid), "--output", str(out / f"{pid}.txt")]
        recorders[pid] = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    return recorders


def _stop(recorders: dict[int, subprocess.Popen]) -> None:
    for proc in recorders.values():
        proc.send_signal(signal.SIGINT)  # NOTE: py-spy writes its file on SIGINT
    for proc in recorders.values():
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def where(frame: str) -> str:
    """A py-spy frame `function (path:line)` -> our file, or the third-party package."""
    path = frame.rsplit("(", 1)[-1].split(":")[0]
    for folder in ("models", "cluster", "deploy"):
        marker = f"/{folder}/"
        if marker in path and "site-packages" not in path:
            return f"{folder}/{path.split(marker, 1)[1]}"
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/")[0]
    return f"stdlib:{Path(path).stem}" if path.endswith(".py") else path


def read_samples(raw: Path) -> tuple[Counter, Counter, int]:
    """From a py-spy raw file (`a;b;c count` lines), leaving out threads that wait: samples by
    where the innermost frame runs, by concern (CONCERNS), and the samples kept."""
    spots: Counter = Counter()
    concerns: Counter = Counter()
    kept = 0
    lines = raw.read_text().splitlines() if raw.exists() else []
    for line in lines:
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not stack or frames[-1].startswith(WAITS):
            continue
        kept += int(count)
        spots[where(frames[-1])] += int(count)
        concerns[concern(frames)] += int(count)
    return spots, concerns, kept


def engine_steps(url: str) -> int:
    """The engine steps the server's metrics count, once they have settled (the replicas
    report every STATS_PERIOD_S: the count must hold for longer than that)."""
    import httpx

    from moe_serve.deploy.model_replica import STATS_PERIOD_S

    def read() -> int:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        lines = [line for line in text.splitlines() if line.startswith("moe_serve_engine_steps")]
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in lines))

    value, since = read(), time.monotonic()
    while time.monotonic() - since < 1.5 * STATS_PERIOD_S:
        time.sleep(0.25)  # NOTE: polling a counter that is pushed every STATS_PERIOD_S
        latest = read()
        if latest != value:
            value, since = latest, time.monotonic()
    return value


def profile(url: str, model: str, workload: Workload, vocab_limit: int, out: Path) -> dict:
    """Profile every Ray process of this machine while `workload` runs against `url`."""
    out.mkdir(parents=True, exist_ok=True)
    py_spy = str(Path(sys.executable).parent / "py-spy")
    steps_before, meter = engine_steps(url), CpuMeter()
    roles = meter.roles
    recorders = _start_recorders(py_spy, roles, out)
    time.sleep(1.0)  # NOTE: py-spy attaches asynchronously; the load must not start first
    try:
        items = workload.items(vocab_limit)
        seconds, results = asyncio.run(run_load(Target(model, url), workload, items))
    finally:
        _stop(recorders)
    used, client_s = meter.used(), meter.own_used()
    summary = summarize(seconds, results)
    summary["engine_steps"] = engine_steps(url) - steps_before
    tokens = max(1, summary["output_tokens"])
    processes = []
    for pid, role in roles.items():
        spots, concerns, kept = read_samples(out / f"{pid}.txt")
        processes.append(
            {
                "pid": pid,
                "role": role,
                "cpu_s": used[pid],
                "cpu_ms_per_token": 1000 * used[pid] / tokens,
                "self_time": {k: v / max(1, kept) for k, v in spots.most_common(TOP)},
                "concerns": {k: v / max(1, kept) for k, v in concerns.most_common()},
            }
        )
    processes.append(
        {
            "pid": os.getpid(),
            "role": "load generator (this process)",
            "cpu_s": client_s,
            "cpu_ms_per_token": 1000 * client_s / tokens,
            "self_time": {},
            "concerns": {},
        }
    )
    processes.sort(key=lambda p: -p["cpu_s"])
    return {"load": summary, "processes": processes}


def render(report: dict) -> str:
    """Markdown: served vs in-process engine, then CPU per process and per generated token
    and where each process's busy samples are."""
    load = report["load"]
    lines = [
        f"Served over HTTP at EP = {report['ep']}: {load['output_tokens']} tokens in "
        f"{load['seconds']:.1f} s = {load['output_tokens_per_s']:.1f} tok/s ({load['errors']} "
        f"errors); the in-process engine on {report['engine_threads']} torch thread(s), same "
        f"requests, same run: {report['engine_output_tokens_per_s']:.1f} tok/s; served / "
        f"engine = **{report['served_vs_engine']:.2f}x**. Engine steps: "
        f"{load['engine_steps']} served vs {report['engine_steps']} in-process "
        f"({load['output_tokens'] / max(1, load['engine_steps']):.1f} vs "
        f"{load['output_tokens'] / max(1, report['engine_steps']):.1f} tokens per step).",
        "",
        "| process | CPU s | CPU ms / token | busy samples by concern | innermost frames |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for p in report["processes"]:
        if p["cpu_s"] < 0.05:
            continue
        concerns = ", ".join(f"{k} {v:.0%}" for k, v in p["concerns"].items() if v >= 0.02)
        spots = ", ".join(f"{k} {v:.0%}" for k, v in list(p["self_time"].items())[:4])
        lines.append(
            f"| {p['role']} | {p['cpu_s']:.1f} | {p['cpu_ms_per_token']:.2f} | {concerns} "
            f"| {spots} |"
        )
    return "\n".join(lines) + "\n"


def serve_one(path: str, ep: int, http_port: int, grpc_port: int) -> None:
    """The bench checkpoint served at EP = `ep` on a private Ray instance (its engine actor
    with the default torch threads: the cores but one)."""
    from moe_serve.deploy.bench.report import served_model
    from moe_serve.deploy.config import parse_serve_config
    from moe_serve.deploy.launch import start

    ports = {"http": {"port": http_port}, "grpc": {"port": grpc_port}}
    start(parse_serve_config(ports | {"models": [served_model(MODEL, path, ep)]}))


def run_profile(out: Path, ep: int = 1) -> dict:
    """In one run: the in-process engine on the bench workload with the served engine actor's
    torch threads, then the same workload served over HTTP at EP = `ep`, profiled."""
    import ray
    from ray import serve

    from moe_serve.cluster.ray_replica import default_engine_threads
    from moe_serve.deploy.bench.engine_bench import bench_engine
    from moe_serve.deploy.bench.report import GRPC_PORT, HTTP_PORT, WORKLOAD, checkpoint

    path, threads = checkpoint(), default_engine_threads()
    engine = bench_engine(path, WORKLOAD, "float32", False, out / "engine.json", threads)
    serve_one(path, ep, HTTP_PORT, GRPC_PORT)
    try:
        url = f"http://127.0.0.1:{HTTP_PORT}"
        warm = Workload(**WORKLOAD.__dict__ | {"num_requests": 8})
        asyncio.run(run_load(Target(MODEL, url), warm, warm.items(VOCAB_LIMIT)))
        report = profile(url, MODEL, WORKLOAD, VOCAB_LIMIT, out)
    finally:
        serve.shutdown()
        ray.shutdown()
    engine_tps = engine["engine"]["tokens_per_s"]
    report |= {
        "ep": ep,
        "engine_threads": threads,
        "engine_output_tokens_per_s": engine_tps,
        "engine_steps": engine["engine"]["steps"],
    }
    report["served_vs_engine"] = report["load"]["output_tokens_per_s"] / engine_tps
    (out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
