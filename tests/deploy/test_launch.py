"""`moe-serve run` as users start it: bad models fail before Ray starts, one line each; it serves
on a Ray instance of its own whatever `ray start` left on the machine (or joins the cluster it is
given); idle it prints nothing, each request one access line; a model that fails while loading
is one line too; SIGTERM shuts its whole Ray down cleanly."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file, save_file

from moe_serve.deploy.bench.profile import process_title, ray_role, stat_fields
from moe_serve.deploy.model_replica import STATS_PERIOD_S
from moe_serve.protos import moe_serving_pb2 as pb
from moe_serve.protos import moe_serving_pb2_grpc as pb_grpc
from tests.deploy.conftest import free_port
from tests.deploy.process import RunProcess, private_env

pytestmark = pytest.mark.slow
RAY_TMP = Path("/tmp/ray")
CLUSTER_FILE = RAY_TMP / "ray_current_cluster"  # NOTE: what `ray start` leaves for ray.init()
RAY = Path(sys.executable).parent / "ray"
KEY = "from-the-config-file"


def _session_pids(session: str) -> list[int]:
    """Live processes started for one Ray session (its name is on their command lines)."""
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
            found.append(int(proc.name))
    return found


def _wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _descendants(root: int) -> list[int]:
    parents = {}
    for proc in Path("/proc").iterdir():
        try:
            parents[int(proc.name)] = int(stat_fields(proc / "stat")[1])
        except (OSError, ValueError):  # NOTE: not a process, or one that ended meanwhile
            continue
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found, frontier = found + children, children
    return found


def _niceness_by_role(pids: list[int]) -> dict[str, set[int]]:
    """A Ray worker's role -> the niceness of its threads, for those of `pids`."""
    found = {}
    for pid in pids:
        try:
            role = ray_role(process_title(pid))
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
            niceness = {int(stat_fields(t / "stat")[16]) for t in tasks}
        except OSError:  # NOTE: the process ended meanwhile
            continue
        if role is not None:
            found[role] = niceness
    return found


def _sessions_of(pid: int) -> list[Path]:
    """Ray names a session after the process that started it: session_<date>_<pid>."""
    return list(RAY_TMP.glob(f"session_*_{pid}"))


def _lines_within(run: RunProcess, seconds: float) -> list[str]:
    """What `run` prints in the next `seconds` (an absence can only be watched for a while)."""
    deadline, lines = time.monotonic() + seconds, []
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = run.lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        lines.append(line)
    run.log.extend(lines)
    return lines


def _next_line(run: RunProcess) -> str:
    line = run.lines.get(timeout=30)
    run.log.append(line)
    return line


def _write_config(tmp_path: Path, source: Path, **extra) -> tuple[Path, str, str]:
    """A one-model config on free ports (and `extra` top-level keys); returns it, the HTTP base
    URL and the gRPC address."""
    http_port, grpc_port = free_port(), free_port()
    model = {
        "name": "m",
        "source": str(source),
        "device": "cpu",
        "expert_parallel_size": 2,
        "resources": {"replica_cpus": 0.25, "shard_cpus": 0.25},
    }
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {"http": {"port": http_port}, "grpc": {"port": grpc_port}, "models": [model]} | extra
        )
    )
    return config, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"


def _complete(base: str, headers: dict | None = None) -> dict:
    body = {"model": "m", "prompt": "hi", "max_tokens": 3, "ignore_eos": True}
    reply = httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.fixture
def cluster_file():
    """/tmp/ray/ray_current_cluster as the test leaves it is replaced by what was there."""
    saved = CLUSTER_FILE.read_text() if CLUSTER_FILE.exists() else None
    yield CLUSTER_FILE
    if saved is None:
        CLUSTER_FILE.unlink(missing_ok=True)
    else:
        CLUSTER_FILE.write_text(saved)


