"""Reproduce the paper's mechanism figures and choose the method's defaults by measurement.

    python scripts/reproduce.py mechanism      # plain_cnn44: (a) l2, (b) ortho, (c) ortho+mod, resnet twin
    python scripts/reproduce.py trainability   # plain_cnn110: (a), (b), (c); cifar_resnet110 (a), warm-up
    python scripts/reproduce.py sweep          # modulation band/mode/reference/schedule and ortho_decay
    python scripts/reproduce.py all            # the three, about 22 minutes on a 2-core CPU
    python scripts/reproduce.py depth          # accuracy against depth, ablations (scripts/depth_suite.py)
    python scripts/reproduce.py defaults       # the runs behind the step bound, modulation, ortho_decay
    python scripts/reproduce.py deep           # 1202 layers: the step bound's size; the twin without warm-up
    python scripts/reproduce.py bounds --depths 20 44   # the step bound's size against depth (a CPU)
    python scripts/reproduce.py protocol       # print the commands of the full CIFAR-10 protocol
    python scripts/reproduce.py paper --data-dir <cifar-10-batches-py>   # run it: Fig. 5's table
    python scripts/reproduce.py models         # any timm model: defaults vs the bare optimizer (CPU, ~4 h)
    python scripts/reproduce.py regularizer    # L2 vs ortho vs none, converged (CPU, 3.3 h idle, in 4 calls)
    python scripts/reproduce.py hardness       # the pilot that chose the regularizer suite's harder set

Options shared by all suites: ``--data-dir`` (a ``cifar-10-batches-py`` folder; default: the
embedded synthetic set), ``--device`` (``auto`` picks CUDA when present), ``--steps``,
``--batch-size``, ``--img-size``, ``--seeds``, ``--lrs``, ``--out`` (figures and JSON records).
``--gpu`` switches to a longer budget (32 px, batch 128, 4000 steps, 3 seeds) for a GPU.

Fair comparison: every regime is trained at each learning rate of the same grid on the first seed;
the lr with the lowest final training loss is then run on the remaining seeds. Runs with the same
seed see the same batches in the same order.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timm_ortho.train.experiments import (
    WARMUP_DEPTH,
    RunConfig,
    TensorData,
    code_version,
    load_tensor_data,
)
from timm_ortho.train.many_runs import run_lr_grid

REGIMES = {
    "(a) MSRA + L2": ("plain", "l2"),
    "(b) ortho": ("plain", "ortho"),
    "(c) ortho + modulation": ("plain", "ortho_mod"),
    "residual twin, MSRA + L2": ("resnet", "l2"),
}
COLOURS = {"l2": "tab:red", "ortho": "tab:blue", "ortho_mod": "tab:green", "resnet": "tab:gray"}


def compare(depth: int, args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Each regime at the best lr of the grid (first seed), then the other seeds at that lr."""
    runs = len(REGIMES) * (len(args.lrs) + len(args.seeds) - 1)
    bar = tqdm(total=runs, desc=name, unit="run")
    cells = []
    for family, method in REGIMES.values():
        model = f"plain_cnn{depth}" if family == "plain" else f"cifar_resnet{depth}"
        # Residual twins from 56 layers on train as He et al. trained ResNet-110: with the warm-up.
        warmup = family == "resnet" and depth >= WARMUP_DEPTH
        # The paper's exact Conv-BN-ReLU chain (the models' default activation is depth-shaped).
        cfg = RunConfig(
            model=model,
            method=method,
            steps=args.steps,
            batch_size=args.batch_size,
            act_layer="relu",
            warmup=warmup,
        )
        cells.append((cfg, args.data_kwargs))
    outcome = run_lr_grid(
        cells, args.lrs, args.seeds, args.device, args.jobs, on_result=lambda *_: bar.update()
    )
    bar.close()
    results: dict[str, Any] = {}
    for (label, (family, method)), cell in zip(REGIMES.items(), outcome, strict=True):
        results[label] = {"grid": cell.grid, "seeds": cell.seeds, "lr": cell.lr, "key": family + method}
    return results


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for label, r in results.items():
        finals = [s["final"] for s in r["seeds"]]
        ratios = [s["history"][-1]["bottom_top_ratio"] for s in r["seeds"]]
        early = [_mean_before_drop(s, "bottom_top_ratio", log=True) for s in r["seeds"]]
        rows.append(
            {
                "regime": label,
                "lr": r["lr"],
                "train_loss": [f["train_loss"] for f in finals],
                "val_acc": [f["val_acc"] for f in finals],
                "cosine": [s["history"][-1]["cosine"] for s in r["seeds"]],
                "ratio_end": ratios,
                "ratio_before_drop": early,
                "diverged": [f["diverged"] for f in finals],
                "seconds": [s["seconds"] for s in r["seeds"]],
            }
        )
    return rows


