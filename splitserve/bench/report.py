"""Benchmark results as JSON and PNG plots (matplotlib, headless)."""

from __future__ import annotations

import json
import os

JSON_SCHEMA_VERSION = 1


def write_json(path: str, config: dict, summary: dict, records: list, sweep: dict | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"schema_version": JSON_SCHEMA_VERSION, "config": config, "summary": summary,
           "sweep": sweep or {}, "records": [r.to_json() for r in records]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_cdfs(path: str, runs: dict[str, list]) -> None:
    """Latency CDFs (TTFT and TPOT) of several runs, one line each."""
    import numpy as np
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, records in runs.items():
        for ax, metric in zip(axes, ("ttft", "tpot")):
            v = np.sort([getattr(r, metric) for r in records if r.ok and getattr(r, metric) is not None])
            if v.size:
                ax.plot(v * 1000, np.arange(1, v.size + 1) / v.size, label=label)
    for ax, name in zip(axes, ("TTFT (ms)", "TPOT (ms)")):
        ax.set_xlabel(name)
        ax.set_ylabel("share of requests")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(path: str, sweeps: dict[str, dict[float, float]], goodputs: dict[str, float],
               target: float = 0.9) -> None:
    """SLO attainment against request rate, with each system's goodput marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, points in sweeps.items():
        rates = sorted(points)
        line, = ax.plot(rates, [points[r] * 100 for r in rates], marker="o", label=f"{label} "
                        f"(goodput {goodputs.get(label, 0):.2f} req/s)")
        if goodputs.get(label):
            ax.axvline(goodputs[label], color=line.get_color(), linestyle=":", alpha=0.7)
    ax.axhline(target * 100, color="gray", linestyle="--", label=f"{target:.0%} target")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 105)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
