"""PNG plots of benchmark results (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _finish(fig, ax, path: Path) -> Path:
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def throughput_plot(
    rows: list[dict], baseline_tokens_per_s: float | None, title: str, path: Path
) -> Path:
    """Output tokens/s against concurrency, with the baseline as a reference line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [r["concurrency"] for r in rows],
        [r["output_tokens_per_s"] for r in rows],
        marker="o",
        label="moe-serve",
    )
    if baseline_tokens_per_s:
        ax.axhline(
            baseline_tokens_per_s,
            color="gray",
            linestyle="--",
            label="transformers generate (static batches)",
        )
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens / s")
    ax.set_title(title)
    ax.set_xscale("log", base=2)
    return _finish(fig, ax, path)


def latency_cdf(rows: list[dict], title: str, path: Path) -> Path:
    """End-to-end latency CDF, one curve per concurrency level."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        latencies = row["latencies_s"]
        if latencies:
            fractions = [(i + 1) / len(latencies) for i in range(len(latencies))]
            ax.step(latencies, fractions, where="post", label=f"{row['concurrency']} concurrent")
    ax.set_xlabel("end-to-end latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    return _finish(fig, ax, path)


def step_plot(rows: list[dict], path: Path) -> Path:
    """Decode step time against batch size, one curve per expert-parallel size."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for ep in sorted({r["ep"] for r in rows}):
        points = sorted((r["batch"], r["ms_per_step"]) for r in rows if r["ep"] == ep)
        ax.plot(*zip(*points, strict=True), marker="o", label=f"EP = {ep}")
    ax.set_xlabel("batch (sequences decoding)")
    ax.set_ylabel("ms per decode step")
    ax.set_xscale("log", base=2)
    return _finish(fig, ax, path)
