"""Fault injection: kill, signal and corrupt a training run at random points, resume, and check that
nothing was lost.

    python scripts/faults.py                  # 8 seeded trials, about 4 minutes on a 2-core CPU
    python scripts/faults.py --trials 20 --seed 1
    python scripts/faults.py --trials 1 --fault "resume with a longer schedule"   # one kind only

Every trial trains the same tiny run (plain_cnn20 on the synthetic set, 8x8 images, 2 epochs, a
checkpoint every 2 updates) with ``scripts/train_imagenet.py`` in a subprocess, injects one fault at
an update drawn from the trial's seed, resumes with ``--resume auto`` until the run completes, and
compares the final weights with those of an uninterrupted run, bit for bit. The faults:

- ``kill -9``: the process dies at once; the updates since the newest checkpoint are redone.
- ``SIGTERM`` and ``SIGINT``: the run finishes the update, writes a checkpoint and exits (143, 130);
  nothing is redone.
- ``kill -9, then a corrupt checkpoint``: after the kill, the newest checkpoint's weights file is
  truncated; the resume must report it and fall back to the one before, or, when it was the only
  one, refuse with a message that says nothing intact is left.
- ``unwritable checkpoint folder``: a file takes the checkpoint folder's place (a root user writes
  through permissions, not into a file); the next save fails twice, the state goes to the rescue
  folder and the run stops with the command that continues; once the folder is back, the run
  resumes from the rescued state.
- ``resume with a longer schedule``: the run is first launched shorter (``--iterations N``, a cosine
  over N updates, which ends at lr 0) and runs to its end; it is then resumed with the full length.
  The weights cannot equal the reference's (the first N updates ran on another schedule); instead
  every update after the resume must run at the lr the reference ran at that update, bit for bit,
  and move the weights (the trainer rebuilds the schedule from the resuming run's flags, as timm's
  ``train.py`` does).

"Lost updates" counts the updates a resume had to redo beyond what the fault allows: for a signal, any
update after the stop; for a kill, any update before the newest complete checkpoint at the time of
the kill (from the checkpoint it resumed from). The report's last line is the summary that
docs/reliability.md quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_imagenet.py"
RUN_ARGS = [
    *("--model", "plain_cnn20", "--img-size", "8", "--batch-size", "8", "--lr", "0.05"),
    *("--synthetic-size", "96", "--synthetic-val-size", "16", "--epochs", "2", "--workers", "0"),
    *("--log-interval", "1", "--checkpoint-interval", "2", "--checkpoint-hist", "3"),
    *("--sched", "cosine", "--modulation", "--seed", "0"),
]
UPDATES = 24  # 96 images / batch 8 = 12 updates per epoch, 2 epochs
FAULTS = (
    "kill -9",
    "SIGTERM",
    "SIGINT",
    "kill -9, then a corrupt checkpoint",
    "unwritable checkpoint folder",
    "resume with a longer schedule",
)


def launch(out: Path, name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    """The run as a subprocess; its stderr goes to a file (a pipe could fill up and block it)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(SCRIPT), *RUN_ARGS, "--output", str(out), "--experiment", name, *extra]
    log = out / f"{name}.{len(list(out.glob(name + '.*.log')))}.log"
    with log.open("w") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env), log


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> tuple[int, str]:
    code = proc.wait(timeout=timeout)
    return code, log.read_text()


def last_update(run: Path) -> int:
    """The newest ``train`` record's update in ``metrics.jsonl`` (0 before the first)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if record.get("type") == "train":
            steps.append(record["step"])
    return max(steps)


def checkpoints(run: Path) -> list[int]:
    """Updates of the complete checkpoints (``ckpt-<updates>``; not the ones set aside as damaged)."""
    folder = run / "checkpoints"
    names = [p.name for p in folder.glob("ckpt-*")] if folder.is_dir() else []
    return sorted(int(n.split("-")[1]) for n in names if n.split("-")[1].isdigit())


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pth", weights_only=True)["state_dict"]


def logged_lrs(run: Path) -> dict[int, float]:
    """The lr of each ``train`` record by update (a step logged twice keeps its latest value)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records if r.get("type") == "train"}


def resumed_from(run: Path) -> list[int]:
    """The update each resume of the run started from (its ``resume`` records)."""
    path = run / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["updates"] for r in records if r.get("type") == "resume"]


def make_unwritable(proc: subprocess.Popen, log: Path, run: Path) -> tuple[int | None, str]:
    """A file where the checkpoint folder was (root writes through permissions, not into a file) until
    the run fails to save and stops; then the folder back. Returns the rescued update and the
    ``--resume`` path the error names."""
    folder, aside = run / "checkpoints", run / "checkpoints.aside"
    os.replace(folder, aside)
    folder.write_text("not a folder")
    _, err = finish(proc, log)
    folder.unlink()
    os.replace(aside, folder)
    found = re.search(r"continue with --resume (\S+)", err)
    if found is None:
        return None, err[-2000:]
    return int(Path(found.group(1)).name.split("-")[1]), found.group(1)


