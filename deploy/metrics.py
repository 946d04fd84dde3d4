"""Prometheus metrics: request-level ones measured at the gateway, engine-level ones (KV usage,
queues, per-expert tokens, dispatch bytes) pushed by every model replica to `MetricsHub`."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from ray import serve

from moe_serve.cluster.outputs import RequestOutput
from moe_serve.cluster.stats import ReplicaStats
from moe_serve.deploy.access_log import AccessRecord
from moe_serve.deploy.priority import yield_cpu_to_engines

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STALE_AFTER_S = 30.0


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class MetricsHub:
    """The latest engine stats of every model replica (replicas push every few seconds)."""

    def __init__(self) -> None:
        yield_cpu_to_engines()
        self.latest: dict[tuple[str, str], tuple[float, ReplicaStats]] = {}

    def report(self, model: str, replica: str, stats: ReplicaStats) -> None:
        self.latest[(model, replica)] = (time.monotonic(), stats)

    def model_health(self, within_s: float) -> dict[str, dict]:
        """Per model with a replica heard from in the last `within_s` seconds: `ready`, how
        many of those replicas serve, and `degraded`, why the others cannot (replica -> the
        reason: their expert shards are down)."""
        cutoff, health = time.monotonic() - within_s, {}
        for (model, replica), (at, stats) in self.latest.items():
            if at < cutoff:
                continue
            entry = health.setdefault(model, {"ready": 0, "degraded": {}})
            if stats.shards.shards_down:
                entry["degraded"][replica] = stats.shards.shards_down
            else:
                entry["ready"] += 1
        return health

    def snapshot(self) -> list[tuple[str, str, ReplicaStats]]:
        """Stats of the replicas heard from in the last STALE_AFTER_S seconds."""
        cutoff = time.monotonic() - STALE_AFTER_S
        self.latest = {k: v for k, v in self.latest.items() if v[0] >= cutoff}
        return [(model, replica, stats) for (model, replica), (_, stats) in self.latest.items()]


GAUGES = (  # (name after moe_serve_, help)
    ("num_requests_running", "sequences running"),
    ("num_requests_waiting", "sequences waiting"),
    ("kv_cache_usage_ratio", "fraction of KV blocks used"),
)
COUNTERS = (
    ("preemptions", "sequences preempted"),
    ("shard_rebuilds", "expert shard group rebuilds"),
    ("shard_rebuild_failures", "failed expert shard group rebuilds"),
    ("engine_steps", "engine steps"),
    ("prefix_cache_queries", "prompt tokens looked up in the prefix cache"),
    ("prefix_cache_hits", "prompt tokens served from the prefix cache"),
)


def _families(family: type, labels: list[str], specs: tuple[tuple[str, str], ...]) -> dict:
    return {key: family(f"moe_serve_{key}", text, labels=labels) for key, text in specs}


class ReplicaCollector:
    """Renders the hub's snapshot (set before each scrape) as metric families."""

    def __init__(self) -> None:
        self.snapshot: list[tuple[str, str, ReplicaStats]] = []

    def collect(self):
        labels = ["model", "replica"]
        gauges = _families(GaugeMetricFamily, labels, GAUGES)
        counters = _families(CounterMetricFamily, labels, COUNTERS)
        experts = CounterMetricFamily(
            "moe_serve_expert_tokens",
            "tokens routed to each expert",
            labels=[*labels, "layer", "expert"],
        )
        shard_load = CounterMetricFamily(
            "moe_serve_shard_tokens",
            "(token, expert) pairs each expert shard computed (EPLB evens them out)",
            labels=[*labels, "layer", "shard"],
        )
        layouts = CounterMetricFamily(
            "moe_serve_eplb_layouts", "new expert layouts applied (EPLB)", labels=labels
        )
        overlapped = CounterMetricFamily(
            "moe_serve_overlapped_steps",
            "engine steps run as two micro-batches in ping-pong",
            labels=labels,
        )
        moved = CounterMetricFamily(
            "moe_serve_dispatch_bytes", "bytes moved to/from shards", labels=[*labels, "direction"]
        )
        for model, replica, stats in self.snapshot:
            key = [model, replica]
            core, shards = stats.core, stats.shards
            gauges["num_requests_running"].add_metric(key, core.num_running)
            gauges["num_requests_waiting"].add_metric(key, core.num_waiting)
            gauges["kv_cache_usage_ratio"].add_metric(key, core.kv_usage)
            counters["preemptions"].add_metric(key, core.num_preemptions)
            counters["shard_rebuilds"].add_metric(key, shards.num_rebuilds)
            counters["shard_rebuild_failures"].add_metric(key, shards.num_rebuild_failures)
            counters["engine_steps"].add_metric(key, core.num_steps)
            counters["prefix_cache_queries"].add_metric(key, core.prefix_cache_queries)
            counters["prefix_cache_hits"].add_metric(key, core.prefix_cache_hits)
            dispatch = shards.dispatch
            if dispatch is not None:
                for layer, row in enumerate(dispatch.expert_tokens):
                    for expert, count in enumerate(row):
                        experts.add_metric([*key, str(layer), str(expert)], count)
                for layer, row in enumerate(dispatch.shard_tokens):
                    for shard, count in enumerate(row):
                        shard_load.add_metric([*key, str(layer), str(shard)], count)
                layouts.add_metric(key, dispatch.num_layouts)
                overlapped.add_metric(key, dispatch.num_overlapped_steps)
                moved.add_metric([*key, "sent"], dispatch.bytes_sent)
                moved.add_metric([*key, "received"], dispatch.bytes_received)
                moved.add_metric([*key, "minimum"], dispatch.min_bytes)
        yield from gauges.values()
        yield from counters.values()
        yield experts
        yield shard_load
        yield layouts
        yield overlapped
        yield moved


