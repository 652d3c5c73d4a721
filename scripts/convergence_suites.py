"""The suites that train to a converged budget: any timm model under the defaults, and the paper's claim.

    python scripts/reproduce.py models        # any timm model: the defaults vs the bare optimizer
    python scripts/reproduce.py regularizer   # weight decay vs orthonormality vs neither, converged
    python scripts/reproduce.py hardness      # the pilot that chose the harder synthetic set

**models** (the promise "any timm model"): timm ``resnet18``, ``resnet50``, ``mobilenetv3_small_100``
and ``test_vit`` (a small ViT; AdamW, its usual optimizer), this package's ``cifar_resnet20/56``, and
the plain-110 row (``plain_cnn110`` under the defaults against its residual twin under the usual
recipe). Two regimes: *bare*, the optimizer with its usual weight decay (SGD 1e-4 on every
parameter, He et al.; AdamW 0.05 through timm's groups), and *defaults*,
``OrthoModulated(opt(model.parameters(), lr), model)`` with nothing else. Two budgets: 300 steps and
a converged one (:data:`CONVERGED_STEPS`).

**regularizer** (the paper's claim: orthonormality in place of L2 lowers test error): on the plain
nets with ReLU (the paper's chain) and with the shaped activation, on their residual twins at 20, 44
and 110 layers and on timm ``resnet18``, trained to the converged budget with

- *L2*: MSRA init, SGD with weight decay 1e-4 (He et al.);
- *ortho*: orthonormal init, the orthonormality term in place of weight decay (``ortho_decay``
  default), no modulation;
- *none*: MSRA init, no regularizer at all;
- *ortho + mod*: *ortho* with the error modulation (plain chains only: elsewhere it is off anyway);

every regime with the same step bound (:func:`recorded_bound`: ``min(0.01, 1/L)`` on plain chains,
none on the others), so that the regimes differ in the regularizer alone; on digits and on
the harder synthetic set (:data:`DATASETS`, chosen by ``hardness``). ``--budgets "4,000 steps"`` runs
the same plan at :data:`LONG_STEPS`, for the rows the hard set leaves still fitting at 1,500.

Every regime of both suites gets the same lr grid (SGD 0.02 and 0.1; AdamW 3e-4 and 1e-3): each lr
on the first seed, the other seeds at the lr with the lowest final training loss. Residual twins of
56 layers and more train with He et al.'s warm-up. Batch 32, cosine decay to 0, momentum 0.9, three
seeds; precise BN before the test evaluation for the plain chains. Measured per run: test accuracy,
the generalization gap (training minus test accuracy, both in eval mode), the filters' mean |cos|
(the paper's Fig. 2) and how flat the training loss is at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timm_ortho.train.experiments import WARMUP_DEPTH, RunConfig
from timm_ortho.train.many_runs import run_lr_grid

CONVERGED_STEPS = 1500
"""Batch 32 on 1,500 digits: 32 epochs, cosine to 0; the training loss is flat by the end (the tables'
"flat" column: its change over the last fifth of the run)."""
SHORT_STEPS = 300
LONG_STEPS = 4000
"""The regularizer suite's longer budget, for the plain chains that the hard set leaves still fitting at
:data:`CONVERGED_STEPS` (64 epochs of its 2,000 images)."""
BUDGETS: dict[str, int] = {"300 steps": SHORT_STEPS, "converged": CONVERGED_STEPS, "4,000 steps": LONG_STEPS}
"""A budget's label (the tables' ``budget`` column) and its number of steps."""
SGD_LRS = (0.02, 0.1)
ADAMW_LRS = (3e-4, 1e-3)

DATASETS: dict[str, dict[str, Any]] = {
    "digits": dict(dataset="digits", img_size=8, n_train=1500),
    # Chosen by `reproduce.py hardness` (docs/results.md, "The harder synthetic set"): of the four
    # candidates, the only one on which L2 vs no L2 differed by more than the seed spread, and that
    # only just (cifar_resnet20: 0.740 +- 0.003 vs 0.731 +- 0.008; plain_cnn20 within the spread).
    "hard": dict(dataset="synthetic", img_size=8, n_train=2000, n_val=1000, num_classes=100),
}
# The ImageNet-style timm models see the images at 16 px: at 8 px their stride-32 stems leave no map.
UPSAMPLED = {name: {**kwargs, "img_size": 16} for name, kwargs in DATASETS.items()}


@dataclass(frozen=True)
class Cell:
    """One (data set, model, regime, budget) of a suite, run over its lr grid and the seeds."""

    dataset: str
    model: str
    """The row label (a model name, or e.g. ``plain_cnn44 (ReLU)``)."""
    regime: str
    budget: str
    cfg: RunConfig
    data: dict[str, Any]
    lrs: tuple[float, ...]


def suite_config(model: str, steps: int, **overrides: Any) -> RunConfig:
    """A run of these suites: batch 32, cosine schedule, 20 records, precise BN for the plain chains,
    He et al.'s warm-up for residual twins from ``WARMUP_DEPTH`` layers; ``overrides`` for the rest."""
    depth = int(model.removeprefix("cifar_resnet")) if model.startswith("cifar_resnet") else 0
    plain = model.startswith("plain_cnn")
    return RunConfig(
        model=model,
        steps=steps,
        batch_size=32,
        schedule="cosine",
        record_every=max(1, steps // 20),
        precise_bn=20 if plain else 0,
        warmup=depth >= WARMUP_DEPTH,
        **overrides,
    )


# -- any timm model ----------------------------------------------------------------------------------

# model -> (RunConfig overrides, lr grid, whether it sees the 16 px images)
MODELS: dict[str, tuple[dict[str, Any], tuple[float, ...], bool]] = {
    "cifar_resnet20": ({}, SGD_LRS, False),
    "cifar_resnet56": ({}, SGD_LRS, False),
    "resnet18": ({}, SGD_LRS, True),
    "resnet50": ({}, SGD_LRS, True),
    "mobilenetv3_small_100": ({}, SGD_LRS, True),
    "test_vit": (
        dict(opt="adamw", weight_decay=0.05, model_kwargs=dict(img_size=16, patch_size=4)),
        ADAMW_LRS,
        True,
    ),
}
MODEL_REGIMES = {
    "bare, usual weight decay": dict(method="l2"),
    "defaults": dict(method="default"),
}
PLAIN_ROW = {
    "plain_cnn110, defaults": ("plain_cnn110", dict(method="default")),
    "cifar_resnet110 (fair twin), MSRA + L2": ("cifar_resnet110", dict(method="l2")),
}


def plan_models(datasets: list[str], budgets: list[str]) -> list[Cell]:
    """The defaults against the bare optimizer on each model, at each budget; the plain-110 row last."""
    cells = []
    for budget in budgets:
        for name in datasets:
            for model, (overrides, lrs, upsampled) in MODELS.items():
                data = (UPSAMPLED if upsampled else DATASETS)[name]
                for regime, regime_overrides in MODEL_REGIMES.items():
                    cfg = suite_config(model, BUDGETS[budget], **overrides, **regime_overrides)
                    cells.append(Cell(name, model, regime, budget, cfg, data, lrs))
            for label, (model, overrides) in PLAIN_ROW.items():
                cfg = suite_config(model, BUDGETS[budget], **overrides)
                cells.append(Cell(name, "plain-110 row", label, budget, cfg, DATASETS[name], SGD_LRS))
    return cells


# -- the regularizer at convergence ----------------------------------------------------------------


def recorded_bound(model: str) -> float | None:
    """The step bound every regime of the regularizer and hardness suites gets: ``min(0.01, 1/L)`` on
    ``plain_cnnL`` (``L`` target layers), none on other models.

    It is what the wrapper's ``"auto"`` gave when these suites were recorded; ``"auto"`` is now ``1/L``
    at every depth (:func:`timm_ortho.defaults.max_grad_ratio_for`), looser under 100 layers. The
    suites keep the bound they were run with, so that their records stay reproducible bit for bit:
    it is a setting the regimes share, not the quantity they compare. ``scripts/first_steps.py``
    compares the default with it.
    """
    if not model.startswith("plain_cnn"):
        return None
    return min(0.01, 1.0 / int(model.removeprefix("plain_cnn")))


REGULARIZER_REGIMES: dict[str, dict[str, Any]] = {
    "L2 (MSRA init)": dict(method="l2"),
    "ortho (orthonormal init)": dict(method="ortho"),
    "none (MSRA init)": dict(method="none"),
    "ortho + modulation": dict(method="ortho_mod"),
}
REGULARIZER_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    **{f"plain_cnn{d} (ReLU)": (f"plain_cnn{d}", dict(act_layer="relu")) for d in (20, 44, 110)},
    **{f"plain_cnn{d} (shaped)": (f"plain_cnn{d}", {}) for d in (20, 44, 110)},
    **{f"cifar_resnet{d}": (f"cifar_resnet{d}", {}) for d in (20, 44, 110)},
    "resnet18": ("resnet18", {}),
}