def _mean_before_drop(record: dict[str, Any], key: str, log: bool = False) -> float:
    """Geometric (log=True) or plain mean of a recorded quantity before the first lr drop."""
    first_drop = record["config"]["lr_drops"][0] * record["config"]["steps"]
    values = [h[key] for h in record["history"] if h["step"] <= first_drop and h[key] > 0]
    if not values:
        return float("nan")
    if log:
        return 10 ** statistics.fmean(math.log10(v) for v in values)
    return statistics.fmean(values)


def fmt(values: list[float], spec: str = ".3f") -> str:
    if len(values) == 1:
        return format(values[0], spec)
    return (
        f"{format(statistics.fmean(values), spec)} ({format(min(values), spec)}..{format(max(values), spec)})"
    )


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| regime | lr | train loss | held-out acc | mean abs cos | bottom/top (before 1st drop) "
        "| bottom/top (end) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        diverged = sum(r["diverged"])
        if diverged == len(r["diverged"]):  # nothing finite to average: say so rather than print nan
            lines.append(f"| {r['regime']} | {r['lr']:g} | diverged (every seed) | - | - | - | - |")
            continue
        kept = [i for i, d in enumerate(r["diverged"]) if not d]
        pick = {
            k: [r[k][i] for i in kept]
            for k in ("train_loss", "val_acc", "cosine", "ratio_before_drop", "ratio_end")
        }
        note = f" ({diverged} of {len(r['diverged'])} seeds diverged)" if diverged else ""
        lines.append(
            f"| {r['regime']} | {r['lr']:g} | {fmt(pick['train_loss'])}{note} | {fmt(pick['val_acc'])} | "
            f"{fmt(pick['cosine'], '.4f')} | {fmt(pick['ratio_before_drop'], '.2e')} | "
            f"{fmt(pick['ratio_end'], '.2e')} |"
        )
    return "\n".join(lines)


