"""Analogues of the paper's figures, written as PNG files.

Figures are built on matplotlib's object API with an explicit Agg canvas, so
importing this module never touches pyplot's global backend or state (safe in
headless jobs and alongside other plotting code).  Every file is written to a
with storage.write_atomic (a local temporary renamed into place, or one
upload to Cloud Storage), so readers never see a half-written PNG.
"""

from __future__ import annotations

import io
import os
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cai_jax import storage

_DPI = 100


def _new_figure(ncols: int = 1, nrows: int = 1, size=(6.0, 4.5), **kwargs):
    fig = Figure(figsize=size, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def _save_atomic(fig: Figure, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    storage.write_atomic(path, png.getvalue())
    return path


def _require_points(points: Sequence[Mapping[str, Any]], keys: Sequence[str], what: str):
    if points is None or len(points) == 0:
        raise ValueError(f"{what}: no points to plot")
    for i, p in enumerate(points):
        missing = [k for k in keys if k not in p]
        if missing:
            raise ValueError(f"{what}: point {i} lacks key(s) {missing}; got {sorted(p)}")


def _group_by_method(points):
    """Points per method, keeping first-seen method order and point order."""
    groups: dict[str, list] = defaultdict(list)
    for p in points:
        groups[str(p["method"])].append(p)
    return groups


def _error_bars(points, center_key, lo_key, hi_key):
    """(2, n) asymmetric error array, or None unless every point has bounds."""
    if not all(lo_key in p and hi_key in p for p in points):
        return None
    c = np.array([float(p[center_key]) for p in points])
    lo = np.array([float(p[lo_key]) for p in points])
    hi = np.array([float(p[hi_key]) for p in points])
    if np.any(lo > c) or np.any(hi < c):
        raise ValueError(f"interval [{lo_key}, {hi_key}] must contain {center_key}")
    return np.stack([c - lo, hi - c])


def _check_positive_params(points, what):
    if any(not float(p["n_params"]) > 0 for p in points):
        raise ValueError(f"{what}: n_params must be positive for a log axis")


def plot_harmless_vs_helpful(
    points: Sequence[Mapping[str, Any]], path, title: str | None = None
) -> str:
    """Figure 2: harmlessness Elo (y) vs helpfulness Elo (x), one line per method.

    Each point is a dict {method, label, helpful_elo, harmless_elo} with
    optional helpful_lo/helpful_hi and harmless_lo/harmless_hi interval bounds.
    Points of a method are joined in the given order (its RL checkpoints).
    """
    _require_points(points, ["method", "helpful_elo", "harmless_elo"], "plot_harmless_vs_helpful")
    fig, axes = _new_figure()
    ax = axes[0, 0]
    for method, pts in _group_by_method(points).items():
        x = [float(p["helpful_elo"]) for p in pts]
        y = [float(p["harmless_elo"]) for p in pts]
        ax.errorbar(
            x,
            y,
            xerr=_error_bars(pts, "helpful_elo", "helpful_lo", "helpful_hi"),
            yerr=_error_bars(pts, "harmless_elo", "harmless_lo", "harmless_hi"),
            marker="o",
            capsize=3,
            label=method,
        )
        for p, xi, yi in zip(pts, x, y):
            if p.get("label"):
                ax.annotate(str(p["label"]), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("Helpfulness Elo")
    ax.set_ylabel("Harmlessness Elo")
    ax.set_title(title or "Harmlessness vs helpfulness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_atomic(fig, path)


def plot_elo_vs_params(points: Sequence[Mapping[str, Any]], path, title: str | None = None) -> str:
    """Figure 3: Elo vs number of parameters (log x), one line per method.

    Each point is a dict {method, n_params} plus helpful_elo and/or
    harmless_elo (optional *_lo/*_hi bounds, e.g. helpful_lo).  One panel is
    drawn for each of helpfulness / harmlessness present in the points.
    """
    _require_points(points, ["method", "n_params"], "plot_elo_vs_params")
    metrics = [m for m in ("helpful", "harmless") if any(f"{m}_elo" in p for p in points)]
    if not metrics:
        raise ValueError("plot_elo_vs_params: points need helpful_elo and/or harmless_elo")
    _check_positive_params(points, "plot_elo_vs_params")
    fig, axes = _new_figure(ncols=len(metrics), size=(5.0 * len(metrics), 4.0))
    for ax, metric in zip(axes[0], metrics):
        key = f"{metric}_elo"
        for method, pts in _group_by_method(points).items():
            pts = sorted((p for p in pts if key in p), key=lambda p: float(p["n_params"]))
            if not pts:
                continue
            ax.errorbar(
                [float(p["n_params"]) for p in pts],
                [float(p[key]) for p in pts],
                yerr=_error_bars(pts, key, f"{metric}_lo", f"{metric}_hi"),
                marker="o",
                capsize=3,
                label=method,
            )
        ax.set_xscale("log")
        ax.set_xlabel("Parameters")
        ax.set_ylabel(f"{metric.capitalize()}ness Elo")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title or "Elo vs model size")
    return _save_atomic(fig, path)


def plot_accuracy_vs_params(
    points: Sequence[Mapping[str, Any]], path, title: str | None = None
) -> str:
    """Figure 4: accuracy on comparison sets vs number of parameters.

    Each point is a dict {method, n_params, accuracy} with optional
    accuracy_lo/accuracy_hi.  A dashed line marks chance (0.5).
    """
    _require_points(points, ["method", "n_params", "accuracy"], "plot_accuracy_vs_params")
    _check_positive_params(points, "plot_accuracy_vs_params")
    fig, axes = _new_figure()
    ax = axes[0, 0]
    for method, pts in _group_by_method(points).items():
        pts = sorted(pts, key=lambda p: float(p["n_params"]))
        ax.errorbar(
            [float(p["n_params"]) for p in pts],
            [float(p["accuracy"]) for p in pts],
            yerr=_error_bars(pts, "accuracy", "accuracy_lo", "accuracy_hi"),
            marker="o",
            capsize=3,
            label=method,
        )
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("Parameters")
    ax.set_ylabel("Accuracy")
    ax.set_title(title or "Comparison accuracy vs model size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save_atomic(fig, path)


def plot_score_vs_revisions(
    scores: Mapping[str, Any],
    path,
    ylabel: str = "PM harmlessness score",
    title: str | None = None,
) -> str:
    """Figure 5: preference-model score vs number of revisions.

    ``scores`` maps a series name (e.g. model size) to an array
    [n_prompts, n_revisions + 1]; column 0 scores the initial response and
    column k the response after k critique-revision rounds.  Plots the mean
    over prompts with standard-error bars.
    """
    if not scores:
        raise ValueError("plot_score_vs_revisions: no series to plot")
    fig, axes = _new_figure()
    ax = axes[0, 0]
    for name, arr in scores.items():
        arr = np.asarray(arr, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(
                f"plot_score_vs_revisions: series {name!r} must be a non-empty "
                f"[n_prompts, n_revisions+1] array; got shape {arr.shape}"
            )
        mean = arr.mean(axis=0)
        n = arr.shape[0]
        sem = arr.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros_like(mean)
        ax.errorbar(np.arange(arr.shape[1]), mean, yerr=sem, marker="o", capsize=3, label=str(name))
    ax.set_xlabel("Number of revisions")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "Preference-model score vs revisions")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_atomic(fig, path)


def plot_ppo_curves(
    history: Sequence[Mapping[str, Any]],
    path,
    kl_target: float | None = None,
    reward_key: str = "reward_mean",
    kl_key: str = "kl",
    title: str | None = None,
    extra_keys: Sequence[str] = (),
) -> str:
    """Reward (top) and KL (bottom) per PPO iteration.

    ``history`` is a list of per-iteration metric dicts; the x value is
    ``iteration`` when present, else the list position.  Entries missing a
    metric leave a gap.  ``kl_target`` draws a dashed horizontal line.
    ``extra_keys`` are drawn too, on the reward panel if they name a reward
    and on the KL panel if they name a KL (e.g. the held-out reward, and the
    non-negative k3 KL estimate beside k1, whose single-sample values can be
    negative).
    """
    if not history:
        raise ValueError("plot_ppo_curves: empty history")
    for key in (reward_key, kl_key):
        if not any(key in h for h in history):
            raise ValueError(f"plot_ppo_curves: no history entry has key {key!r}")
    x = np.array([float(h.get("iteration", i)) for i, h in enumerate(history)])
    fig, axes = _new_figure(nrows=2, size=(6.0, 6.0), sharex=True)
    panels = [(axes[0, 0], [reward_key] + [k for k in extra_keys if "reward" in k], "Reward"),
              (axes[1, 0], [kl_key] + [k for k in extra_keys if "kl" in k], "KL")]
    for ax, keys, label in panels:
        for key in keys:
            y = np.array([float(h[key]) if h.get(key) is not None else np.nan for h in history])
            seen = ~np.isnan(y)
            ax.plot(x[seen], y[seen], marker="." if seen.sum() < 50 else None, label=key)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    if kl_target is not None:
        axes[1, 0].axhline(kl_target, color="gray", linestyle="--", label="KL target")
        axes[1, 0].legend(fontsize=8)
    axes[1, 0].set_xlabel("Iteration")
    fig.suptitle(title or "PPO training")
    return _save_atomic(fig, path)


def reliability_bins(probs, labels, n_bins: int = 10):
    """Bin predictions into equal-width bins on [0, 1] for a reliability diagram.

    Returns (mean_predicted, observed_frequency, counts, ece) where the first
    three are per bin (NaN for empty bins) and ece is the count-weighted mean
    |observed - predicted| (expected calibration error).  Labels may be soft.
    A prediction of exactly 1.0 falls in the last bin.
    """
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if p.size == 0:
        raise ValueError("reliability: no predictions")
    if p.shape != y.shape:
        raise ValueError(f"reliability: {p.size} probabilities but {y.size} labels")
    for name, v in (("probabilities", p), ("labels", y)):
        if not np.all((v >= 0.0) & (v <= 1.0)):
            raise ValueError(f"reliability: {name} must lie in [0, 1]")
    if n_bins < 1:
        raise ValueError(f"reliability: n_bins must be >= 1; got {n_bins}")
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.bincount(idx, p, n_bins) / counts
        observed = np.bincount(idx, y, n_bins) / counts
    filled = counts > 0
    ece = float(np.sum(counts[filled] * np.abs(observed[filled] - mean_pred[filled])) / p.size)
    return mean_pred, observed, counts, ece


def plot_reliability(probs, labels, path, n_bins: int = 10, title: str | None = None) -> str:
    """Reliability diagram for a judge: observed frequency vs predicted probability.

    Top panel: per-bin observed frequency against mean predicted probability,
    with the diagonal of perfect calibration.  Bottom panel: counts per bin.
    """
    mean_pred, observed, counts, ece = reliability_bins(probs, labels, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    fig, axes = _new_figure(nrows=2, size=(5.0, 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax, hist = axes[0, 0], axes[1, 0]
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
    filled = counts > 0
    ax.plot(mean_pred[filled], observed[filled], marker="o", label="judge")
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("Observed frequency")
    ax.set_title(title or f"Reliability (ECE = {ece:.3f})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    hist.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="black", alpha=0.6)
    hist.set_xlim(0.0, 1.0)
    hist.set_xlabel("Predicted probability")
    hist.set_ylabel("Count")
    return _save_atomic(fig, path)