def plan_regularizer(
    datasets: list[str], budgets: tuple[str, ...] | list[str] = ("converged",)
) -> list[Cell]:
    """Every regime on every model and data set at each budget (by default the converged one;
    the modulation on plain chains only)."""
    cells = []
    for budget in budgets:
        for name in datasets:
            for label, (model, overrides) in REGULARIZER_MODELS.items():
                data = (UPSAMPLED if model == "resnet18" else DATASETS)[name]
                for regime, regime_overrides in REGULARIZER_REGIMES.items():
                    if regime_overrides["method"] == "ortho_mod" and not model.startswith("plain_cnn"):
                        continue
                    cfg = suite_config(
                        model,
                        BUDGETS[budget],
                        max_grad_ratio=recorded_bound(model),
                        **overrides,
                        **regime_overrides,
                    )
                    cells.append(Cell(name, label, regime, budget, cfg, data, SGD_LRS))
    return cells


# -- the pilot that chose the harder synthetic set -------------------------------------------------

HARDNESS_CANDIDATES: dict[str, dict[str, Any]] = {
    "digits": DATASETS["digits"],
    "synthetic, 10 classes, 50 per class, 20 % label noise": dict(
        dataset="synthetic", img_size=8, n_train=500, n_val=1000, num_classes=10, label_noise=0.2
    ),
    "synthetic, 50 classes, 20 per class": dict(
        dataset="synthetic", img_size=8, n_train=1000, n_val=1000, num_classes=50
    ),
    "synthetic, 100 classes, 20 per class": dict(
        dataset="synthetic", img_size=8, n_train=2000, n_val=1000, num_classes=100
    ),
}


