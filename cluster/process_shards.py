"""Expert shards as processes of this machine, without Ray (tools, and tests of the NCCL path:
NCCL needs a process per rank). Each shard is a spawned process that loads its experts, says
so through a pipe, joins the group and serves until STOP or until the group fails."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Mapping

from moe_serve.cluster.placement import ExpertLayout
from moe_serve.cluster.shard import ExpertShard
from moe_serve.cluster.shard_group import ShardLauncher, ShardSpec, serve_shard

log = logging.getLogger(__name__)

RankEnv = Callable[[int], Mapping[str, str]]


def _serve(spec: ShardSpec, layout, index, host, port, env: Mapping[str, str], conn) -> None:
    os.environ.update(env)
    try:
        shard = ExpertShard(spec.checkpoint, layout, index, spec.dtype, spec.device)
    except Exception as exc:  # NOTE: reported to the launcher, which raises it in `start`
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("loaded", shard.parameter_summary()))
    conn.close()
    serve_shard(shard, spec, host, port, index + 1, layout.num_shards + 1)


class ProcessShardLauncher(ShardLauncher):
    """Shards as spawned processes. `env(rank)`: environment variables set in shard `rank`'s
    process before it loads (e.g. a distinct NCCL_HOSTID per rank, to run several NCCL ranks
    on one GPU in a check). `stop` waits `grace_s` for each process to leave, then kills it."""

    def __init__(self, env: RankEnv = lambda rank: {}, grace_s: float = 10.0) -> None:
        self.env, self.grace_s = env, grace_s
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.summaries: list[dict[str, tuple[int, ...]]] = []

    def start(self, spec: ShardSpec, layout: ExpertLayout, host: str, port: int) -> None:
        context = multiprocessing.get_context("spawn")
        pipes = []
        for index in range(layout.num_shards):
            receive, send = context.Pipe(duplex=False)
            args = (spec, layout, index, host, port, dict(self.env(index + 1)), send)
            process = context.Process(target=_serve, args=args, name=f"shard-{index + 1}")
            process.start()
            send.close()
            self.processes.append(process)
            pipes.append(receive)
        self.summaries = [self._loaded(index, pipe, spec) for index, pipe in enumerate(pipes)]

    def _loaded(self, index: int, pipe, spec: ShardSpec) -> dict[str, tuple[int, ...]]:
        if not pipe.poll(spec.load_timeout_s):
            raise RuntimeError(f"shard {index} did not load within {spec.load_timeout_s} s")
        try:
            status, value = pipe.recv()
        except EOFError:
            code = self.processes[index].exitcode
            raise RuntimeError(f"shard {index} exited while loading (exit code {code})") from None
        if status != "loaded":
            raise RuntimeError(f"shard {index} could not load its experts: {value}")
        return value

    def stop(self) -> None:
        for process in self.processes:
            process.join(self.grace_s)
            if process.is_alive():
                log.warning("shard process %s did not stop; killing it", process.name)
                process.kill()
                process.join()
        self.processes, self.summaries = [], []

    def parameter_summaries(self):
        return list(self.summaries)
