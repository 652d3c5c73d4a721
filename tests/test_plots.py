"""The trainer's figures: the axes say what they count, and degenerate data draw a note, not a warning."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from timm_ortho.modulation_rule import ModulationStats
from timm_ortho.train import plots


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plot functions save, in order."""
    saved = []
    save = plots._save

    def recording(fig, path, dpi):
        saved.append(fig)
        return save(fig, path, dpi)

    monkeypatch.setattr(plots, "_save", recording)
    return saved


def stats(q: list[float]) -> ModulationStats:
    moments = torch.tensor(q)
    return ModulationStats([f"layer{i}" for i in range(len(q))], moments, moments, torch.ones(len(q)))


def test_every_axis_that_counts_updates_says_update(tmp_path, figures):
    records = [
        {"type": "train", "step": 4, "loss": 2.0},
        {"type": "eval", "step": 4, "val_loss": 2.1, "val_top1": 20.0, "val_top5": 60.0},
    ]
    plots.plot_training_curves(records, tmp_path / "curves.png")
    plots.plot_ratio_history({"as trained": ([4, 8], [0.5, 0.25])}, tmp_path / "ratio.png")
    x_labels = [ax.get_xlabel() for fig in figures for ax in fig.axes]
    assert x_labels == ["update", "update", "update"]


@pytest.mark.parametrize("layers", [2, 3, 5, 19])
def test_layer_axes_have_integer_ticks(tmp_path, figures, layers):
    plots.plot_error_moments(stats([10.0**-i for i in range(layers)]), tmp_path / "moments.png")
    (ax,) = figures[0].axes
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_moments_that_a_log_axis_cannot_show_draw_a_note_not_a_warning(tmp_path, figures):
    """All-zero error moments (nothing left to propagate) leave a readable figure, not an empty one."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = plots.plot_error_moments(stats([0.0, 0.0, 0.0]), tmp_path / "zeros.png")
        plots.plot_ratio_history({"as trained": ([1, 2], [0.0, math.nan])}, tmp_path / "ratio.png")
    assert path.is_file()
    for fig in figures:
        (ax,) = fig.axes
        assert any("no positive value" in t.get_text() for t in ax.texts)
    # Some positive values: those are drawn, the others left out, and no note.
    figures.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.plot_error_moments(stats([1.0, 0.0, 0.5]), tmp_path / "some.png", which=("after",))
    (ax,) = figures[0].axes
    assert not ax.texts
    (line,) = ax.get_lines()
    assert [float(v) for v in line.get_ydata()][::2] == [1.0, 0.5]