def plan_hardness() -> list[Cell]:
    """L2 against no regularizer on cifar_resnet20 and plain_cnn20 for each candidate set, lr 0.1."""
    cells = []
    for name, data in HARDNESS_CANDIDATES.items():
        for model in ("cifar_resnet20", "plain_cnn20"):
            for regime in ("l2", "none"):
                cfg = suite_config(
                    model, CONVERGED_STEPS, method=regime, max_grad_ratio=recorded_bound(model)
                )
                cells.append(Cell(name, model, regime, "converged", cfg, data, (0.1,)))
    return cells


# -- running and summarizing -----------------------------------------------------------------------


def run_cells(
    cells: list[Cell],
    seeds: list[int],
    device: str,
    processes: int,
    deadline: float | None,
    on_result: Callable[[dict[str, Any]], None],
    saved: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(results, grid)`` entries: each cell's seeds at its chosen lr, and the first seed at every lr.

    ``saved``: entries of an interrupted run of the same plan (``<suite>.partial.json``); a run found
    there (same cell, lr and seed) is taken from it instead of run again.
    """
    by_run = {
        run_key(e["dataset"], e["model"], e["regime"], e["budget"], e["record"]["config"]): e
        for e in saved or []
    }

    def known(index: int, cfg: RunConfig) -> dict[str, Any] | None:
        c = cells[index]
        found = by_run.get(run_key(c.dataset, c.model, c.regime, c.budget, dataclasses.asdict(cfg)))
        return None if found is None else found["record"]

    def entry(index: int, record: dict[str, Any]) -> dict[str, Any]:
        c = cells[index]
        return dict(dataset=c.dataset, model=c.model, regime=c.regime, budget=c.budget, record=record)

    results: list[dict[str, Any]] = []
    grid: list[dict[str, Any]] = []
    by_grid: dict[tuple[float, ...], list[int]] = {}
    for i, c in enumerate(cells):
        by_grid.setdefault(c.lrs, []).append(i)
    for lrs, indices in by_grid.items():  # one call per lr grid: its runs share the processes
        outcome = run_lr_grid(
            [(cells[i].cfg, cells[i].data) for i in indices],
            lrs,
            seeds,
            device,
            processes,
            deadline=deadline,
            on_result=lambda j, record, indices=indices: on_result(entry(indices[j], record)),
            known=lambda j, cfg, indices=indices: known(indices[j], cfg),
        )
        for i, cell in zip(indices, outcome, strict=True):
            results += [entry(i, r) for r in cell.seeds if r is not None]
            grid += [entry(i, r) for r in cell.grid if r is not None]
    return results, grid


def run_key(dataset: str, model: str, regime: str, budget: str, config: dict[str, Any]) -> str:
    """One run's identity: its cell and its whole configuration (lr and seed included)."""
    return json.dumps([dataset, model, regime, budget, config], sort_keys=True, default=str)


def _flatness(record: dict[str, Any]) -> float:
    """Relative change of the recorded training loss over the last fifth of the run (0: flat)."""
    history = record["history"]
    if len(history) < 5:
        return float("nan")
    tail = history[-max(2, len(history) // 5) :]
    first, last = tail[0]["loss"], tail[-1]["loss"]
    return (last - first) / max(abs(first), 1e-12)


def _final(record: dict[str, Any], key: str) -> float:
    """A final value, the precise-BN one where the run recomputed the BN statistics."""
    final = record["final"]
    value = final.get(f"{key}_precise", final.get(key))
    return float("nan") if value is None else float(value)


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for e in results:
        groups.setdefault((e["dataset"], e["model"], e["regime"], e["budget"]), []).append(e)
    rows = []
    for (name, model, regime, budget), entries in groups.items():
        records = [e["record"] for e in entries]
        test = [_final(r, "val_acc") for r in records]
        train = [_final(r, "train_acc") for r in records]
        rows.append(
            dict(
                dataset=name,
                model=model,
                regime=regime,
                budget=budget,
                lr=records[0]["config"]["lr"],
                seeds=[r["config"]["seed"] for r in records],
                test_acc=test,
                train_acc=train,
                gap=[a - b for a, b in zip(train, test, strict=True)],
                cosine=[r["history"][-1]["cosine"] if r["history"] else float("nan") for r in records],
                train_loss=[r["final"]["train_loss"] for r in records],
                flat=[_flatness(r) for r in records],
                warmup_steps=[r["final"].get("warmup_steps") for r in records],
                diverged=sum(bool(r["final"]["diverged"]) for r in records),
                seconds=sum(r["seconds"] for r in records),
            )
        )
    return rows


def mean_sd(values: list[float], spec: str = ".3f") -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.fmean(values), spec)} ± {format(sd, spec)}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| data | budget | model | regime | lr | test acc | per seed | train − test | mean abs cos "
        "| train loss | flat | NaN |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['budget']} | {r['model']} | {r['regime']} | {r['lr']:g} | "
            f"{mean_sd(r['test_acc'])} | {' / '.join(f'{v:.3f}' for v in r['test_acc'])} | "
            f"{mean_sd(r['gap'])} | {mean_sd(r['cosine'], '.4f')} | {mean_sd(r['train_loss'], '.4f')} | "
            f"{mean_sd(r['flat'], '.2f')} | {r['diverged']} |"
        )
    return "\n".join(lines)


