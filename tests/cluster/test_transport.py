"""The collective transport on gloo: the rendezvous listens on its host only and only until the
group forms; both realisations of the star's operations (messages, gloo's default; collectives,
NCCL's) deliver what each rank sent; a peer that stops answering raises in the caller, and the
aborted group is formed again in the same process. The NCCL path runs the same functions
(`create_group`, `close`)."""

from __future__ import annotations

import datetime
import os
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moe_serve.cluster import transport
from moe_serve.cluster.transport import CollectiveTransport, Rendezvous, TransportError

HOST = "127.0.0.1"
CPU = torch.device("cpu")


def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as the kernel lists them) listening on TCP `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.append(local.rsplit(":", 1)[0])
    return found


def _form(
    world_size: int, timeout_s: float, point_to_point: bool | None = None
) -> tuple[CollectiveTransport, list, Rendezvous]:
    """Rank 0 here, ranks 1.. in threads: every rank joins as the replica's do."""
    rendezvous = Rendezvous(HOST, world_size, timeout_s)
    peers: dict[int, CollectiveTransport] = {}

    def join(rank: int) -> CollectiveTransport:
        peers[rank] = CollectiveTransport.join(
            HOST, rendezvous.port, rank, world_size, CPU, timeout_s, HOST, point_to_point
        )
        return peers[rank]

    threads = [threading.Thread(target=join, args=(r,)) for r in range(1, world_size)]
    for thread in threads:
        thread.start()
    rank0 = join(0)
    for thread in threads:
        thread.join()
    return rank0, [peers[r] for r in range(1, world_size)], rendezvous


def _broadcast_everywhere(rank0: CollectiveTransport, peers: list) -> list[int]:
    received = {}

    def receive(peer: CollectiveTransport) -> None:
        received[peer.rank] = int(peer.broadcast(torch.zeros(1, dtype=torch.long))[0])

    threads = [threading.Thread(target=receive, args=(p,)) for p in peers]
    for thread in threads:
        thread.start()
    rank0.broadcast(torch.tensor([7]))
    for thread in threads:
        thread.join()
    return [received[p.rank] for p in peers]


def test_the_rendezvous_listens_on_its_host_only_until_the_group_forms():
    rank0, peers, rendezvous = _form(3, timeout_s=20)
    assert _listeners(rendezvous.port) == ["0100007F"]  # NOTE: 127.0.0.1, not 0.0.0.0 or ::
    rendezvous.close()
    assert _listeners(rendezvous.port) == []
    assert _broadcast_everywhere(rank0, peers) == [7, 7]  # NOTE: the group needs no store
    for member in (rank0, *peers):
        member.close()


def _shard_side(peer: CollectiveTransport, seen: dict) -> None:
    """What a shard does with a step: header, its token count, its rows, results back."""
    seen[peer.rank, "header"] = peer.broadcast(torch.zeros(2, dtype=torch.long)).tolist()
    counts = peer.exchange_counts([peer.rank * 10, 0, 0])
    seen[peer.rank, "counts"] = counts
    rows = peer.all_to_all(torch.zeros(0, 2), [0, 0, 0], counts)
    peer.all_to_all(rows * 10 + peer.rank, counts, [0, 0, 0])


@pytest.mark.parametrize("point_to_point", [True, False], ids=["messages", "collectives"])
def test_each_rank_receives_what_the_others_sent_it(point_to_point):
    rank0, peers, rendezvous = _form(3, timeout_s=20, point_to_point=point_to_point)
    rendezvous.close()
    assert [m.is_point_to_point for m in (rank0, *peers)] == [point_to_point] * 3
    seen: dict = {}
    threads = [threading.Thread(target=_shard_side, args=(p, seen)) for p in peers]
    for thread in threads:
        thread.start()
    rank0.broadcast(torch.tensor([5, 6]))
    assert rank0.exchange_counts([0, 1, 2]) == [0, 10, 20]  # NOTE: shard s sent s * 10
    rows = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])  # 1 for shard 1, 2 for shard 2
    rank0.all_to_all(rows, [0, 1, 2], [0, 0, 0])
    back = rank0.all_to_all(torch.zeros(0, 2), [0, 0, 0], [0, 1, 2])
    for thread in threads:
        thread.join()
    assert back.tolist() == [[11.0, 11.0], [22.0, 22.0], [32.0, 32.0]]
    assert seen == {
        (1, "header"): [5, 6],
        (2, "header"): [5, 6],
        (1, "counts"): [1, 0, 0],
        (2, "counts"): [2, 0, 0],
    }
    if point_to_point:  # NOTE: shards never exchange with each other
        with pytest.raises(ValueError, match="cannot exchange with shards"):
            peers[0].all_to_all(torch.zeros(1, 2), [0, 0, 1], [0, 0, 0])
    assert rank0.num_collectives == 4
    for member in (rank0, *peers):
        member.close()


def test_a_silent_peer_raises_in_the_caller_then_the_group_forms_again():
    rank0, peers, rendezvous = _form(2, timeout_s=2)
    rendezvous.close()
    started = time.monotonic()
    with pytest.raises(TransportError, match="broadcast failed on rank 0"):
        rank0.broadcast(torch.tensor([1]))  # NOTE: the peer never takes part
    assert time.monotonic() - started < 2 + 3
    for member in (rank0, *peers):
        member.close()  # NOTE: an abort, as the replica does before rebuilding
        assert member.group is None
    rank0, peers, rendezvous = _form(2, timeout_s=2)
    rendezvous.close()
    assert _broadcast_everywhere(rank0, peers) == [7]


class FakeNccl:
    """Stands in for ProcessGroupNCCL (CPU builds have none): records what it was given."""

    class Options:
        def __init__(self) -> None:
            self._timeout = None

    def __init__(self, store, rank, world_size, options) -> None:
        self.environment = {k: os.environ.get(k) for k in transport.NCCL_ERROR_HANDLING}
        self.options, self.connected = options, None

    def eager_connect_single_device(self, device) -> None:
        self.connected = device


def test_nccl_groups_raise_instead_of_killing_the_process(monkeypatch):
    for name in transport.NCCL_ERROR_HANDLING:
        monkeypatch.setenv(name, "3")  # NOTE: whatever the environment says, ours win
    monkeypatch.setattr(dist, "ProcessGroupNCCL", FakeNccl, raising=False)
    timeout = datetime.timedelta(seconds=5)
    group = transport.create_group(None, 0, 2, torch.device("cuda", 0), timeout, HOST)
    assert group.environment == {
        "TORCH_NCCL_BLOCKING_WAIT": "1",  # NOTE: no watchdog: errors raise in wait()
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",  # NOTE: CleanUpOnly, never tear down
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
    }
    assert group.options._timeout == timeout
    assert group.connected == torch.device("cuda", 0)  # NOTE: formed now, not lazily