@contextmanager
def ray_head(log: Path) -> Iterator[tuple[str, Path]]:
    """`ray start --head --block` (writes /tmp/ray/ray_current_cluster as a user's would);
    yields its address and session. Killed at the end with SIGKILL, as a crash would: --block
    makes its processes share its fate; the test checks that they are gone."""
    port = free_port()
    command = [str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2", "--block"]
    command += ["--include-dashboard=false", "--disable-usage-stats"]
    with log.open("w") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=private_env())
    try:
        started = _wait_until(
            lambda: "Ray runtime started" in log.read_text() or head.poll() is not None, 120
        )
        assert started and head.poll() is None, log.read_text()
        (session,) = _sessions_of(head.pid)
        yield f"127.0.0.1:{port}", session
    finally:
        head.kill()
        head.wait()


def test_bad_models_fail_before_ray_starts_one_line_each(tiny_dirs, tmp_path):
    foo = tmp_path / "foo"
    shutil.copytree(tiny_dirs["olmoe"], foo)
    (foo / "config.json").write_text(
        json.dumps(json.loads((foo / "config.json").read_text()) | {"model_type": "foo"})
    )
    models = [
        {"name": "foo", "source": str(foo)},
        {"name": "gone", "source": str(tmp_path / "absent")},
        {"name": "wide", "source": str(tiny_dirs["olmoe"]), "expert_parallel_size": 100},
    ]
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"models": models}))
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moe_serve.deploy.cli", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=private_env(),
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and time.monotonic() - started < 10
    assert out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "model 'foo'",
        "model 'gone'",
        "model 'wide'",
    ]
    assert lines[0].startswith(f"moe-serve: model 'foo': {foo / 'config.json'}: model_type 'foo'")
    assert str(tmp_path / "absent") in lines[1]
    assert "expert_parallel_size 100 exceeds the model's 8 experts" in lines[2]
    assert _sessions_of(proc.pid) == []  # NOTE: Ray never started


def test_run_serves_quietly_on_its_own_ray_then_sigterm_leaves_no_process(
    tiny_dirs, tmp_path, cluster_file
):
    cluster_file.parent.mkdir(exist_ok=True)
    cluster_file.write_text(f"127.0.0.1:{free_port()}")  # NOTE: a `ray start` killed long ago
    # NOTE: a key in the config file reaches the gateway through the environment of the Ray
    # instance moe-serve starts, never through Serve's application args
    secured = {"api_key": KEY, "metrics": {"require_api_key": True}}
    config, base, grpc_address = _write_config(tmp_path, tiny_dirs["olmoe"], **secured)
    auth, metadata = {"Authorization": f"Bearer {KEY}"}, [("authorization", f"Bearer {KEY}")]
    run = RunProcess(["--config", str(config)], env=private_env())
    try:
        run.wait_for("ready in", timeout_s=300)
        run.wait_for("expert_parallel_size=2", timeout_s=5)  # NOTE: the banner's last line
        assert any(line.split() == ["API", "key", "required"] for line in run.log), run.log
        (session,) = _sessions_of(run.proc.pid)
        assert httpx.get(f"{base}/health", timeout=30).json()["models"] == ["m"]
        # NOTE: the engine and its shards get the cores first (deploy/priority.py)
        niceness = _niceness_by_role(_descendants(run.proc.pid))
        assert niceness["EngineActor"] == {0} and niceness["ExpertShardActor"] == {0}, niceness
        for role in ("Gateway", "model-m", "MetricsHub"):
            assert niceness[f"ServeReplica:moe-serve:{role}"] == {19}, niceness
        # NOTE: every replica reports its stats each STATS_PERIOD_S; none of that is printed
        assert _lines_within(run, 3 * STATS_PERIOD_S) == []
        usage = _complete(base, auth)["usage"]
        line = _next_line(run)
        assert line.split()[2:5] == ["POST", "/v1/completions", "model=m"]  # after date, time
        assert f" status=200 prompt_tokens={usage['prompt_tokens']} completion_tokens=3 " in line
        with grpc.insecure_channel(grpc_address) as channel:
            stub = pb_grpc.MoEServingStub(channel)
            request = pb.GenerateRequest(model="m", prompt="hi", max_tokens=3)
            usage = list(stub.GenerateStream(request, metadata=metadata))[-1].usage
            line = _next_line(run)
            health = health_pb2_grpc.HealthStub(channel)
            health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
            # NOTE: Serve's proxy refuses it before reading it (its default is 2 GiB)
            huge = pb.GenerateRequest(model="m", prompt="x" * (5 << 20))
            with pytest.raises(grpc.RpcError) as error:
                stub.Generate(huge, metadata=metadata, timeout=30)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert str(4 << 20) in error.value.details()
        assert line.split()[2:5] == ["gRPC", "/moeserving.v1.MoEServing/GenerateStream", "model=m"]
        assert f" status=OK prompt_tokens={usage.prompt_tokens} completion_tokens=3 " in line
        assert _lines_within(run, STATS_PERIOD_S) == []
        assert httpx.get(f"{base}/metrics", timeout=30).status_code == 401
        assert "moe_serve_requests_total" in httpx.get(f"{base}/metrics", headers=auth).text
        assert httpx.post(f"{base}/v1/completions", json={}, timeout=30).status_code == 401
        assert run.stop() == 0
        run.wait_for("shutting down", timeout_s=5)
    finally:
        run.stop()
    # NOTE: Ray's processes exit on their own once told to
    assert _wait_until(lambda: _session_pids(session.name) == [], 60)


