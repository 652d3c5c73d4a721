"""Figures of the backward error modulation (matplotlib, Agg backend, no display needed).

- :func:`plot_error_moments`: the second moment of the error at every target layer, top of the chain
  on the left, log scale: without modulation (the same forward pass's unmodulated moments) and after
  it. The paper's Fig. 3 quantity is the ratio of the rightmost to the leftmost point.
- :func:`plot_ratio_history`: the bottom/top ratio over the updates (the paper's Fig. 3 itself).
- :func:`plot_training_curves`: the loss and the validation accuracy over the updates.
- :func:`plot_run`: those of a run, from its ``metrics.jsonl`` and its probe (what the trainer draws).

Every axis that counts optimizer updates is labelled ``update`` (the run's one clock), layer axes
have integer ticks, and a value that a log axis cannot show (zero, negative, not finite) is left out;
when none is left, the axes say so instead of coming out empty.

Figures are drawn on a ``matplotlib.figure.Figure`` with an Agg canvas, never through ``pyplot``, so
they touch no global backend state and work in headless training jobs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..modulation import ErrorModulation, ModulationStats
from .tracking import ratio_history

__all__ = ["plot_error_moments", "plot_ratio_history", "plot_run", "plot_training_curves"]

Which = Literal["before", "after", "unmodulated"]

_STYLE = {  # line style, marker, label
    "unmodulated": (":", "", "unmodulated"),
    "before": ("--", "", "arrived (before own scale)"),
    "after": ("-", ".", "after modulation"),
}


def _loggable(values: Sequence[float]) -> list[float]:
    """``values`` with what a log axis cannot show (<= 0, inf, nan) as gaps (nan, which plot skips)."""
    return [v if math.isfinite(v) and v > 0 else math.nan for v in map(float, values)]


def _note_if_empty(ax: Axes) -> None:
    """Write on a log axes that holds no point at all why it is empty (matplotlib would only warn)."""
    if not any(math.isfinite(y) for line in ax.get_lines() for y in line.get_ydata()):
        ax.set_ylim(0.1, 10.0)  # any positive range: no autoscaling over no data
        ax.text(0.5, 0.5, "no positive value to show on a log scale", transform=ax.transAxes, ha="center")


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    """Grid and legend (where there are labelled lines) on every axes, then the PNG."""
    for ax in fig.axes:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def plot_error_moments(
    stats_or_list: ModulationStats | Sequence[ModulationStats],
    path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    which: Sequence[Which] = ("unmodulated", "after"),
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Save a PNG of per-layer error second moments (log y) and return its path.

    Args:
        stats_or_list: one :class:`~timm_ortho.modulation.ModulationStats` or several (e.g. one per
            configuration or per step); each gets a colour, each moment kind a line style.
        path: where to write the PNG (parent folders are created).
        labels: one legend label per stats; default ``"0", "1", ...`` (none for a single stats).
        which: the moments to draw: ``"unmodulated"`` (what the same forward pass gives without
            modulation), ``"before"`` (as the error reached the layer), ``"after"`` (after its own
            rescaling: what the weight gradient sees).

    This synchronizes with the device (it reads the tensors).
    """
    stats = [stats_or_list] if isinstance(stats_or_list, ModulationStats) else list(stats_or_list)
    if not stats:
        raise ValueError("nothing to plot: pass a ModulationStats or a non-empty list of them")
    if labels is not None and len(labels) != len(stats):
        raise ValueError(f"got {len(labels)} labels for {len(stats)} stats")
    for w in which:
        if w not in _STYLE:
            raise ValueError(f"which entries must be among {tuple(_STYLE)}, got {w!r}")
    fig = Figure(figsize=(7.0, 4.0))
    ax = fig.add_subplot(yscale="log", title=title, ylabel=f"error second moment ({stats[0].statistic})")
    ax.set_xlabel("layer (0 = top of the chain, in backward firing order)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are counted, never fractional
    for i, st in enumerate(stats):
        prefix = "" if labels is None and len(stats) == 1 else f"{labels[i] if labels else i}: "
        for w in which:
            y = _loggable(st.moments(w).detach().to("cpu", torch.float64).tolist())
            ls, marker, label = _STYLE[w]
            ax.plot(range(len(y)), y, color=f"C{i % 10}", ls=ls, marker=marker, label=prefix + label)
    _note_if_empty(ax)
    return _save(fig, path, dpi)


def plot_ratio_history(
    history: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Save a PNG of the bottom/top second-moment ratio over training (the paper's Fig. 3).

    ``history`` maps a label (e.g. ``"L2"``, ``"orthonormal + modulation"``) to ``(steps, ratios)``,
    the ratios as numbers, e.g. ``float(stats.bottom_top_ratio())`` collected at logging time.
    """
    if not history:
        raise ValueError("nothing to plot: history is empty")
    fig = Figure(figsize=(7.0, 4.0))
    ax = fig.add_subplot(
        yscale="log", title=title, xlabel="update", ylabel="error second moment, bottom / top"
    )
    for label, (steps, ratios) in history.items():
        if len(steps) != len(ratios):
            raise ValueError(f"{label!r}: {len(steps)} steps but {len(ratios)} ratios")
        few = len(steps) <= 30  # markers, so that a short run's few points are seen
        ax.plot(list(steps), _loggable(ratios), label=label, marker="o" if few else None, ms=3)
    _note_if_empty(ax)
    return _save(fig, path, dpi)


def plot_training_curves(
    records: Sequence[Mapping[str, Any]], path: str | Path, *, dpi: int = 100
) -> Path | None:
    """Save a PNG of the training and validation loss and the validation accuracy against the update.

    ``records`` are the run's ``metrics.jsonl`` records (``"train"``: ``step``, ``loss``; ``"eval"``:
    ``step``, ``val_loss``, ``val_top1`` and, with more than 5 classes, ``val_top5``). Returns ``None``
    when there is neither.
    """
    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train"]
    keys = ("step", "val_loss", "val_top1", "val_top5")
    evals = [tuple(r.get(k) for k in keys) for r in records if r.get("type") == "eval"]
    if not train and not evals:
        return None
    fig = Figure(figsize=(10.0, 3.8))
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.set(xlabel="update", ylabel="loss", title="loss")
    acc_ax.set(xlabel="update", ylabel="validation accuracy (%)", title="validation accuracy")
    if train:  # every log record (--log-interval); markers, so that a short run's few points show
        steps, losses = zip(*train, strict=True)
        loss_ax.plot(steps, losses, marker="o" if len(steps) <= 30 else None, ms=3, label="training")
    if evals:  # every epoch
        steps, val_loss, top1, top5 = zip(*evals, strict=True)
        loss_ax.plot(steps, val_loss, marker="s", ms=4, ls="--", label="validation")
        acc_ax.plot(steps, top1, marker="o", ms=4, label="top-1")
        if any(v is not None for v in top5):
            acc_ax.plot(steps, top5, marker="s", ms=4, ls="--", label="top-5")
    return _save(fig, path, dpi)


def plot_run(run_dir: Path, model_name: str, probe: ErrorModulation | None, updates: int) -> list[str]:
    """A run's figures, from its ``metrics.jsonl``: the loss and accuracy curves; with a probe, the
    error moments of this process's last backward and the bottom/top ratio over the run. Returns
    the paths written."""
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    curves = plot_training_curves([json.loads(line) for line in lines], run_dir / "training_curves.png")
    pngs = [str(curves)] if curves is not None else []
    if probe is None:
        return pngs
    # With modulation, what the same forward gives without it and what the weight gradients saw;
    # without, the measured moments.
    modulated = not probe.measure_only
    which = ("unmodulated", "after") if modulated else ("before",)
    title = f"{model_name}: error second moments at update {updates}"
    moments = plot_error_moments(probe.last_stats(), run_dir / "error_moments.png", which=which, title=title)
    pngs.append(str(moments))
    history = ratio_history(metrics, unmodulated=modulated)
    if history:
        pngs.append(str(plot_ratio_history(history, run_dir / "bottom_top_ratio.png", title=model_name)))
    return pngs
