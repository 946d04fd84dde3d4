"""`moe-serve bench transport`: a decode layer's hand-offs between the engine (rank 0) and its
shards, through `CollectiveTransport`, as gloo point-to-point messages (the default on CPU) and
as gloo collectives (what NCCL runs on GPUs): rank 0 broadcasts the payload rows, each shard
answers with as many result rows, as in the fixed-capacity dispatch. Shards are processes of
their own; the two realisations alternate (A B B A) so that drift weighs on both alike."""

from __future__ import annotations

import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

from moe_serve.cluster.shard import payload_row_bytes
from moe_serve.cluster.transport import CollectiveTransport, Rendezvous

HOST, CPU, TIMEOUT_S, WARMUP = "127.0.0.1", torch.device("cpu"), 60.0, 50


def _layer(transport: CollectiveTransport, rows: torch.Tensor, results: torch.Tensor) -> None:
    """One decode layer's dispatch: the payload to every shard, results back from each."""
    world = transport.world_size
    transport.broadcast(rows)
    if transport.rank == 0:
        transport.all_to_all(results[:0], [0] * world, [0] + [len(rows)] * (world - 1))
    else:
        transport.all_to_all(results, [len(rows)] + [0] * (world - 1), [0] * world)


def _buffers(num_rows: int, hidden: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    row_bytes = payload_row_bytes(hidden, torch.float32, top_k)
    return torch.zeros(num_rows, row_bytes, dtype=torch.uint8), torch.zeros(num_rows, hidden)


def _shard(port: int, rank: int, world: int, is_p2p: bool, shape: tuple, rounds: int) -> None:
    torch.set_num_threads(1)
    transport = CollectiveTransport.join(HOST, port, rank, world, CPU, TIMEOUT_S, HOST, is_p2p)
    rows, results = _buffers(*shape)
    for _ in range(WARMUP + rounds):
        _layer(transport, rows, results)
    transport.close()


def _time_layers(world: int, is_p2p: bool, shape: tuple, rounds: int) -> float:
    """Milliseconds per layer on rank 0, with `world - 1` shard processes."""
    rendezvous = Rendezvous(HOST, world, TIMEOUT_S)
    context = multiprocessing.get_context("spawn")
    shards = [
        context.Process(target=_shard, args=(rendezvous.port, r, world, is_p2p, shape, rounds))
        for r in range(1, world)
    ]
    for process in shards:
        process.start()
    try:
        rank0 = CollectiveTransport.join(
            HOST, rendezvous.port, 0, world, CPU, TIMEOUT_S, HOST, is_p2p
        )
        rendezvous.close()
        rows, results = _buffers(*shape)
        for _ in range(WARMUP):
            _layer(rank0, rows, results)
        start = time.perf_counter()
        for _ in range(rounds):
            _layer(rank0, rows, results)
        elapsed = time.perf_counter() - start
        rank0.close()
    finally:
        for process in shards:
            process.join(TIMEOUT_S)
            process.kill()
    return 1e3 * elapsed / rounds


def bench_transport(
    ranks: list[int],
    batch: list[int],
    rounds: int,
    hidden_size: int,
    top_k: int,
    out: Path | None = None,
) -> dict:
    torch.set_num_threads(1)
    table = []
    for world in ranks:
        for num_rows in batch:
            shape = (num_rows, hidden_size, top_k)
            ms: dict[str, list[float]] = {"messages": [], "collectives": []}
            for name in ("messages", "collectives", "collectives", "messages"):
                ms[name].append(_time_layers(world, name == "messages", shape, rounds))
            row = {"ranks": world, "rows": num_rows}
            row |= {f"{name}_ms": statistics.mean(v) for name, v in ms.items()}
            row["collectives / messages"] = row["collectives_ms"] / row["messages_ms"]
            table.append(row)
            print(
                f"{world} ranks, {num_rows:3d} rows: messages {row['messages_ms']:.3f} ms, "
                f"collectives {row['collectives_ms']:.3f} ms per layer "
                f"({row['collectives / messages']:.2f}x)",
                file=sys.stderr,
            )
    report = {"rounds": rounds, "hidden_size": hidden_size, "top_k": top_k, "layers": table}
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report