class RequestTracker:
    """Timing and token counts of one API request (its prompts run concurrently), for the
    metrics and the request's access line."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        model: str,
        prompts: list[list[int]],
        access: AccessRecord,
    ) -> None:
        self.metrics, self.model, self.access = metrics, model, access
        self.start = time.monotonic()
        self.first: dict[tuple[int, int], float] = {}  # (prompt, choice) -> first token time
        self.tokens: dict[tuple[int, int], int] = {}
        self.cached: dict[int, int] = {}  # prompt -> its tokens served from the prefix cache
        access.prompt_tokens = sum(len(p) for p in prompts)
        metrics.prompt_tokens.labels(model).inc(access.prompt_tokens)

    def on_output(self, index: int, output: RequestOutput) -> None:
        now = time.monotonic()
        if output.num_cached_tokens:
            self.cached[index] = output.num_cached_tokens
        for delta in output.deltas:
            key, new = (index, delta.index), len(delta.token_ids)
            if new and key not in self.first:
                self.first[key] = now
                if delta.index == 0:  # NOTE: TTFT once per prompt; its n samples start together
                    self.metrics.ttft.labels(self.model).observe(now - self.start)
            self.tokens[key] = self.tokens.get(key, 0) + new
            self.access.completion_tokens += new
            self.metrics.generation_tokens.labels(self.model).inc(new)

    @property
    def num_cached_tokens(self) -> int:
        return sum(self.cached.values())

    def fail(self, status: int) -> None:
        """The request failed after its response started (the error went in-band)."""
        self.access.status = str(status)

    def done(self) -> None:
        end = time.monotonic()
        self.metrics.latency.labels(self.model).observe(end - self.start)
        for key, first in self.first.items():
            if self.tokens[key] > 1:
                self.metrics.tpot.labels(self.model).observe((end - first) / (self.tokens[key] - 1))


class GatewayMetrics:
    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry()
        self.requests = Counter(
            "moe_serve_requests",
            "API requests by outcome",
            ["model", "api", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "moe_serve_prompt_tokens", "prompt tokens", ["model"], registry=registry
        )
        self.generation_tokens = Counter(
            "moe_serve_generation_tokens", "generated tokens", ["model"], registry=registry
        )
        self.ttft = Histogram(
            "moe_serve_time_to_first_token_seconds",
            "time to first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "moe_serve_time_per_output_token_seconds",
            "time per output token after the first",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "moe_serve_request_latency_seconds",
            "end-to-end latency",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue = Gauge(
            "moe_serve_requests_in_flight",
            "requests at the gateway, per model",
            ["model"],
            registry=registry,
        )
        self.replicas = ReplicaCollector()
        registry.register(self.replicas)

    def in_flight(self, model: str, delta: int) -> None:
        self.queue.labels(model).inc(delta)

    def track(self, model: str, prompts: list[list[int]], access: AccessRecord) -> RequestTracker:
        return RequestTracker(self, model, prompts, access)

    def count(self, model: str, api: str, status: int) -> None:
        self.requests.labels(model, api, str(status)).inc()

    def render(self, snapshot: list[tuple[str, str, ReplicaStats]]) -> bytes:
        self.replicas.snapshot = snapshot
        return generate_latest(self.registry)
