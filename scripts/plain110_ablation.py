"""The models suite's plain-110 row, one ingredient of the defaults at a time: ``plain_cnn110`` with
``OrthoModulated(SGD)`` as a user writes it, and the same wrapper without the step bound
(``max_grad_ratio=None``) or without the modulation (``modulation=False``), and with larger step
bounds than the default (chosen at batch 64; this row's batch is 32), against the fair twin already
in ``<out>/models.json`` (``reproduce.py models --models "plain-110 row" --seeds 0 ... 9``).

    python scripts/plain110_ablation.py --jobs 2                       # 300 steps, 10 seeds: ~10 min (CPU)
    python scripts/plain110_ablation.py --jobs 2 --budgets converged   # 1,500 steps: ~30 min
    python scripts/plain110_ablation.py --jobs 2 --variants "plain_cnn110, defaults, step bound 0.02" \
        "plain_cnn110, defaults, step bound 0.05"                       # the bound's size at batch 32

The protocol is the suite's (digits, batch 32, cosine schedule, precise BN, the lr grid 0.02 / 0.1 on
the first seed, the other seeds at the lr with the lower final training loss). The rows are added to
``<out>/models.json`` (a variant's earlier rows are replaced), and the table and the comparisons with
the twin are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convergence_suites as suites
from reproduce import cell_key, replace_cells

VARIANTS: dict[str, dict[str, Any]] = {
    "plain_cnn110, defaults, no step bound": dict(max_grad_ratio=None),
    "plain_cnn110, defaults, no modulation": dict(modulation=False),
    # The default bound 1/L = 0.0091 was chosen at batch 64; larger ones at this batch 32.
    "plain_cnn110, defaults, step bound 0.02": dict(max_grad_ratio=0.02),
    "plain_cnn110, defaults, step bound 0.05": dict(max_grad_ratio=0.05),
    # A candidate rule min(0.02, 2/L) for L = 110 target layers.
    "plain_cnn110, defaults, step bound 2/L = 0.018": dict(max_grad_ratio=2 / 110),
    # The default bound held to the norm of the gradients' running average, not of one batch's.
    "plain_cnn110, defaults, bound on the running average (0.9)": dict(bound_momentum=0.9),
    # The default bound held on the step lr * g at lr 0.1 (the grid's larger lr) rather than on g.
    "plain_cnn110, defaults, bound on the step at lr 0.1": dict(bound_reference_lr=0.1),
}
ABLATIONS = ["plain_cnn110, defaults, no step bound", "plain_cnn110, defaults, no modulation"]
ROW = "plain-110 row"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("docs/figures/plain110_seeds"))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--budgets", nargs="+", choices=list(suites.BUDGETS), default=["300 steps"])
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=ABLATIONS, help="default: the two ablations"
    )
    parser.add_argument("--jobs", type=int, default=2, help="parallel single-threaded runs")
    args = parser.parse_args()
    path = args.out / "models.json"
    if not path.exists():
        raise SystemExit(
            f'{path} does not exist: run `python scripts/reproduce.py models --models "{ROW}" '
            f"--seeds {' '.join(map(str, args.seeds))} --out {args.out}` first (the twin and the defaults)"
        )
    saved = json.loads(path.read_text())
    cells = [
        suites.Cell(
            "digits",
            ROW,
            label,
            budget,
            suites.suite_config("plain_cnn110", suites.BUDGETS[budget], method="default", wrapper=wrapper),
            suites.DATASETS["digits"],
            suites.SGD_LRS,
        )
        for budget in args.budgets
        for label, wrapper in VARIANTS.items()
        if label in args.variants
    ]
    n_runs = sum(len(c.lrs) + len(args.seeds) - 1 for c in cells)
    bar = tqdm(total=n_runs, desc="plain-110 ablation", unit="run")
    start = time.perf_counter()
    results, grid = suites.run_cells(cells, args.seeds, "cpu", args.jobs, None, lambda _: bar.update())
    bar.close()
    seconds = round(time.perf_counter() - start)
    ablation = {**saved["budget"].get("ablation", {}), "variants": VARIANTS}
    ablation.setdefault("calls", []).append(
        {"variants": args.variants, "budgets": args.budgets, "seconds": seconds}
    )
    budget = {**saved["budget"], "ablation": ablation}
    # A variant run again replaces its earlier runs whole; the twin's and the defaults' runs stay.
    runs = replace_cells(saved, {"results": results, "grid": grid}, cell_key)
    rows = suites.write(runs["results"], runs["grid"], budget, args.out, "models")
    print(suites.table(rows), suites.comparisons(rows, suites.BASELINES["models"]), sep="\n\n")


if __name__ == "__main__":
    main()