def test_run_with_a_ray_head_on_the_machine_serves_on_its_own_or_joins_it(
    tiny_dirs, tmp_path, cluster_file
):
    config, base, _ = _write_config(tmp_path, tiny_dirs["olmoe"])
    with ray_head(tmp_path / "head.log") as (address, head_session):
        assert cluster_file.read_text().strip().endswith(address.rpartition(":")[2])
        own = RunProcess(["--config", str(config), "--log-level", "info"], env=private_env())
        try:
            own.wait_for("ready in", timeout_s=300)
            own.wait_for("expert_parallel_size=2", timeout_s=5)
            (session,) = _sessions_of(own.proc.pid)
            assert session != head_session
            # NOTE: even at INFO, the replicas' stats reports never reach Serve's access log
            assert _lines_within(own, 3 * STATS_PERIOD_S) == []
            assert _complete(base)["usage"]["completion_tokens"] == 3
            assert own.stop() == 0
        finally:
            own.stop()
        # NOTE: Ray sends its token (~/.ray/auth_token) to an address it is given only when
        # told to: RAY_AUTH_MODE=token (`ray start` turns token authentication on by default)
        env = private_env() | {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}
        joined = RunProcess(["--config", str(config)], env=env)
        try:
            joined.wait_for("ready in", timeout_s=300)
            assert _sessions_of(joined.proc.pid) == []  # NOTE: no instance of its own
            assert _complete(base)["usage"]["completion_tokens"] == 3
            assert joined.stop() == 0
        finally:
            joined.stop()
    assert _wait_until(lambda: _session_pids(head_session.name) == [], 60)


def test_a_model_that_fails_while_loading_is_one_line(tiny_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs["olmoe"], broken)
    weights = load_file(broken / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if ".experts.7." not in k}, broken / "model.safetensors"
    )
    config, _, _ = _write_config(tmp_path, broken)
    # NOTE: Serve tries a failing replica 3 times by default; once is enough here
    env = private_env() | {"RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT": "1"}
    run = RunProcess(["--config", str(config)], env=env)
    try:
        line = run.wait_for("moe-serve: model 'm' failed to start: ", timeout_s=300)
        assert "is missing from the checkpoint" in line
        assert run.proc.wait(timeout=120) == 1
        rest = _lines_within(run, 5)
    finally:
        run.stop()
    output = "".join(run.log)
    assert "ready in" not in output and "Deploying application" not in output
    assert "shutting down\n" in rest
