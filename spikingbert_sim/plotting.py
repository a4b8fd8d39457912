"""Figures of the paper, regenerated from recorded traces. Every function takes an ``ax``, draws
on it and returns it (snnTorch's spikeplot style); :func:`save_figure` writes a figure atomically.

* :func:`plot_layer_convergence`: Fig. 2a, the ASR of every layer over time steps.
* :func:`plot_output_comparison`: Fig. 2b, the output layer's ASR of several models (full
  precision vs quantized) on the same inputs.
* :func:`plot_raster`: spike raster of selected neurons.
* :func:`plot_accuracy_vs_timesteps`: accuracy (or any metric) against T.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are saved, never shown
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .fileio import atomic_path  # noqa: E402


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def short_site(site: str) -> str:
    """``layer.2.output`` -> ``L2 output``; ``embeddings`` stays."""
    parts = site.split(".")
    return f"L{parts[1]} {'.'.join(parts[2:])}" if parts[0] == "layer" and len(parts) > 2 else site


def plot_layer_convergence(ax, traces: Mapping[str, Sequence[float]], sites: Sequence[str] | None = None,
                           deviation: bool = False, title: str | None = "Layer-wise ASR convergence"):
    """Fig. 2a: mean ASR of each site against the time step.

    Args:
        traces: site -> mean ASR trace, shape (T,).
        sites: which sites to draw (default: all, in the mapping's order).
        deviation: draw |a[t] − a[T]| on a log axis instead of a[t], which shows the ~1/t approach.
    """
    sites = list(traces) if sites is None else list(sites)
    cmap = plt.get_cmap("viridis")
    for i, site in enumerate(sites):
        a = _np(traces[site])
        t = np.arange(1, a.size + 1)
        y = np.abs(a - a[-1]) if deviation else a
        ax.plot(t, y, color=cmap(i / max(len(sites) - 1, 1)), lw=1.5, label=short_site(site))
    ax.set_xlabel("time step t")
    if deviation:
        ax.set_yscale("log")
        ax.set_ylabel("|ASR(t) − ASR(T)|")
    else:
        ax.set_ylabel("average spiking rate")
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small", ncol=2 if len(sites) > 6 else 1)
    ax.grid(alpha=0.3)
    return ax


def plot_output_comparison(ax, traces: Mapping[str, Sequence[float]],
                           title: str | None = "Output-layer ASR: full precision vs quantized"):
    """Fig. 2b: the output layer's mean ASR trace of several models (label -> trace (T,))."""
    styles = ["-", "--", ":", "-."]
    for i, (label, trace) in enumerate(traces.items()):
        a = _np(trace)
        ax.plot(np.arange(1, a.size + 1), a, styles[i % len(styles)], lw=2, label=label)
    ax.set_xlabel("time step t")
    ax.set_ylabel("average spiking rate (output layer)")
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def plot_raster(ax, raster, title: str | None = None, neuron_labels: Sequence[int] | None = None):
    """Spike raster: ``raster`` is (T, N) 0/1 (time first); a dot per spike."""
    r = _np(raster)
    if r.ndim != 2:
        raise ValueError(f"raster must be (T, neurons), got shape {r.shape}")
    t, n = np.nonzero(r)
    ax.scatter(t + 1, n, s=4, marker="|", color="black", linewidths=0.8)
    ax.set_xlim(0.5, r.shape[0] + 0.5)
    ax.set_ylim(-0.5, r.shape[1] - 0.5)
    ax.set_xlabel("time step t")
    ax.set_ylabel("neuron")
    if neuron_labels is not None and len(neuron_labels) <= 16:
        ax.set_yticks(range(len(neuron_labels)), [str(i) for i in neuron_labels])
    if title:
        ax.set_title(title)
    return ax


def plot_accuracy_vs_timesteps(ax, curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
                               metric: str = "accuracy", title: str | None = "Accuracy vs time steps",
                               adaptive: Mapping[str, tuple[float, float]] | None = None):
    """Metric against T for several models: label -> (timesteps, values). ``adaptive``: label ->
    (mean time steps, metric) of adaptive stopping, drawn as a star in the curve's colour."""
    for label, (ts, values) in curves.items():
        (line,) = ax.plot(list(ts), list(values), marker="o", ms=3, label=label)
        if adaptive and label in adaptive:
            t, v = adaptive[label]
            ax.plot([t], [v], marker="*", ms=11, ls="none", color=line.get_color(), label=f"{label}, adaptive")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("time steps T")
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save ``fig`` to ``path`` through a temporary file and close it."""
    path = Path(path)
    try:
        with atomic_path(path, suffix=path.suffix) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