def longer_schedule(out: Path, index: int, at: int, reference_lrs: dict[int, float]) -> dict:
    """A run launched with ``--iterations at`` to its end, then resumed with the full length: the
    resumed updates must run at the reference's lr (bit for bit) and move the weights."""
    fault, name = FAULTS[-1], f"trial{index}"
    run = out / name
    code, err = finish(*launch(out, name, "--iterations", str(at)))
    if code != 0:
        return dict(trial=index, fault=fault, at=at, ok=False, error=err[-2000:])
    short = final_weights(run)
    code, err = finish(*launch(out, name, "--resume", "auto"))
    if code != 0:
        return dict(trial=index, fault=fault, at=at, ok=False, error=err[-2000:])
    after = {u: lr for u, lr in logged_lrs(run).items() if u > at}
    followed = sorted(after) == list(range(at + 1, UPDATES + 1)) and all(
        lr == reference_lrs[u] for u, lr in after.items()
    )
    moved = any(not torch.equal(short[k], v) for k, v in final_weights(run).items())
    start = (resumed_from(run) or [0])[0]
    lost = max(0, at - start)
    return dict(
        trial=index, fault=fault, at=at, resumed_from=start, lost=lost, followed=followed, moved=moved,
        ok=followed and moved and lost == 0,
    )  # fmt: skip


def trial(
    out: Path,
    index: int,
    rng: random.Random,
    reference: dict[str, torch.Tensor],
    reference_lrs: dict[int, float],
    faults: tuple[str, ...] = FAULTS,
) -> dict:
    fault = faults[index % len(faults)]
    at = rng.randint(3, UPDATES - 3)
    name = f"trial{index}"
    run = out / name
    if fault == "resume with a longer schedule":
        return longer_schedule(out, index, at, reference_lrs)
    shutil.rmtree(Path(tempfile.gettempdir()) / "timm_ortho-rescue" / name, ignore_errors=True)
    proc, log = launch(out, name)
    while last_update(run) < at and proc.poll() is None:
        time.sleep(0.05)
    newest_at_fault = checkpoints(run)[-1] if checkpoints(run) else 0
    rescued, first_resume = None, ("--resume", "auto")
    if fault == "unwritable checkpoint folder":
        rescued, where = make_unwritable(proc, log, run)
        if rescued is None:
            return dict(trial=index, fault=fault, at=at, ok=False, error=where)
        first_resume = ("--resume", where)
    else:
        proc.send_signal(signal.SIGKILL if fault.startswith("kill") else getattr(signal, fault))
        finish(proc, log)
    stopped_at = last_update(run)
    corrupted, intact_before = None, 0
    if fault.endswith("corrupt checkpoint") and checkpoints(run):
        *older, corrupted = checkpoints(run)
        newest = run / "checkpoints" / f"ckpt-{corrupted:09d}"
        weights = next(newest.glob("model*.safetensors"))
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        intact_before = older[-1] if older else 0
    resumes = 0
    while not (run / "summary.json").is_file() and resumes < 3:
        resumes += 1
        code, err = finish(*launch(out, name, *(first_resume if resumes == 1 else ("--resume", "auto"))))
        if corrupted is not None and not intact_before:
            # The only checkpoint was damaged: the resume must refuse, say so, and change nothing.
            refused = code == 2 and "Nothing intact is left" in err
            return dict(trial=index, fault=fault, at=at, corrupted=corrupted, refused=refused, ok=refused)
        if code != 0:
            return dict(trial=index, fault=fault, at=at, ok=False, error=err[-2000:])
    starts = resumed_from(run)
    start = starts[0] if starts else 0
    if fault in ("SIGTERM", "SIGINT"):
        expected = stopped_at
    elif rescued is not None:
        expected = rescued  # the state saved in the rescue folder when the checkpoint folder failed
    elif corrupted is not None:
        expected = intact_before  # the damaged newest one is set aside: the one before it
    else:
        expected = newest_at_fault
    lost = max(0, expected - start)
    exact = all(torch.equal(reference[k], v) for k, v in final_weights(run).items())
    return dict(
        trial=index, fault=fault, at=at, stopped_at=stopped_at, resumed_from=start, lost=lost,
        exact=exact, ok=exact and lost == 0, corrupted=corrupted,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    parser.add_argument(
        "--fault", action="append", choices=FAULTS, help="only this fault (repeatable; default: all in turn)"
    )
    args = parser.parse_args()
    faults = tuple(args.fault) if args.fault else FAULTS
    out = Path(tempfile.mkdtemp(prefix="timm_ortho_faults_"))
    rng = random.Random(args.seed)
    print(f"reference run (uninterrupted, {UPDATES} updates) in {out}", flush=True)
    code, err = finish(*launch(out, "reference"))
    if code != 0:
        sys.exit(f"the reference run failed:\n{err[-3000:]}")
    weights, lrs = final_weights(out / "reference"), logged_lrs(out / "reference")
    results = []
    for i in range(args.trials):
        r = trial(out, i, rng, weights, lrs, faults)
        results.append(r)
        print(json.dumps(r), flush=True)
    exact = sum(r.get("exact", False) for r in results)
    refused = sum(r.get("refused", False) for r in results)
    lost = sum(r.get("lost", 0) for r in results)
    longer = [r for r in results if r["fault"] == FAULTS[-1]]
    followed = sum(r.get("followed", False) and r.get("moved", False) for r in longer)
    failed = [r["trial"] for r in results if not r["ok"]]
    print(
        f"{len(results)} trials, {exact} resumed exactly, {lost} lost updates beyond the last checkpoint"
        + (f", {refused} refused as they must (the only checkpoint damaged)" if refused else "")
        + (f", {followed} of {len(longer)} resumed onto the longer schedule" if longer else "")
        + (f"; failed trials: {failed}" if failed else "")
    )
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
