"""Collectives between one attention rank (0) and the expert shards (1..N).

A standalone torch.distributed process group per replica (not the global default group, so a
process can rebuild it, and tests can hold several): gloo on CPU, NCCL on CUDA. Rank 0 hosts
the rendezvous store on a free port. Every operation waits at most `timeout_s`.
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist


class TransportError(RuntimeError):
    """A collective failed or timed out: a peer died, hung or could not join."""


def host_store(host: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free port (`store.port`)."""
    return dist.TCPStore(
        host,
        0,
        world_size,
        True,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


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
    ) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout = timeout
        try:
            if device.type == "cuda":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timeout
                self.group = dist.ProcessGroupNCCL(store, rank, world_size, options)
            else:
                options = dist.ProcessGroupGloo._Options()
                options._timeout = timeout
                options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
                self.group = dist.ProcessGroupGloo(store, rank, world_size, options)
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
    ) -> CollectiveTransport:
        """A shard's side: connect to rank 0's store and join the group."""
        store = dist.TCPStore(
            host, port, world_size, False, timeout=datetime.timedelta(seconds=timeout_s)
        )
        return cls(store, rank, world_size, device, timeout_s, local_host)

    def _wait(self, work, what: str) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as exc:
            raise TransportError(f"{what} failed on rank {self.rank}: {exc}") from exc

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` to everyone (in place)."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self._wait(self.group.broadcast([tensor], options), "header broadcast")
        return tensor

    def all_to_all(
        self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> torch.Tensor:
        """Rows of `send` [sum(send_counts), ...] in rank order go to each rank; returns the
        rows received [sum(recv_counts), ...] in rank order."""
        recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
        self._wait(
            self.group.alltoall_base(
                recv, send.contiguous(), recv_counts, send_counts, dist.AllToAllOptions()
            ),
            "all-to-all",
        )
        return recv

    def exchange_counts(self, counts: list[int]) -> list[int]:
        """Send counts[r] to rank r; returns what each rank sent here."""
        send = torch.tensor(counts, dtype=torch.long, device=self.device)
        recv = torch.empty_like(send)
        self._wait(
            self.group.alltoall_base(recv, send, [], [], dist.AllToAllOptions()), "count exchange"
        )
        return recv.tolist()

    def close(self) -> None:
        """Leave the group. NCCL communicators are aborted: with a dead peer, a plain
        teardown would wait on collectives that never finish."""
        if self.device.type == "cuda":
            self.group.abort()
        self.group = None