BASELINES = {
    "models": ("bare, usual weight decay", "cifar_resnet110 (fair twin), MSRA + L2"),
    "regularizer": ("L2 (MSRA init)",),
    "hardness": ("l2",),
}
"""Each suite's reference regimes: every other regime of a row is compared with the row's reference."""


def comparisons(rows: list[dict[str, Any]], baselines: tuple[str, ...]) -> str:
    """Each regime's test accuracy minus its row's baseline regime's (one of ``baselines``), per data set,
    budget and model: the mean difference, the difference in the generalization gap and the filters'
    mean |cos|, and whether the accuracy difference exceeds the seed spread (the larger of the two
    standard deviations; with one seed there is no spread to exceed)."""
    base = {(r["dataset"], r["budget"], r["model"]): r for r in rows if r["regime"] in baselines}
    lines = [
        "| data | budget | model | regime | vs | test acc diff | beyond the spread | gap diff "
        "| mean abs cos |",
        "| --- " * 9 + "|",
    ]
    for r in rows:
        b = base.get((r["dataset"], r["budget"], r["model"]))
        if b is None or r is b:
            continue
        diff = statistics.fmean(r["test_acc"]) - statistics.fmean(b["test_acc"])
        spreads = [statistics.stdev(x) for x in (r["test_acc"], b["test_acc"]) if len(x) > 1]
        verdict = (
            f"{'yes' if abs(diff) > max(spreads) else 'no'} (sd {max(spreads):.3f})" if spreads else "n/a"
        )
        gap = statistics.fmean(r["gap"]) - statistics.fmean(b["gap"])
        cos = f"{statistics.fmean(r['cosine']):.4f} vs {statistics.fmean(b['cosine']):.4f}"
        lines.append(
            f"| {r['dataset']} | {r['budget']} | {r['model']} | {r['regime']} | {b['regime']} | "
            f"{diff:+.3f} | {verdict} | {gap:+.3f} | {cos} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Test accuracy per model and regime (bars: seed means, dots: seeds), one panel per data set and
    budget; with the filters' mean |cos| beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    # Data set by data set, each at its budgets from the shortest; a panel shows only its own models.
    panels = sorted(
        {(r["dataset"], r["budget"]) for r in rows},
        key=lambda p: (datasets.index(p[0]), BUDGETS.get(p[1], 0)),
    )
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    widest = max(len({r["model"] for r in rows if (r["dataset"], r["budget"]) == p}) for p in panels)
    fig, axes = plt.subplots(
        2, len(panels), figsize=(max(7.0, 0.9 * widest) * len(panels), 8.5), squeeze=False
    )
    width = 0.8 / len(regimes)
    for col, (name, budget) in enumerate(panels):
        models = list(
            dict.fromkeys(r["model"] for r in rows if (r["dataset"], r["budget"]) == (name, budget))
        )
        for k, regime in enumerate(regimes):
            for row_i, key in enumerate(("test_acc", "cosine")):
                ax = axes[row_i][col]
                for j, model in enumerate(models):
                    here = (name, budget, model, regime)
                    mine = [r for r in rows if (r["dataset"], r["budget"], r["model"], r["regime"]) == here]
                    if not mine:
                        continue
                    values = mine[0][key]
                    x = j + (k - (len(regimes) - 1) / 2) * width
                    label = regime if j == 0 else None
                    ax.bar(x, statistics.fmean(values), width, color=f"C{k}", alpha=0.7, label=label)
                    ax.plot([x] * len(values), values, "k.", ms=4)
        for row_i, label in enumerate(("test accuracy", "mean |cos| between filters (Fig. 2)")):
            ax = axes[row_i][col]
            ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
            ax.set(ylabel=label, title=f"{name}, {budget}")
            ax.grid(axis="y", alpha=0.3)
        axes[0][col].set_ylim(0, 1.15)  # headroom for the legend above the bars
        axes[0][col].legend(fontsize=7, loc="upper center", ncol=len(regimes))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(
    results: list[dict[str, Any]],
    grid: list[dict[str, Any]],
    budget: dict[str, Any],
    out: Path,
    name: str,
) -> list[dict[str, Any]]:
    """Save the suite's runs as ``<name>.json`` (and its figure), returning the table's rows.

    A run's per-layer error record (:data:`PER_LAYER`: a name, a moment and a scale per target) is
    left out: no table of these suites reads it, and at 110 layers it is five sixths of a run's
    record. The depth suites keep it. Numbers are written to 6 significant digits (the tables show
    at most 4), which keeps the JSON of a few hundred runs under 2 MB.
    """
    results, grid = _without_layers(results), _without_layers(grid)
    rows = summarize(results)
    payload = {"budget": budget, "rows": rows, "results": results, "grid": grid}
    (out / f"{name}.json").write_text(json.dumps(_significant(payload), indent=1))
    if rows and not name.endswith(".partial"):
        plot(rows, out / f"{name}.png", f"reproduce.py {name}")
    return rows


PER_LAYER = ("layer_names", "layer_moments", "layer_scales")


def _without_layers(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries with their records' per-layer lists dropped (the entries themselves untouched)."""
    out = []
    for e in entries:
        final = {k: v for k, v in e["record"]["final"].items() if k not in PER_LAYER}
        out.append({**e, "record": {**e["record"], "final": final}})
    return out


def _significant(value: Any, digits: int = 6) -> Any:
    """``value`` with every float rounded to ``digits`` significant digits (nan and inf kept)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, list):
        return [_significant(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: _significant(v, digits) for k, v in value.items()}
    return value
