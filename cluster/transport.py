"""Collectives between one attention rank (0) and the expert shards (1..N).

A standalone torch.distributed process group per replica (not the global default group, so a
process can rebuild it, and tests can hold several): gloo on CPU, NCCL on CUDA. Rank 0 hosts
the rendezvous store (`Rendezvous`) on a free port of its node's own address, only while the
group forms. Every operation waits at most `timeout_s`; a failed or timed-out one raises
`TransportError` in the caller, on both backends, and the replica then aborts the group
(`close`) and rebuilds it.

The group is a star: rank 0 exchanges with every shard, shards never with each other. Each
operation (broadcast from rank 0, all-to-all, count exchange) is one NCCL collective on CUDA;
on gloo it is realised as point-to-point messages between rank 0 and each shard
(`point_to_point`), because gloo's collectives pair every rank with every other: a decode
layer's broadcast and result all-to-all among 3 ranks took 2.06 ms on this 2-core VM, the same
bytes as messages 0.44 ms (0.53 and 0.15 ms among 2 ranks; docs/performance.md).
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist

# NOTE: NCCL failures must behave like gloo ones: raise in the caller, never kill the process.
# With torch's defaults (checked in torch 2.13's ProcessGroupNCCL.hpp/.cpp), a watchdog thread
# polls every collective and, on an error or a timeout, applies TORCH_NCCL_ASYNC_ERROR_HANDLING,
# default 3 (SkipCleanUp): it rethrows in the watchdog thread, which takes the whole process
# down (the engine actor: its KV cache and every request of the replica with it), and after a
# timeout its heartbeat monitor may abort the process as well (TORCH_NCCL_DUMP_ON_TIMEOUT).
# - TORCH_NCCL_BLOCKING_WAIT=1: no watchdog (nor heartbeat monitor) thread is created; `wait()`
#   polls the collective on the calling thread and, on an NCCL error or once the timeout
#   passes, aborts the communicator (ncclCommAbort) and raises DistBackendError (a
#   RuntimeError) right there. A collective is waited on when its result is needed: at once,
#   or, with micro-batch overlap, after the other micro-batch's attention has been enqueued
#   on the compute stream: the host then blocks in `wait()` while the GPU computes that.
# - TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (CleanUpOnly) and TORCH_NCCL_DUMP_ON_TIMEOUT=0: should a
#   torch version start the watchdog regardless, it only aborts communicators, and no dump
#   path ends in an abort of the process.
# Read when a ProcessGroupNCCL is constructed; set in this process (an actor of its own) right
# before, overriding the environment. Not set: `Options.config.blocking = 0` (non-blocking
# communicators; torch itself stopped choosing them after NCCL hangs, pytorch#153960) and
# `is_high_priority_stream` (the overlapped attention and the collectives are independent
# streams of work; neither waits for the other's priority). Known gap: a peer that dies
# while the communicator is being created (the first collective after a (re)build) can leave
# ncclCommInitRank waiting, which blocking-mode NCCL does not time out.
NCCL_ERROR_HANDLING = {
    "TORCH_NCCL_BLOCKING_WAIT": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
}


class TransportError(RuntimeError):
    """A collective failed or timed out: a peer died, hung or could not join."""


def create_group(
    store: dist.Store,
    rank: int,
    world_size: int,
    device: torch.device,
    timeout: datetime.timedelta,
    host: str,
) -> dist.ProcessGroup:
    """This rank's backend, fully connected when it returns: NCCL on CUDA (its communicator
    created now, not at the first collective; errors raise, see NCCL_ERROR_HANDLING), else
    gloo (connected by its constructor)."""
    if device.type == "cuda":
        os.environ.update(NCCL_ERROR_HANDLING)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = dist.ProcessGroupNCCL(store, rank, world_size, options)
        index = torch.cuda.current_device() if device.index is None else device.index
        group.eager_connect_single_device(torch.device("cuda", index))
        return group
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(store, rank, world_size, options)


class Rendezvous:
    """Rank 0's store server for one group. It listens on this node's own address only (a
    socket bound there, handed to the store; TCPStore alone listens on every interface), and
    only until the group has formed: `close` once rank 0's transport exists."""

    def __init__(self, host: str, world_size: int, timeout_s: float) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind((host, 0))
        listener.listen(world_size + 8)
        self.host, self.port = host, listener.getsockname()[1]
        self.server: dist.TCPStore | None = dist.TCPStore(
            host,
            self.port,
            world_size,
            True,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
            master_listen_fd=listener.detach(),  # NOTE: the store owns the socket now
        )

    def close(self) -> None:
        """Stop listening and drop every store connection (the group no longer needs them)."""
        self.server = None


