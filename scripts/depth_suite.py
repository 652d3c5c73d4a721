"""The depth suite: test accuracy against depth for plain nets under the method, their baselines and
residual twins, with an ablation of every ingredient of the default recipe.

    python scripts/reproduce.py depth                       # the whole suite (a GPU: about 10 min)
    python scripts/reproduce.py depth --depths 20 44 --datasets digits --seeds 0   # a slice
    python scripts/reproduce.py depth --plot-only --out docs/figures             # redraw from JSON

Every regime trains the same number of steps with the same batches per seed (cosine schedule, SGD
momentum 0.9) and gets the same learning-rate grid (``--lrs``, default 0.02 and 0.1): each lr on the
first seed, then the other seeds at the lr with the lowest final training loss (no held-out data is
read to choose). Residual twins of 56 layers and more also get He et al.'s warm-up (lr 0.01 until the
training error is below 80 %), as He et al. trained ResNet-110. "test acc" is measured with the BN
statistics the run ends with and, for the "precise" column, after recomputing them over 20 training
batches. Cells are ordered by priority (the headline comparison at 110 layers first) so that a
``--deadline`` cuts the least important.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from convergence_suites import mean_sd

from timm_ortho.train.experiments import WARMUP_DEPTH, RunConfig
from timm_ortho.train.many_runs import run_lr_grid

DEFAULT_LRS = (0.02, 0.1)
"""The learning-rate grid every regime gets (He et al.'s 0.1, and the fifth of it)."""

# label -> (family, RunConfig overrides). "default" is exactly the user's call on the model's defaults.
REGIMES: dict[str, tuple[str, dict[str, Any]]] = {
    "method, defaults": ("plain", dict(method="default")),
    "residual twin, MSRA + L2": ("resnet", dict(method="l2")),
    "plain, MSRA + L2 (ReLU)": ("plain", dict(method="l2", act_layer="relu")),
    "paper-exact: ReLU, ortho + modulation": ("plain", dict(method="ortho_mod", act_layer="relu")),
    # Ablations of the default recipe: one ingredient changed each.
    "defaults, ReLU activation": ("plain", dict(method="default", act_layer="relu")),
    "defaults, no orthonormality (MSRA init, no term)": (
        "plain",
        dict(method="default", init="msra", wrapper=dict(ortho_decay=0.0)),
    ),
    "defaults, modulation off": ("plain", dict(method="default", wrapper=dict(modulation=False))),
    "defaults, no step bound": ("plain", dict(method="default", wrapper=dict(max_grad_ratio=None))),
    "plain, MSRA + L2 (shaped activation)": ("plain", dict(method="l2")),
}
CORE = list(REGIMES)[:4]
ABLATIONS = list(REGIMES)[4:]
DATASETS = {
    "digits": dict(dataset="digits", img_size=8, n_train=1500),
    "synthetic": dict(dataset="synthetic", img_size=16, n_train=4096, n_val=1024),
}


Cell = tuple[str, str, int, RunConfig]
"""(dataset, regime label, depth, config): one entry of a suite, run at every lr and seed."""


def plan(
    depths: list[int], datasets: list[str], steps: int, batch_size: int, ablate: list[int]
) -> list[Cell]:
    """The cells by priority, so that a deadline cuts the least important: the core regimes at 110
    layers; 1202 layers (defaults, twin, plain baseline) on the first data set; the core regimes at
    the other depths; the ablations; the rest of 1202."""
    deepest = [d for d in depths if d >= 1000]
    others = sorted((d for d in depths if d < 1000), key=lambda d: (d != 110, -d))
    groups: list[tuple[str, int, list[str]]] = []  # (dataset, depth, regimes)
    groups += [(name, 110, CORE) for name in datasets if 110 in others]
    groups += [(datasets[0], d, CORE[:3]) for d in deepest]
    groups += [(name, d, CORE) for d in others if d != 110 for name in datasets]
    groups += [(name, d, ABLATIONS) for d in others if d in ablate for name in datasets]
    groups += [(datasets[0], d, CORE[3:]) for d in deepest]
    groups += [(name, d, CORE) for d in deepest for name in datasets[1:]]
    cells = []
    for name, depth, labels in groups:
        for label in labels:
            family, overrides = REGIMES[label]
            model = model_for(family, depth)
            cells.append((name, label, depth, suite_config(model, steps, batch_size, overrides)))
    return cells


def model_for(family: str, depth: int) -> str:
    """The timm name of a family's net at ``depth``: the plain chain or its residual twin."""
    return f"plain_cnn{depth}" if family == "plain" else f"cifar_resnet{depth}"


def suite_config(model: str, steps: int, batch_size: int, overrides: dict[str, Any]) -> RunConfig:
    """One run of the suite's budget: SGD momentum 0.9, cosine, precise BN over 20 batches; residual
    twins from :data:`WARMUP_DEPTH` layers on with He et al.'s warm-up. The lr and seed are the grid's."""
    depth = int(model.removeprefix("cifar_resnet")) if model.startswith("cifar_resnet") else 0
    overrides = {"warmup": depth >= WARMUP_DEPTH, **overrides}
    return RunConfig(
        model=model,
        steps=steps,
        batch_size=batch_size,
        schedule="cosine",
        record_every=max(1, steps // 10),
        precise_bn=20,
        **overrides,
    )


# The runs that chose the defaults (plain_cnn110 on digits, same budget as the suite): the step bound's
# form and size, the modulation with the bound on, and the term's strength on the default recipe.
# ``reproduce.py defaults`` reruns them.
DEFAULTS_GRID: dict[str, dict[str, Any]] = {
    "shaped, no bound": dict(method="ortho"),
    "shaped, bound 0.005": dict(method="ortho", max_grad_ratio=0.005),
    "shaped, bound 0.01": dict(method="ortho", max_grad_ratio=0.01),
    "shaped, bound 0.02": dict(method="ortho", max_grad_ratio=0.02),
    "shaped, bound 0.05": dict(method="ortho", max_grad_ratio=0.05),
    "shaped, bound 0.1": dict(method="ortho", max_grad_ratio=0.1),
    "shaped, user-side clip_grad_norm_ 1.0": dict(method="ortho", clip_grad=1.0),
    "shaped, bound 0.02 + modulation (top)": dict(method="ortho_mod", max_grad_ratio=0.02),
    "shaped, bound 0.02 + modulation (previous)": dict(
        method="ortho_mod", max_grad_ratio=0.02, modulation=dict(reference="previous")
    ),
    "shaped, bound 0.1 + modulation (top)": dict(method="ortho_mod", max_grad_ratio=0.1),
    "ReLU, bound 0.02": dict(method="ortho", max_grad_ratio=0.02, act_layer="relu"),
    "ReLU, bound 0.02 + modulation (top)": dict(method="ortho_mod", max_grad_ratio=0.02, act_layer="relu"),
    "ReLU, bound 0.1": dict(method="ortho", max_grad_ratio=0.1, act_layer="relu"),
    "ReLU, bound 0.1 + modulation (top)": dict(method="ortho_mod", max_grad_ratio=0.1, act_layer="relu"),
    # The term's strength on the default recipe (the paper-chain sweep chose 1e-5 on regime (b)).
    "defaults (ortho_decay 1e-5)": dict(method="default"),
    "defaults, ortho_decay 1e-4": dict(method="default", wrapper=dict(ortho_decay=1e-4)),
    # A candidate rule min(0.02, 2/L) for the step bound, on the default recipe.
    "defaults, bound 2/L = 0.018": dict(method="default", wrapper=dict(max_grad_ratio=2 / 110)),
    # The default bound on the gradients' running average (its sampling noise averaged out).
    "defaults, bound on the running average (0.9)": dict(method="default", wrapper=dict(bound_momentum=0.9)),
    # The default bound held on the step lr * g at lr 0.1 (the grid's larger lr) rather than on g.
    "defaults, bound on the step at lr 0.1": dict(method="default", wrapper=dict(bound_reference_lr=0.1)),
}


def plan_defaults(steps: int, batch_size: int) -> list[Cell]:
    """The :data:`DEFAULTS_GRID` runs (plain_cnn110, digits) with the suite's budget."""
    return [
        ("digits", label, 110, suite_config("plain_cnn110", steps, batch_size, overrides))
        for label, overrides in DEFAULTS_GRID.items()
    ]


# The 1202-layer question: does a smaller step bound let the deepest chain learn at the suite's
# budget? A bound of ``r`` per layer moves the function by about ``r * sqrt(L)`` to ``r * L`` for ``L``
# layers stepping in random to aligned directions, so the bound that worked at 110 layers (0.01) is
# 3 to 10 times too large at 1202. ``reproduce.py deep`` runs these (plain_cnn1202; 7-27 minutes a
# run on a 2-core CPU), and the residual twin without its warm-up.
DEEP_GRID: dict[str, dict[str, Any]] = {
    "defaults (bound min(0.01, 1/L) = 0.00083)": dict(method="default"),
    "defaults, bound 0.003": dict(method="default", wrapper=dict(max_grad_ratio=0.003)),
    # A candidate rule min(0.02, 2/L): twice the default at this depth.
    "defaults, bound 2/L = 0.0017": dict(method="default", wrapper=dict(max_grad_ratio=2 / 1202)),
    "defaults, bound on the running average (0.9)": dict(method="default", wrapper=dict(bound_momentum=0.9)),
    "defaults, bound on the step at lr 0.1": dict(method="default", wrapper=dict(bound_reference_lr=0.1)),
    "defaults, bound 0.001": dict(method="default", wrapper=dict(max_grad_ratio=0.001)),
    "defaults, bound 0.0003": dict(method="default", wrapper=dict(max_grad_ratio=0.0003)),
    "defaults, lr 0.02": dict(method="default", lr=0.02),
    # The twin without He et al.'s warm-up: at this budget the warm-up (lr 0.01 until the training
    # error is below 80 %) may never end, so this says whether the warm-up is what holds the twin back.
    "residual twin, MSRA + L2, no warm-up": dict(family="resnet", method="l2", warmup=False),
}
"""The 1202-layer runs, RunConfig overrides on ``plain_cnn1202``; an entry's ``family`` (a
:data:`REGIMES` family, ``"plain"`` when absent) picks the net, ``"resnet"`` the residual twin."""


# The same question at depths a CPU can run: how the step bound's size that trains well moves with
# depth (``reproduce.py bounds --depths 20 44``; the 110-layer sizes are in DEFAULTS_GRID). If the
# usable bound shrank like 1/sqrt(L) or 1/L, the 0.1 that fails at 110 layers would work at 20.
BOUND_SIZES = (0.003, 0.01, 0.03, 0.1, 0.3)
BOUNDS_GRID: dict[str, dict[str, Any]] = {
    f"defaults, bound {r}": dict(method="default", wrapper=dict(max_grad_ratio=r)) for r in BOUND_SIZES
}
BOUND_PER_DEPTH = "defaults, bound 1/L"
"""The rule ``1/L``, the default now, without the 0.01 cap that the former ``min(0.01, 1/L)`` put on
chains under 100 layers (``plain_cnnN`` has ``L = N`` target layers: 0.05 at 20 layers, 0.023 at 44)."""


def plan_bounds(steps: int, batch_size: int, depths: list[int], datasets: list[str]) -> list[Cell]:
    """The :data:`BOUNDS_GRID` sizes and :data:`BOUND_PER_DEPTH` on each data set at each of ``depths``."""
    cells = []
    for name in datasets:
        for depth in depths:
            grid = {
                **BOUNDS_GRID,
                BOUND_PER_DEPTH: dict(method="default", wrapper=dict(max_grad_ratio=1 / depth)),
            }
            for label, overrides in grid.items():
                cells.append(
                    (name, label, depth, suite_config(f"plain_cnn{depth}", steps, batch_size, overrides))
                )
    return cells


def plan_deep(steps: int, batch_size: int, datasets: list[str]) -> list[Cell]:
    """The :data:`DEEP_GRID` runs at 1202 layers."""
    cells = []
    for name in datasets:
        for label, entry in DEEP_GRID.items():
            overrides = dict(entry)
            model = model_for(overrides.pop("family", "plain"), 1202)
            cells.append((name, label, 1202, suite_config(model, steps, batch_size, overrides)))
    return cells


def run_suite(
    cells: list[Cell],
    lrs: list[float],
    seeds: list[int],
    device: str,
    processes: int,
    deadline: float | None,
    on_result: Callable[[dict[str, Any]], None],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run ``cells`` over the lr grid and ``seeds`` (:func:`~timm_ortho.train.many_runs.run_lr_grid`)
    in ``processes`` worker processes sharing one device, in priority order.

    Returns ``(results, grid)``: the entries at each cell's chosen lr, one per seed, and the first
    seed's entries at every lr. ``on_result`` gets every finished run as an entry (to keep what
    finished if the suite is cut short). No run starts once ``deadline`` seconds have passed.
    """

    def entry(index: int, record: dict[str, Any]) -> dict[str, Any]:
        name, label, depth, _ = cells[index]
        return {
            "dataset": name,
            "regime": label,
            "depth": depth,
            "lr": record["config"]["lr"],
            "record": record,
        }

    outcome = run_lr_grid(
        [(cfg, DATASETS[name]) for name, _, _, cfg in cells],
        lrs,
        seeds,
        device,
        processes,
        deadline=deadline,
        on_result=lambda i, record: on_result(entry(i, record)),
    )
    results = [entry(i, r) for i, cell in enumerate(outcome) for r in cell.seeds if r is not None]
    grid = [entry(i, r) for i, cell in enumerate(outcome) for r in cell.grid if r is not None]
    return results, grid


def _final(entry: dict[str, Any], key: str) -> float:
    value = entry["record"]["final"].get(key, float("nan"))
    return float("nan") if value is None else value


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, spread and per-seed values of test accuracy per (dataset, regime, depth)."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for e in results:
        groups.setdefault((e["dataset"], e["regime"], e["depth"]), []).append(e)
    rows = []
    for (name, label, depth), entries in groups.items():
        acc = [_final(e, "val_acc") for e in entries]
        precise = [_final(e, "val_acc_precise") for e in entries]
        flags = [bool(e["record"]["final"]["diverged"]) for e in entries]
        rows.append(
            dict(
                dataset=name,
                regime=label,
                depth=depth,
                lr=entries[0]["record"]["config"]["lr"],
                seeds=[e["record"]["config"]["seed"] for e in entries],
                acc=acc,
                acc_precise=precise,
                diverged_seeds=flags,
                diverged=sum(flags),
                train_loss=[_final(e, "train_loss") for e in entries],
                seconds=sum(e["record"]["seconds"] for e in entries),
            )
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| data | depth | regime | lr | test acc (final BN) | test acc (precise BN) | per seed (precise) "
        "| NaN |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    labels = dict.fromkeys([*REGIMES, *DEFAULTS_GRID, *DEEP_GRID, *BOUNDS_GRID, BOUND_PER_DEPTH])
    order = {label: i for i, label in enumerate(labels)}
    for r in sorted(rows, key=lambda r: (r["dataset"], r["depth"], order[r["regime"]])):
        # A diverged run is scored 0 in the means (it classifies nothing) but named in the per-seed
        # column, so that "0.000" never reads as a run that trained to chance.
        flags = r.get("diverged_seeds", [False] * len(r["acc_precise"]))
        per_seed = zip(r["acc_precise"], flags, strict=True)
        seeds = " / ".join("NaN" if bad else f"{v:.3f}" for v, bad in per_seed)
        lines.append(
            f"| {r['dataset']} | {r['depth']} | {r['regime']} | {r.get('lr', 0.1):g} | "
            f"{mean_sd(r['acc'])} | "
            f"{mean_sd(r['acc_precise'])} | {seeds} | {r['diverged']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy (precise BN) against depth, one panel per data set; dots are single seeds."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.6), squeeze=False)
    styles = {
        "method, defaults": ("tab:green", "o-"),
        "residual twin, MSRA + L2": ("tab:gray", "s--"),
        "plain, MSRA + L2 (ReLU)": ("tab:red", "v-"),
        "paper-exact: ReLU, ortho + modulation": ("tab:blue", "^-"),
    }
    for ax, name in zip(axes[0], names, strict=True):
        for label, (colour, style) in styles.items():
            mine = sorted(
                (r for r in rows if r["dataset"] == name and r["regime"] == label), key=lambda r: r["depth"]
            )
            if not mine:
                continue
            depths = [r["depth"] for r in mine]
            means = [statistics.fmean(r["acc_precise"]) for r in mine]
            nan = sum(r["diverged"] for r in mine)
            ax.plot(depths, means, style, color=colour, label=label + (f" ({nan} diverged)" if nan else ""))
            for r in mine:
                ax.plot([r["depth"]] * len(r["acc_precise"]), r["acc_precise"], ".", color=colour, alpha=0.5)
        ax.set(xscale="log", xlabel="depth (layers)", ylabel="test accuracy (precise BN)", title=name)
        ax.set_xticks(
            sorted({r["depth"] for r in rows}), [str(d) for d in sorted({r["depth"] for r in rows})]
        )
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # only the depths run
        ax.axhline(0.1, color="k", lw=0.5, ls=":")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(
    results: list[dict[str, Any]],
    budget: dict[str, Any],
    out: Path,
    name: str = "depth",
    grid: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The suite's JSON (rows, the chosen-lr results and the grid's first-seed runs) and figure."""
    rows = summarize(results)
    payload = {"budget": budget, "rows": rows, "results": results, "grid": grid or []}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    if rows and name == "depth":
        plot(rows, out / "depth.png")
    return rows
