"""`moe-serve run`: start a private Ray instance (or join a cluster), start Serve's HTTP and gRPC
proxies, deploy the app, print where it listens, block until SIGINT/SIGTERM, then shut
everything down. The models were checked before (deploy/validate.py); a failure while
deploying is one line, not a traceback.

What the Serve processes must see is put in the environment of the private Ray instance before
it starts (its processes inherit it): the API key of the config file (so that it never travels
in the application's args) and the gRPC proxy's message limit. A joined cluster's nodes must
have them in their own environment."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from moe_serve.deploy.app import APP_NAME, GRPC_SERVICERS, build_app, serve_logging
from moe_serve.deploy.config import API_KEY_ENV, ServeConfig
from moe_serve.deploy.ingress import HA_PROXY_ENV, set_private_instance_env
from moe_serve.deploy.priority import WORKER_NICENESS, WORKER_NICENESS_ENV

GRPC_MAX_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"  # read by Serve's proxies at start


def logical_cpus(config: ServeConfig) -> int:
    """CPUs a local Ray needs to place every replica at max scale (fractions add up)."""
    needed = sum(
        sum(bundle["CPU"] for bundle in m.gang_bundles(False)) * m.autoscaling.max_replicas
        for m in config.models
    )
    return max(os.cpu_count() or 1, int(needed) + 2)


class JoinError(RuntimeError):
    """The Ray cluster at the given address did not let us in."""


def init_ray(config: ServeConfig, address: str | None, log_level: str) -> None:
    level = log_level.upper()
    if address:
        try:
            ray.init(address=address, logging_level=level)
        except ConnectionError as exc:
            raise JoinError(_join_failure(address, exc)) from None
    else:
        os.environ[GRPC_MAX_MESSAGE_ENV] = str(config.grpc.max_message_bytes)
        os.environ.setdefault(WORKER_NICENESS_ENV, WORKER_NICENESS)  # deploy/priority.py
        set_private_instance_env()  # deploy/ingress.py
        if config.api_key is not None:
            os.environ[API_KEY_ENV] = config.api_key
        # NOTE: "local": our own instance even where `ray start` left a cluster file behind
        # (live or stale), which a plain ray.init() would try to join
        ray.init(
            address="local",
            num_cpus=logical_cpus(config),
            include_dashboard=False,
            logging_level=level,
        )


def start(config: ServeConfig, address: str | None = None, log_level: str = "warning") -> None:
    """Ray (the cluster at `address`, else a private local instance), Serve with both proxies,
    the application."""
    if not ray.is_initialized():
        init_ray(config, address, log_level)
    logging.getLogger("ray.serve").setLevel(log_level.upper())  # NOTE: this process's Serve
    serve.start(
        http_options={"host": config.http.host, "port": config.http.port},
        grpc_options=gRPCOptions(port=config.grpc.port, grpc_servicer_functions=GRPC_SERVICERS),
        logging_config=serve_logging(log_level),
    )
    app = build_app(config.model_copy(update={"api_key": None}), log_level)
    serve.run(app, name=APP_NAME, route_prefix="/")


def gateway_requires_api_key() -> bool:
    """What the running gateway found in its environment."""
    gateway = serve.get_deployment_handle("Gateway", APP_NAME)
    return gateway.requires_api_key.remote().result(timeout_s=60)


def _join_failure(address: str, error: ConnectionError) -> str:
    """Ray's reason (e.g. a token it was not given) is the cause of its ConnectionError."""
    cause = _last_line(str(error.__cause__ or ""))
    return f"could not join the Ray cluster at {address}" + (f": {cause}" if cause else "")


def _grpc_host(config: ServeConfig) -> str:
    # NOTE: HAProxy (deploy/ingress.py) listens for gRPC where HTTP listens; Serve's own gRPC
    # proxy, on every interface
    return config.http.host if os.environ.get(HA_PROXY_ENV) == "1" else "0.0.0.0"


def describe(config: ServeConfig, requires_api_key: bool) -> str:
    lines = [
        f"HTTP (OpenAI API)  http://{config.http.host}:{config.http.port}/v1",
        f"gRPC               {_grpc_host(config)}:{config.grpc.port} (moeserving.v1.MoEServing)",
        "API key            "
        + ("required" if requires_api_key else f"none (set api_key or ${API_KEY_ENV})"),
        "models:",
    ]
    lines += [
        f"  {m.name:<20} {m.source}  expert_parallel_size={m.expert_parallel_size}"
        for m in config.models
    ]
    return "\n".join(lines)


def failure_line(config: ServeConfig, error: Exception) -> str:
    """A failed start as one line: the failing models' last error lines (Serve keeps each
    deployment's error), else the exception's last line."""
    causes = _deployment_errors(config) if ray.is_initialized() else []
    if causes:
        return "; ".join(causes)
    if isinstance(error, JoinError):
        return str(error)
    return f"could not start: {_last_line(str(error)) or type(error).__name__}"


def _deployment_errors(config: ServeConfig) -> list[str]:
    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:  # NOTE: nothing more to learn from a cluster that is going away
        return []
    if app is None:
        return []
    names = {m.deployment_name: f"model {m.name!r}" for m in config.models}
    return [
        f"{names.get(name, name)} failed to start: {_last_line(status.message)}"
        for name, status in app.deployments.items()
        if status.status in ("DEPLOY_FAILED", "UNHEALTHY")
    ]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _trap_signals(stop: threading.Event) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())


def _shut_down() -> None:
    print("shutting down", flush=True)
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def run(config: ServeConfig, address: str | None = None, log_level: str = "warning") -> int:
    """Serve `config` until SIGINT/SIGTERM: 0; 1 if it could not start (said in one line);
    130 if interrupted while starting. Ray is shut down in every case."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # NOTE: while starting: abort
    started = time.monotonic()
    try:
        start(config, address, log_level)
        _trap_signals(stop)  # NOTE: after ray.init, which installs its own SIGTERM handler
        requires_api_key = gateway_requires_api_key()
        banner = describe(config, requires_api_key)
        print(f"ready in {time.monotonic() - started:.1f}s\n{banner}", flush=True)
        if address and os.environ.get(API_KEY_ENV) and not requires_api_key:
            print(
                f"moe-serve: warning: ${API_KEY_ENV} is set here, but the gateway runs on the "
                "cluster's nodes and found none in their environment: no API key is required",
                file=sys.stderr,
                flush=True,
            )
        stop.wait()
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # NOTE: Ray's and Serve's errors, reported as one line
        print(f"moe-serve: {failure_line(config, exc)}", file=sys.stderr, flush=True)
        return 1
    finally:
        _shut_down()
    return 0
