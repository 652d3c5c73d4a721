"""The paper's CIFAR-10 protocol as one command, written up as the paper's Fig. 5 table.

    python scripts/reproduce.py paper --data-dir ~/data/cifar-10-batches-py        # 8 runs of 64k updates
    python scripts/reproduce.py paper --data-dir ... --models plain_cnn44 --steps 2000   # a slice
    python scripts/reproduce.py paper --synthetic --steps 200                      # throughput only

The recipe (He et al.'s, which the paper follows): batch 128, SGD momentum 0.9, lr 0.1 divided by 10
after 32k and 48k of 64k updates, random horizontal flip and 4-pixel padded crop, evaluated on the
10,000 test images. Two regimes per net, the paper's comparison:

- **L2**: MSRA init, weight decay 1e-4 on every conv/linear weight (the trainer's ``--baseline``);
- **ortho**: orthonormal init and the orthonormality term in place of weight decay, the paper's exact
  chain (``act_layer=relu``), no step bound, no error modulation.

on plain-44, plain-110, ResNet-44 and ResNet-110 (``plain_cnn44/110``, ``cifar_resnet44/110``).
ResNet-110 starts, as He et al.'s, at lr 0.01: timm's warm-up from 0.01 over the first 400 updates
(He et al. kept 0.01 until the training error fell below 80 %, "about 400 iterations"; timm's
schedule ramps linearly instead). Each run is the trainer (``scripts/train_cifar.py``) in this
process, with its checkpoints: an interrupted suite resumes every run where it stopped
(``--append`` keeps finished runs). ``--steps`` scales the whole schedule (the decays stay at 50 %
and 75 %); ``--synthetic`` trains on a CIFAR-shaped synthetic set, to measure throughput where no
CIFAR-10 is at hand.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

ITERATIONS = 64000
DECAYS = (0.5, 0.75)  # 32k and 48k of 64k
NETS = ("plain_cnn44", "plain_cnn110", "cifar_resnet44", "cifar_resnet110")
REGIMES: dict[str, list[str]] = {
    "L2": ["--baseline"],
    "ortho": ["--max-grad-ratio", "0", "--no-modulation"],
}
PAPER_CHAIN = ["--model-kwargs", "act_layer=relu"]  # both regimes: the paper's Conv-BN-ReLU layers
WARMUP_STEPS = {"cifar_resnet110": 400}

# The paper's CIFAR-10 test errors (%), read off its figures (about +-0.3 points; docs METHOD.md sec. 6).
PAPER_ERROR: dict[tuple[str, str], float] = {
    ("plain_cnn44", "L2"): 16.3,
    ("plain_cnn44", "ortho"): 12.8,
    ("cifar_resnet44", "L2"): 12.1,
    ("cifar_resnet110", "L2"): 13.4,
    ("cifar_resnet110", "ortho"): 10.0,
}


def arguments(
    model: str, regime: str, out: Path, data_dir: str | None, steps: int, batch_size: int, workers: int
) -> list[str]:
    """The trainer's flags for one run of the protocol."""
    decays = [str(round(f * steps)) for f in DECAYS]
    data = (
        ["--data-dir", data_dir]
        if data_dir
        else ["--synthetic-size", "50000", "--synthetic-val-size", "10000"]
    )
    warmup = []
    if model in WARMUP_STEPS:  # scaled with the schedule
        warmup = [
            "--warmup-steps",
            str(max(1, round(WARMUP_STEPS[model] * steps / ITERATIONS))),
            "--warmup-lr",
            "0.01",
        ]
    return [
        *data,
        *("--model", model, "--augment", "cifar", "--batch-size", str(batch_size)),
        *("--iterations", str(steps), "--decay-steps", *decays, "--workers", str(workers)),
        *("--output", str(out), "--experiment", f"{model}-{regime}"),
        *PAPER_CHAIN,
        *REGIMES[regime],
        *warmup,
    ]


def run_protocol(
    out: Path,
    data_dir: str | None,
    models: list[str],
    regimes: list[str],
    steps: int,
    batch_size: int,
    workers: int,
    append: bool,
) -> dict[str, Any]:
    """Train every (net, regime), resuming runs that have checkpoints; returns the JSON record."""
    from timm_ortho.train.config import build_parser, config_from_args
    from timm_ortho.train.loop import train

    out.mkdir(parents=True, exist_ok=True)
    path = out / "paper.json"
    record: dict[str, Any] = json.loads(path.read_text()) if append and path.exists() else {"runs": {}}
    record.update(
        recipe=dict(
            steps=steps, batch_size=batch_size, decays=[round(f * steps) for f in DECAYS], data=data_dir
        )
    )
    for model in models:
        for regime in regimes:
            key = f"{model}-{regime}"
            if key in record["runs"] and record["runs"][key].get("complete"):
                continue
            argv = arguments(model, regime, out, data_dir, steps, batch_size, workers)
            if (out / key).is_dir():  # a run cut short: its checkpoints carry it on
                argv += ["--resume", str(out / key)]
            start = time.perf_counter()
            result = train(config_from_args(build_parser("cifar").parse_args(argv)))
            summary = result.summary
            top1 = (summary.get("final_eval") or {}).get("top1")
            record["runs"][key] = dict(
                model=model,
                regime=regime,
                argv=argv,
                complete=result.stopped_by is None,
                updates=summary.get("updates"),
                top1=top1,
                error=None if top1 is None else 100.0 - top1,
                train_samples_per_s=summary.get("train_samples_per_s"),
                seconds=time.perf_counter() - start,
            )
            path.write_text(json.dumps(record, indent=1))
            if result.stopped_by is not None:
                return record
    return record


def table(record: dict[str, Any]) -> str:
    """The Fig. 5 table: test error per net and regime, beside the paper's."""
    lines = [
        "| net | L2: error here | L2: paper | ortho: error here | ortho: paper | updates | images/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    runs = record["runs"]
    for model in NETS:
        mine = {r: runs.get(f"{model}-{r}") for r in REGIMES}
        if not any(mine.values()):
            continue
        cells = []
        for regime, run in mine.items():
            here = "not run" if run is None or run["error"] is None else f"{run['error']:.2f} %"
            paper = PAPER_ERROR.get((model, regime))
            cells += [here, "n/a" if paper is None else f"{paper:.1f} %"]
        done = [r for r in mine.values() if r is not None]
        updates = "/".join(str(r["updates"]) for r in done)
        speed = "/".join(f"{r['train_samples_per_s']:.0f}" for r in done if r["train_samples_per_s"])
        lines.append(f"| {model} | {' | '.join(cells)} | {updates} | {speed} |")
    return "\n".join(lines)