def plot_suite(results: dict[str, Any], title: str, path: Path) -> None:
    """Training loss, filter cosine (Fig. 2), bottom/top ratio (Fig. 3), per-layer moments."""
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for label, r in results.items():
        colour = COLOURS["resnet" if r["key"].startswith("resnet") else r["key"].removeprefix("plain")]
        for i, rec in enumerate(r["seeds"]):
            steps = [h["step"] for h in rec["history"]]
            shown = f"{label} (diverged: non-finite loss)" if rec["final"]["diverged"] else label
            kw = {"color": colour, "alpha": 1.0 if i == 0 else 0.4, "label": shown if i == 0 else None}
            axes[0].plot(steps, [h["loss"] for h in rec["history"]], **kw)
            axes[1].plot(steps, [h["cosine"] for h in rec["history"]], **kw)
            axes[2].plot(steps, [h["bottom_top_ratio"] for h in rec["history"]], **kw)
            moments = rec["final"]["layer_moments"]
            axes[3].plot(range(len(moments)), [m / moments[0] for m in moments], **kw)
    axes[0].set(title="training loss", xlabel="step", yscale="log")
    axes[1].set(title="mean |cos| between filters (Fig. 2)", xlabel="step")
    axes[2].set(title="error 2nd moment, bottom / top (Fig. 3)", xlabel="step", yscale="log")
    axes[2].axhline(1.0, color="black", lw=0.5)
    axes[3].set(title="per-layer error 2nd moment / top, end", xlabel="layer (top = 0)", yscale="log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


SWEEP_RULES = (
    {"band": 2.0, "mode": "clamp", "reference": "previous"},
    {"band": 1.5, "mode": "clamp", "reference": "previous"},
    {"band": 1.1, "mode": "clamp", "reference": "previous"},
    {"band": 1.1, "mode": "match", "reference": "previous"},
    {"band": 1.25, "mode": "clamp", "reference": "top"},
    {"band": 2.0, "mode": "clamp", "reference": "top"},
    {"band": 4.0, "mode": "clamp", "reference": "top"},
    {"band": 2.0, "mode": "match", "reference": "top"},
)
SWEEP_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2)


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Modulation rule options, then its schedule, then ortho_decay, on plain_cnn44.

    Every option gets the lr grid (``--lrs``): each lr on the first seed, the other seeds at the lr
    with the lowest final training loss (``run_lr_grid``); the entries record the lr chosen.
    """
    base = dict(model="plain_cnn44", steps=args.steps, batch_size=args.batch_size, act_layer="relu")
    per_option = len(args.lrs) + len(args.seeds) - 1
    bar = tqdm(total=(len(SWEEP_RULES) + 1 + len(SWEEP_DECAYS)) * per_option, desc="sweep", unit="run")

    def grid(cfgs: list[RunConfig]) -> list[Any]:
        cells = [(cfg, args.data_kwargs) for cfg in cfgs]
        return run_lr_grid(
            cells, args.lrs, args.seeds, args.device, args.jobs, on_result=lambda *_: bar.update()
        )

    rules = grid([RunConfig(**base, method="ortho_mod", modulation=dict(rule)) for rule in SWEEP_RULES])
    out: dict[str, Any] = {"rule": [], "schedule": [], "ortho_decay": []}
    for rule, cell in zip(SWEEP_RULES, rules, strict=True):
        out["rule"].append({"options": dict(rule), "runs": cell.seeds, "lr": cell.lr})
    best = min(out["rule"], key=lambda e: _mean_loss(e["runs"]))
    warmup = {**best["options"], "schedule": args.steps // 4}
    later = grid(
        [RunConfig(**base, method="ortho_mod", modulation=warmup)]
        + [RunConfig(**base, method="ortho", ortho_decay=decay) for decay in SWEEP_DECAYS]
    )
    bar.close()
    out["schedule"] = [
        {"options": {**best["options"], "schedule": "always"}, "runs": best["runs"], "lr": best["lr"]},
        {
            "options": {**warmup, "schedule": f"first {args.steps // 4} steps"},
            "runs": later[0].seeds,
            "lr": later[0].lr,
        },
    ]
    for decay, cell in zip(SWEEP_DECAYS, later[1:], strict=True):
        out["ortho_decay"].append({"options": {"ortho_decay": decay}, "runs": cell.seeds, "lr": cell.lr})
    return out


def _mean_loss(runs: list[dict[str, Any]]) -> float:
    values = [r["final"]["train_loss"] for r in runs]
    return (
        float("inf")
        if any(r["final"]["diverged"] or not math.isfinite(v) for r, v in zip(runs, values, strict=True))
        else statistics.fmean(values)
    )


def sweep_tables(out: dict[str, Any]) -> str:
    parts = []
    for key, title in (
        ("rule", "modulation rule"),
        ("schedule", "modulation schedule"),
        ("ortho_decay", "ortho_decay (regime b)"),
    ):
        lines = [
            f"**{title}**",
            "",
            "| options | lr | train loss (per seed) | mean | held-out acc | bottom/top (end) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for entry in sorted(out[key], key=lambda e: _mean_loss(e["runs"])):
            losses = [r["final"]["train_loss"] for r in entry["runs"]]
            accs = [r["final"]["val_acc"] for r in entry["runs"]]
            ratios = [r["history"][-1]["bottom_top_ratio"] for r in entry["runs"]]
            opts = ", ".join(f"{k}={v}" for k, v in entry["options"].items())
            lines.append(
                f"| {opts} | {entry.get('lr', 0.1):g} | {' / '.join(f'{v:.3f}' for v in losses)} | "
                f"{_mean_loss(entry['runs']):.3f} | "
                f"{fmt(accs)} | {fmt(ratios, '.1e')} |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot_sweep(out: dict[str, Any], path: Path) -> None:
    """Final training loss per option: bars are the seed mean, dots the single seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    entries = out["rule"]
    labels = [
        f"A={e['options']['band']}\n{e['options']['mode']}\n{e['options']['reference']}" for e in entries
    ]
    losses = [_mean_loss(e["runs"]) for e in entries]
    axes[0].bar(
        range(len(entries)), [v if math.isfinite(v) else 0 for v in losses], color="tab:green", alpha=0.6
    )
    for i, e in enumerate(entries):
        seeds = [r["final"]["train_loss"] for r in e["runs"]]
        axes[0].plot([i] * len(seeds), seeds, "k.", ms=8)
    axes[0].set_xticks(range(len(entries)), labels, fontsize=7)
    axes[0].set(title="modulation rule: final training loss (bar: mean, dots: seeds)", ylabel="loss")
    axes[0].set_ylim(bottom=min(min(losses), 1.0) * 0.8)
    decays = out["ortho_decay"]
    xs = [e["options"]["ortho_decay"] for e in decays]
    axes[1].plot(xs, [_mean_loss(e["runs"]) for e in decays], "o-", label="mean")
    for x, e in zip(xs, decays, strict=True):
        seeds = [r["final"]["train_loss"] for r in e["runs"]]
        axes[1].plot([x] * len(seeds), seeds, "k.", ms=8)
    axes[1].set(title="ortho_decay (regime b): final training loss", xscale="log", xlabel="ortho_decay")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def protocol_commands() -> str:
    """The trainer commands of ``reproduce.py paper``, one per run, to launch by hand (e.g. on GPUs)."""
    import paper_protocol

    lines = [
        "# The paper's CIFAR-10 protocol (scripts/paper_protocol.py); `reproduce.py paper --data-dir $CIFAR`",
        "# runs the same eight trainings in one process and writes the Fig. 5 table.",
    ]
    for model in paper_protocol.NETS:
        for regime in paper_protocol.REGIMES:
            argv = paper_protocol.arguments(model, regime, Path("runs/paper"), "$CIFAR", 64000, 128, 2)
            lines.append("accelerate launch scripts/train_cifar.py " + " ".join(argv))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "suite",
        choices=[
            "mechanism",
            "trainability",
            "sweep",
            "all",
            "protocol",
            "plot",
            "depth",
            "defaults",
            "deep",
            "bounds",
            "models",
            "regularizer",
            "hardness",
            "paper",
        ],
    )
    parser.add_argument("--data-dir", default=None, help="cifar-10-batches-py folder (default: synthetic)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--gpu", action="store_true", help="longer budget for a GPU")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=None,
        help="the lr grid (default: 0.03 0.1; depth suites 0.02 0.1)",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    parser.add_argument(
        "--jobs", type=int, default=None, help="parallel single-threaded runs (CPU); default: cores"
    )
    depth = parser.add_argument_group("depth suite")
    depth.add_argument("--depths", type=int, nargs="+", default=[20, 44, 110, 1202])
    depth.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        choices=["digits", "synthetic", "hard"],
        help="depth suites: digits synthetic; models: digits; regularizer: digits hard",
    )
    depth.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="models, regularizer: only these model rows",
    )
    depth.add_argument(
        "--budgets",
        nargs="+",
        default=None,
        choices=["300 steps", "converged", "4,000 steps"],
        help="models: 300 steps, converged (1,500 steps; both by default); "
        "regularizer: converged (default), 4,000 steps",
    )
    paper = parser.add_argument_group("paper protocol")
    paper.add_argument("--synthetic", action="store_true", help="a CIFAR-shaped synthetic set (throughput)")
    paper.add_argument("--workers", type=int, default=2, help="data loader processes per run")
    depth.add_argument(
        "--ablate-depths", type=int, nargs="+", default=[44, 110], help="depths with ablations"
    )
    depth.add_argument("--deadline", type=float, default=None, help="seconds after which no run starts")
    depth.add_argument(
        "--regimes", nargs="+", default=None, metavar="LABEL", help="run only these regimes (their labels)"
    )
    depth.add_argument(
        "--plot-only", action="store_true", help="redraw depth.png and the table from depth.json"
    )
    depth.add_argument(
        "--append", action="store_true", help="keep the runs in --out's JSON and run only the missing ones"
    )
    depth.add_argument(
        "--replace",
        action="store_true",
        help="rerun the planned cells and put them, whole, in place of the same cells in --out's JSON "
        "(the other cells are kept; the rerun is logged in its budget's reruns)",
    )
    depth.add_argument(
        "--resume",
        action="store_true",
        help="models, regularizer, hardness: reuse the runs an interrupted call left in <suite>.partial.json",
    )
    return parser