def local_ip() -> str:
    """This node's address as other nodes see it (falls back to loopback)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:  # NOTE: Ray is optional below deploy/
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:  # NOTE: a hostname that does not resolve (common in containers)
        return "127.0.0.1"


class Work:
    """A started operation (`CollectiveTransport.start_*`): one collective, or its messages
    to and from each peer; `CollectiveTransport.wait` it."""

    def __init__(self, works: list[dist.Work], what: str) -> None:
        self.works, self.what, self.keep = works, what, ()


def formed_key(rank: int) -> str:
    return f"formed/{rank}"


class CollectiveTransport:
    """This rank's view of the replica's process group."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        device: torch.device,
        timeout_s: float,
        host: str,
        point_to_point: bool | None = None,
    ) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        # NOTE: messages on gloo, collectives on NCCL (module docstring); tests run both on gloo
        self.is_point_to_point = device.type != "cuda" if point_to_point is None else point_to_point
        # the star: rank 0 talks to every shard, a shard to rank 0 only
        self.peers = list(range(1, world_size)) if rank == 0 else [0]
        self.num_collectives = 0  # every operation this rank took part in
        timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout = timeout
        try:
            self.group = create_group(store, rank, world_size, device, timeout, host)
            # NOTE: rank 0 returns once every rank is connected, so that the rendezvous can
            # close: no rank reads the store after this
            store.set(formed_key(rank), b"1")
            if rank == 0:
                store.wait([formed_key(r) for r in range(1, world_size)], timeout)
        except RuntimeError as exc:
            raise TransportError(f"rank {rank} could not join the expert group: {exc}") from exc

    @classmethod
    def join(
        cls,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        device: torch.device,
        timeout_s: float,
        local_host: str,
        point_to_point: bool | None = None,
    ) -> CollectiveTransport:
        """Connect to the rendezvous at host:port (rank 0's `Rendezvous`) and join the group;
        every rank, rank 0 included, joins this way."""
        store = dist.TCPStore(
            host, port, world_size, False, timeout=datetime.timedelta(seconds=timeout_s)
        )
        return cls(store, rank, world_size, device, timeout_s, local_host, point_to_point)

    def wait(self, work: Work) -> None:
        """Wait for a started operation (raises TransportError if it failed or timed out)."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        try:
            for one in work.works:
                left = max(deadline - time.monotonic(), 0.001)
                one.wait(datetime.timedelta(seconds=left))
        except RuntimeError as exc:
            raise TransportError(f"{work.what} failed on rank {self.rank}: {exc}") from exc

    def _start(self, start, what: str) -> Work:
        self.num_collectives += 1
        try:
            return Work(start(), what)
        except RuntimeError as exc:  # NOTE: a group already broken can refuse at once
            raise TransportError(f"{what} failed on rank {self.rank}: {exc}") from exc

    def _messages(self, sends: list, recvs: list, what: str) -> Work:
        """Point-to-point: each (peer, tensor) of `sends` to its peer, each of `recvs` filled
        from its peer. Between two ranks, messages arrive in the order sent, and both sides
        take part in operations in the same order (the protocol), so sizes always match."""
        work = self._start(
            lambda: (
                [self.group.send([t], peer, 0) for peer, t in sends]
                + [self.group.recv([t], peer, 0) for peer, t in recvs]
            ),
            what,
        )
        work.keep = (sends, recvs)  # NOTE: the buffers must outlive the messages
        return work

    def _check_star(self, counts: list[int]) -> None:
        """Counts to or from ranks outside the star (shard to shard) must be 0."""
        if any(counts[r] for r in range(self.world_size) if r not in self.peers and r != self.rank):
            raise ValueError(f"rank {self.rank} cannot exchange with shards: {counts}")

    def start_broadcast(self, tensor: torch.Tensor) -> Work:
        """Rank 0's `tensor` to everyone (in place), once `wait`ed for."""
        if self.is_point_to_point:
            peers = [(peer, tensor) for peer in self.peers]
            if self.rank == 0:
                return self._messages(peers, [], "broadcast")
            return self._messages([], peers, "broadcast")
        options = dist.BroadcastOptions()
        options.rootRank = 0
        return self._start(lambda: [self.group.broadcast([tensor], options)], "broadcast")

    def start_all_to_all(
        self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> tuple[torch.Tensor, Work]:
        """Rows of `send` [sum(send_counts), ...] in rank order go to each rank; the rows
        received [sum(recv_counts), ...] in rank order, filled once `wait`ed for."""
        recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
        send = send.contiguous()
        if self.is_point_to_point:
            return recv, self._all_to_all_messages(send, send_counts, recv, recv_counts)
        work = self._start(
            lambda: [
                self.group.alltoall_base(
                    recv, send, recv_counts, send_counts, dist.AllToAllOptions()
                )
            ],
            "all-to-all",
        )
        work.keep = (send, recv)  # NOTE: the buffers must outlive the collective
        return recv, work

    def _all_to_all_messages(self, send, send_counts, recv, recv_counts) -> Work:
        self._check_star(send_counts)
        self._check_star(recv_counts)
        peers = self.peers
        sends = list(zip(range(self.world_size), send.split(send_counts), strict=True))
        recvs = list(zip(range(self.world_size), recv.split(recv_counts), strict=True))
        recvs[self.rank][1].copy_(sends[self.rank][1])
        return self._messages(
            [(r, t) for r, t in sends if r in peers and len(t)],
            [(r, t) for r, t in recvs if r in peers and len(t)],
            "all-to-all",
        )

    def start_exchange_counts(self, counts: list[int]) -> tuple[torch.Tensor, Work]:
        """Send counts[r] to rank r; what each rank sent here, once `wait`ed for."""
        send = torch.tensor(counts, dtype=torch.long, device=self.device)
        if self.is_point_to_point:
            self._check_star(counts)
            recv = torch.zeros_like(send)
            recv[self.rank] = send[self.rank]
            pairs = lambda t: [(r, t[r : r + 1]) for r in self.peers]  # noqa: E731
            return recv, self._messages(pairs(send), pairs(recv), "count exchange")
        recv = torch.empty_like(send)
        work = self._start(
            lambda: [self.group.alltoall_base(recv, send, [], [], dist.AllToAllOptions())],
            "count exchange",
        )
        work.keep = (send, recv)
        return recv, work

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        self.wait(self.start_broadcast(tensor))
        return tensor

    def all_to_all(
        self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> torch.Tensor:
        recv, work = self.start_all_to_all(send, send_counts, recv_counts)
        self.wait(work)
        return recv

    def exchange_counts(self, counts: list[int]) -> list[int]:
        recv, work = self.start_exchange_counts(counts)
        self.wait(work)
        return recv.tolist()

    def ack(self) -> None:
        """A round trip with nothing in it (a count exchange of zeros): rank 0 returns once
        every shard has answered (PING, PLACE)."""
        self.exchange_counts([0] * self.world_size)

    def close(self) -> None:
        """Leave the group by aborting it, on both backends: with a dead or hung peer a plain
        teardown would wait on collectives that never finish; NCCL's abort also frees the
        communicator and any kernel still waiting on the GPU, so the process can form a new
        group (the replica's rebuild)."""
        group, self.group = self.group, None
        if group is not None:
            group.abort()