def fill_budget(args: argparse.Namespace) -> None:
    """The CPU or GPU (``--gpu``) budget for every setting the command line left open."""
    gpu = args.gpu
    args.steps = args.steps or (4000 if gpu else 300)
    args.batch_size = args.batch_size or (128 if gpu else 32)
    args.img_size = args.img_size or (32 if gpu else 16)
    args.n_train = args.n_train or (50000 if gpu else 4096)
    args.seeds = args.seeds or ([0, 1, 2] if gpu else [0, 1])
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.jobs = args.jobs or (1 if args.device != "cpu" else (os.cpu_count() or 1))
    args.lrs = args.lrs or [0.03, 0.1]


def run_one(suite: str, args: argparse.Namespace, data: TensorData) -> None:
    """Run ``mechanism``, ``trainability`` or ``sweep``; write its JSON and figure to ``--out``."""
    start = time.perf_counter()
    if suite == "sweep":
        out = sweep(args)
        (args.out / "sweep.json").write_text(json.dumps({"budget": vars_of(args), "sweep": out}, indent=1))
        plot_sweep(out, args.out / "sweep.png")
        print(sweep_tables(out))
    else:
        depth = 44 if suite == "mechanism" else 110
        results = compare(depth, args, suite)
        rows = summarize(results)
        payload = {"budget": vars_of(args), "data": data.source, "rows": rows, "results": results}
        (args.out / f"{suite}.json").write_text(json.dumps(payload, indent=1))
        plot_suite(results, f"{suite}: depth {depth}, {data.source}", args.out / f"{suite}.png")
        print(table(rows))
    print(f"{suite}: {time.perf_counter() - start:.0f} s")


def main() -> None:
    args = build_parser().parse_args()
    if args.suite in ("depth", "defaults", "deep", "bounds"):
        # The bounds grid was first run on digits alone; its command without --datasets still is.
        args.datasets = args.datasets or (["digits"] if args.suite == "bounds" else ["digits", "synthetic"])
        run_depth(args)
        return
    if args.suite in ("models", "regularizer", "hardness"):
        run_convergence(args)
        return
    if args.suite == "paper":
        run_paper(args)
        return
    if args.suite == "protocol":
        print(protocol_commands())
        return
    if args.suite == "plot":  # redraw figures and tables from the JSON records in --out
        replot(args.out)
        return
    fill_budget(args)
    args.out.mkdir(parents=True, exist_ok=True)
    args.data_kwargs = {"data_dir": args.data_dir, "img_size": args.img_size, "n_train": args.n_train}
    data = load_tensor_data(**args.data_kwargs)
    print(f"data: {data.source}; {len(data.y_train)} train / {len(data.y_val)} held-out images")
    print(
        f"budget: {args.steps} steps, batch {args.batch_size}, {args.img_size}px, seeds {args.seeds}, "
        f"lr grid {args.lrs}, device {args.device}, {args.jobs} parallel runs"
    )
    suites = ["mechanism", "trainability", "sweep"] if args.suite == "all" else [args.suite]
    for suite in suites:
        run_one(suite, args, data)


def run_depth(args: argparse.Namespace) -> None:
    """``reproduce.py depth | defaults | deep | bounds``: see scripts/depth_suite.py."""
    import depth_suite

    args.out.mkdir(parents=True, exist_ok=True)
    name = args.suite
    if args.plot_only:
        record = json.loads((args.out / f"{name}.json").read_text())
        rows = depth_suite.write(record["results"], record["budget"], args.out, name, record.get("grid"))
        print(depth_suite.table(rows))
        return
    unknown = sorted(set(args.datasets) - set(depth_suite.DATASETS))
    if unknown:  # "hard" is the regularizer suite's set
        raise SystemExit(f"--datasets: {name} runs on {sorted(depth_suite.DATASETS)}, not {unknown}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    steps, batch = args.steps or 300, args.batch_size or 64
    seeds = args.seeds or ([0, 1] if name == "defaults" else [0, 1, 2])
    lrs = args.lrs or list(depth_suite.DEFAULT_LRS)
    if name == "defaults":
        cells = depth_suite.plan_defaults(steps, batch)
    elif name == "bounds":
        cells = depth_suite.plan_bounds(steps, batch, args.depths, args.datasets)
    elif name == "deep":
        cells = depth_suite.plan_deep(steps, batch, args.datasets)
    else:
        cells = depth_suite.plan(args.depths, args.datasets, steps, batch, args.ablate_depths)
    if args.regimes:
        unknown = set(args.regimes) - {label for _, label, _, _ in cells}
        if unknown:
            raise SystemExit(f"--regimes: no planned run is labelled {sorted(unknown)}")
        cells = [cell for cell in cells if cell[1] in args.regimes]
    previous: dict[str, list[dict[str, Any]]] = {"results": [], "grid": []}
    path = args.out / f"{name}.json"
    _check_replace(args, path)
    appending = args.append and path.exists()
    if appending:
        # Every saved run is kept, but a planned cell without all its seeds (a deadline cut it short)
        # is planned again whole.
        planned_keys = {(c[0], c[1], c[2]) for c in cells}
        previous, complete = _complete_cells(
            json.loads(path.read_text()), _depth_key, len(seeds), planned_keys
        )
        cells = [c for c in cells if (c[0], c[1], c[2]) not in complete]
        print(f"appending to the {len(previous['results'])} finished runs kept in {path}")
    processes = args.jobs or (4 if args.device == "cuda" else max(1, (os.cpu_count() or 1)))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    planned = len(cells) * (len(lrs) + len(seeds) - 1)
    budget = dict(
        steps=steps,
        batch_size=batch,
        seeds=seeds,
        lrs=lrs,
        depths=args.depths,
        datasets=args.datasets,
        ablate_depths=args.ablate_depths,
        device=args.device,
        processes=processes,
        schedule="cosine",
        momentum=0.9,
        warmup=f"residual twins from {WARMUP_DEPTH} layers: lr 0.01 until training error < 80 %",
        precise_bn_batches=20,
        planned_runs=planned,
        data={name: depth_suite.DATASETS[name] for name in args.datasets},
    )
    print(
        f"{name} suite: {len(cells)} cells, {planned} runs planned on {args.device} in {processes} processes"
    )
    bar = tqdm(total=planned, desc=name, unit="run")
    finished: list[dict[str, Any]] = []
    start = time.perf_counter()

    def on_result(entry: dict[str, Any]) -> None:
        entry["device"] = device_name
        if entry["depth"] == 1202:  # a 1202-layer record lists every layer: keep the JSON small
            entry["record"]["final"].pop("layer_names", None)
        finished.append(entry)
        bar.update(1)
        # Keep what finished if the suite is cut short: every run so far, in <suite>.partial.json.
        if len(finished) % 10 == 0 or planned <= 30:
            partial = {**budget, "finished_runs": len(finished)}
            depth_suite.write(finished, partial, args.out, f"{name}.partial")

    results, grid = depth_suite.run_suite(cells, lrs, seeds, args.device, processes, args.deadline, on_result)
    bar.close()
    budget.update(finished_runs=len(finished), seconds=round(time.perf_counter() - start))
    runs = {"results": previous["results"] + results, "grid": previous["grid"] + grid}
    if appending:
        budget = _appended_budget(path, budget, [(c[0], c[1], c[2]) for c in cells], budget["seconds"])
    if args.replace:
        budget, runs = _rerun_in_place(path, results, grid, _depth_key, len(seeds), budget["seconds"])
    rows = depth_suite.write(runs["results"], budget, args.out, name, runs["grid"])
    (args.out / f"{name}.partial.json").unlink(missing_ok=True)
    print(depth_suite.table(rows))
    if len(finished) < planned:
        print(f"deadline: {planned - len(finished)} of {planned} planned runs were not started")


def run_convergence(args: argparse.Namespace) -> None:
    """``reproduce.py models | regularizer | hardness``: see scripts/convergence_suites.py."""
    import convergence_suites as suites

    args.out.mkdir(parents=True, exist_ok=True)
    name = args.suite
    path = args.out / f"{name}.json"
    if args.plot_only:
        record = json.loads(path.read_text())
        rows = suites.write(record["results"], record["grid"], record["budget"], args.out, name)
        print(suites.table(rows), suites.comparisons(rows, suites.BASELINES[name]), sep="\n\n")
        return
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    seeds = args.seeds or [0, 1, 2]
    if name == "models":
        cells = suites.plan_models(args.datasets or ["digits"], args.budgets or ["300 steps", "converged"])
    elif name == "regularizer":
        cells = suites.plan_regularizer(args.datasets or ["digits", "hard"], args.budgets or ["converged"])
    else:
        cells = suites.plan_hardness()
    cells = select(cells, "model", args.models, "--models")
    cells = select(cells, "regime", args.regimes, "--regimes")
    if args.steps:  # a smoke run of the suite's plan at another budget
        cells = [dataclasses.replace(c, cfg=dataclasses.replace(c.cfg, steps=args.steps)) for c in cells]
    if args.lrs:
        cells = [dataclasses.replace(c, lrs=tuple(args.lrs)) for c in cells]
    previous: dict[str, list[dict[str, Any]]] = {"results": [], "grid": []}
    _check_replace(args, path)
    appending = args.append and path.exists()
    if appending:
        # Every saved run is kept, but a planned cell without all its seeds (a deadline cut it
        # short) is planned again (its finished runs come back from the partial file with --resume).
        planned_keys = {cell_key(vars(c)) for c in cells}
        previous, complete = _complete_cells(json.loads(path.read_text()), cell_key, len(seeds), planned_keys)
        cells = [c for c in cells if cell_key(vars(c)) not in complete]
        print(f"appending to the {len(previous['results'])} finished runs kept in {path}")
    processes = args.jobs or (4 if args.device == "cuda" else max(1, (os.cpu_count() or 1)))
    planned = sum(len(c.lrs) + len(seeds) - 1 for c in cells)
    budget = dict(
        seeds=seeds,
        device=args.device,
        device_name=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        processes=processes,
        planned_runs=planned,
        batch_size=32,
        schedule="cosine",
        steps=suites.BUDGETS,
        warmup=f"residual twins from {WARMUP_DEPTH} layers: lr 0.01 until training error < 80 %",
        data={**suites.DATASETS, "16 px for": "resnet18, resnet50, mobilenetv3_small_100, test_vit"},
    )
    saved: list[dict[str, Any]] = []
    partial_path = args.out / f"{name}.partial.json"
    if args.resume:
        if not partial_path.exists():
            raise SystemExit(f"--resume: {partial_path} does not exist (nothing was interrupted in --out)")
        saved = json.loads(partial_path.read_text())["results"]
    planned_cells = {cell_key(vars(c)) for c in cells}
    known = sum(cell_key(e) in planned_cells for e in saved)
    if args.resume:
        print(f"resuming: {known} runs of this plan are saved in {partial_path} and not run again")
    print(f"{name} suite: {len(cells)} cells, {planned} runs on {args.device} in {processes} processes")
    bar = tqdm(total=planned, desc=name, unit="run")
    bar.update(known)
    finished: list[dict[str, Any]] = list(saved)  # the partial file keeps them if cut short again
    start = time.perf_counter()

    def on_result(entry: dict[str, Any]) -> None:
        finished.append(entry)
        bar.update(1)
        if len(finished) % 5 == 0:  # what finished survives a suite cut short
            suites.write(
                finished, [], {**budget, "finished_runs": len(finished)}, args.out, f"{name}.partial"
            )

    results, grid = suites.run_cells(cells, seeds, args.device, processes, args.deadline, on_result, saved)
    bar.close()
    budget.update(finished_runs=len(finished), seconds=round(time.perf_counter() - start))
    runs = {"results": previous["results"] + results, "grid": previous["grid"] + grid}
    if appending:
        budget = _appended_budget(path, budget, [cell_key(vars(c)) for c in cells], budget["seconds"])
    if args.replace:
        budget, runs = _rerun_in_place(path, results, grid, cell_key, len(seeds), budget["seconds"])
    rows = suites.write(runs["results"], runs["grid"], budget, args.out, name)
    print(suites.table(rows), suites.comparisons(rows, suites.BASELINES[name]), sep="\n\n")
    count = collections.Counter(cell_key(e) for e in results)
    cut = [c for c in cells if count[cell_key(vars(c))] < len(seeds)]
    if cut:  # keep every finished run for the call that completes them
        suites.write(finished, [], {**budget, "finished_runs": len(finished)}, args.out, f"{name}.partial")
        print(
            f"{len(cut)} of {len(cells)} cells did not finish (--deadline): {path} holds what did; the same "
            f"command with --append --resume runs only the missing runs"
        )
    else:
        partial_path.unlink(missing_ok=True)


def _complete_cells(
    record: dict[str, Any], key: Callable[[dict[str, Any]], Any], seeds: int, planned: set[Any]
) -> tuple[dict[str, list[dict[str, Any]]], set[Any]]:
    """What ``--append`` keeps of a suite's saved ``record``, and which of the ``planned`` cells
    (identified by ``key``) are complete, with all ``seeds`` seeds: every run (``results`` and
    ``grid``) but those of a planned cell that is not complete, which is run again whole. A cell
    this call does not plan is kept whatever its number of seeds: ``--append`` never drops work it
    was not asked to redo."""
    count = collections.Counter(key(e) for e in record["results"])
    complete = {k for k in planned if count[k] >= seeds}
    redone = planned - complete
    kept = {part: [e for e in record.get(part, []) if key(e) not in redone] for part in ("results", "grid")}
    return kept, complete


def _check_replace(args: argparse.Namespace, path: Path) -> None:
    """Refuse ``--replace`` with ``--append``, or without a saved record to replace cells in."""
    if args.replace and args.append:
        raise SystemExit(
            "--replace and --append exclude each other: --append keeps complete cells, --replace reruns them"
        )
    if args.replace and not path.exists():
        raise SystemExit(f"--replace: there is no {path} to replace cells in; run the suite without it first")


def _appended_budget(path: Path, budget: dict[str, Any], cells: list[Any], seconds: int) -> dict[str, Any]:
    """What ``--append`` writes as the budget: the record saved at ``path``'s, so that its logs
    (``reruns``, earlier ``appends``, notes) survive, with this call's settings over it and this call
    (the cells it ran, its code, time and command) added to ``appends``."""
    saved = json.loads(path.read_text()).get("budget", {})
    return {**saved, **budget, "appends": [*saved.get("appends", []), _call_log(cells, seconds)]}


def _call_log(cells: Any, seconds: int) -> dict[str, Any]:
    """How a record logs a call that changed it: its cells, code, time and command."""
    return {
        "cells": sorted(cells),
        "code": code_version(),
        "seconds": seconds,
        "command": shlex.join(sys.argv[1:]),
    }


def _rerun_in_place(
    path: Path,
    results: list[dict[str, Any]],
    grid: list[dict[str, Any]],
    key: Callable[[dict[str, Any]], Any],
    seeds: int,
    seconds: int,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """What ``--replace`` writes: the record saved at ``path`` with the cells this call finished (all
    ``seeds`` seeds) in place of its own (:func:`replace_cells`), and the rerun (its cells, code,
    time and command) added to the budget's ``reruns``. Returns (budget, runs)."""
    count = collections.Counter(key(e) for e in results)
    whole = {cell for cell, n in count.items() if n >= seeds}
    for cell in sorted(set(count) - whole):  # a deadline cut it short
        print(f"--replace: {cell} did not finish all its seeds; its saved runs are kept")
    fresh = {
        part: [e for e in runs if key(e) in whole] for part, runs in (("results", results), ("grid", grid))
    }
    saved = json.loads(path.read_text())
    saved["budget"].setdefault("reruns", []).append(_call_log(whole, seconds))
    return saved["budget"], replace_cells(saved, fresh, key)


def replace_cells(
    record: dict[str, Any], fresh: dict[str, Any], key: Callable[[dict[str, Any]], Any]
) -> dict[str, list[dict[str, Any]]]:
    """``record``'s runs (``results`` and ``grid``) with every cell (identified by ``key``) that
    ``fresh`` ran replaced whole by ``fresh``'s runs of it: all its seeds and grid runs, so that no
    cell mixes runs of two code versions. A replaced cell keeps its place (tables keep their order);
    a cell ``record`` lacks goes at the end."""
    rerun = {key(e) for part in ("results", "grid") for e in fresh.get(part, [])}
    merged = {}
    for part in ("results", "grid"):
        by_cell: dict[Any, list[dict[str, Any]]] = collections.defaultdict(list)
        for entry in fresh.get(part, []):
            by_cell[key(entry)].append(entry)
        kept: list[dict[str, Any]] = []
        placed = set()
        for entry in record.get(part, []):
            cell = key(entry)
            if cell not in rerun:
                kept.append(entry)
            elif cell not in placed:
                kept += by_cell.get(cell, [])
                placed.add(cell)
        kept += [e for cell, entries in by_cell.items() if cell not in placed for e in entries]
        merged[part] = kept
    return merged


def _depth_key(entry: dict[str, Any]) -> tuple[str, str, int]:
    """A depth-suite cell's identity: (data set, regime, depth)."""
    return entry["dataset"], entry["regime"], entry["depth"]


def cell_key(entry: dict[str, Any]) -> tuple[str, str, str, str]:
    """A suite cell's identity: (data set, model row, regime, budget)."""
    return entry["dataset"], entry["model"], entry["regime"], entry["budget"]


def select(cells: list[Any], field: str, wanted: list[str] | None, flag: str) -> list[Any]:
    """The cells whose ``field`` is one of ``wanted`` (all of them for None); a label no cell has is
    refused with the labels there are."""
    if not wanted:
        return cells
    labels = list(dict.fromkeys(getattr(c, field) for c in cells))
    unknown = [w for w in wanted if w not in labels]
    if unknown:
        raise SystemExit(f"{flag}: no planned run is labelled {unknown}; the labels are {labels}")
    return [c for c in cells if getattr(c, field) in wanted]


def run_paper(args: argparse.Namespace) -> None:
    """``reproduce.py paper``: see scripts/paper_protocol.py."""
    import paper_protocol

    if args.data_dir is None and not args.synthetic:
        raise SystemExit("reproduce.py paper needs --data-dir (a cifar-10-batches-py folder) or --synthetic")
    out = args.out if args.out != Path("docs/figures") else Path("runs/paper")
    record = paper_protocol.run_protocol(
        out,
        args.data_dir,
        args.models or list(paper_protocol.NETS),
        args.regimes or list(paper_protocol.REGIMES),
        args.steps or paper_protocol.ITERATIONS,
        args.batch_size or 128,
        args.workers,
        args.append,
    )
    print(paper_protocol.table(record))
    print(f"record: {out / 'paper.json'}")


def replot(out: Path) -> None:
    if (out / "sweep.json").exists():
        record = json.loads((out / "sweep.json").read_text())
        plot_sweep(record["sweep"], out / "sweep.png")
        print(sweep_tables(record["sweep"]))
    for suite, depth in (("mechanism", 44), ("trainability", 110)):
        if (out / f"{suite}.json").exists():
            record = json.loads((out / f"{suite}.json").read_text())
            plot_suite(record["results"], f"{suite}: depth {depth}, {record['data']}", out / f"{suite}.png")
            print(table(record["rows"]))


def vars_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


if __name__ == "__main__":
    main()
