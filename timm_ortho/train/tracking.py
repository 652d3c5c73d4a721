"""What a run records: ``metrics.jsonl`` as an Accelerate tracker, its reading, the console summary.

Every record of a run (config, resume, train, layers, eval, summary) goes through
``accelerator.log`` once (:func:`log_record`): the :class:`JsonlTracker` writes the whole record as
one JSON line, and the other trackers (tensorboard, wandb, ...) get its scalars only, since they
take numbers and strings, not the per-layer lists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate.tracking import GeneralTracker

__all__ = ["JsonlTracker", "format_summary", "log_record", "ratio_history"]


def to_json(value: Any) -> Any:
    """``json.dumps``'s ``default``: tensors as lists, anything else (paths, ...) as its string."""
    return value.tolist() if isinstance(value, torch.Tensor) else str(value)


class JsonlTracker(GeneralTracker):
    """Appends each record to ``path`` (``<run>/metrics.jsonl``), flushed line by line.

    Accelerate calls it on the main process only. ``path`` may be set after construction, up to
    ``accelerator.init_trackers``, which opens the file: the run folder is named after the
    ``Accelerator`` exists.
    """

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__()
        self.path = Path(path) if path is not None else None
        self._file = None

    @property
    def tracker(self) -> Any:
        return self._file

    def start(self) -> None:
        self._file = self.path.open("a")

    def log(
        self, values: dict[str, Any], step: int | None = None, record: dict | None = None, **_: Any
    ) -> None:
        """Write ``record`` (given by :func:`log_record`), or the scalars ``values`` at ``step``."""
        line = record if record is not None else {"step": step, **values}
        self._file.write(json.dumps(line, default=to_json) + "\n")
        self._file.flush()

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()


def log_record(accelerator: Any, record: dict[str, Any], step: int | None = None) -> None:
    """Log ``record`` once: whole to ``metrics.jsonl``, its scalars to the other trackers.

    Only ``train`` and ``eval`` records carry metrics for the other trackers; the rest reach them
    empty, at ``step`` (the run's update count) when the record has none, so that trackers which
    number their rows (wandb) see the steps only grow.
    """
    scalars = {}
    if record.get("type") in ("train", "eval"):
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    step = record.get("step", step)
    accelerator.log(scalars, step=step, log_kwargs={JsonlTracker.name: {"record": record}})


def ratio_history(path: Path, unmodulated: bool) -> dict[str, tuple[list[int], list[float]]]:
    """Bottom/top error-moment ratios logged so far in ``metrics.jsonl``, across resumes.

    Steps logged twice (after the last checkpoint of an interrupted run, then again after the
    resume) keep their latest value.
    """
    keys = {"as trained": "mod_bottom_top_ratio"}
    if unmodulated:
        keys["same forward, unmodulated"] = "mod_bottom_top_ratio_unmodulated"
    records = (json.loads(line) for line in path.read_text().splitlines())
    by_step = {r["step"]: r for r in records if r.get("type") == "train" and keys["as trained"] in r}
    steps = sorted(by_step)
    history = {label: (steps, [by_step[t][key] for t in steps]) for label, key in keys.items()}
    return history if steps else {}


def banner(lines: list[str]) -> str:
    """``lines`` in a box of stars, for what must not be missed at the top of a log."""
    width = max(len(s) for s in lines) + 4
    bar = "*" * width
    return "\n".join([bar, *[f"* {s:<{width - 4}} *" for s in lines], bar])


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run summary as the console shows it."""
    ev = summary.get("final_eval") or {}
    lines = [
        "=" * 78,
        f"run        {summary['run_dir']}",
        f"model      {summary['model']} ({summary['params'] / 1e6:.2f}M params)",
        f"method     {summary['method']}",
        f"data       {summary['data']}",
        f"hardware   {summary['processes']} process(es), mixed precision {summary['mixed_precision']}",
        f"trained    {summary['updates']} updates ({summary['epochs_done']:.2f} epochs) in "
        f"{summary['wall_seconds']:.1f} s"
        + (f", {summary['train_samples_per_s']:.0f} img/s" if summary.get("train_samples_per_s") else ""),
        # The lines below that start with ``condition and``: shown only when the run has that.
        ev
        and f"final      val loss {ev['loss']:.4f}, top-1 {ev['top1']:.2f}%"
        + (f", top-5 {ev['top5']:.2f}%" if "top5" in ev else "")  # left out where it is always 100 %
        + f"; best top-1 {summary['best_top1']:.2f}% (epoch {summary['best_epoch']})",
        summary.get("ema_eval") and f"EMA        top-1 {summary['ema_eval']['top1']:.2f}%",
        f"filters    sum ||WW^T-I||^2 = {summary['ortho_residual']:.4g}, "
        f"mean |cos| = {summary['filter_cos']:.4g}",
        summary.get("synthetic") and "NOTE       trained on the EMBEDDED SYNTHETIC data set (no --data-dir)",
        summary.get("skipped_images")
        and f"SKIPPED    {summary['skipped_images']} undecodable training images (see the log)",
        *(f"plot       {png}" for png in summary.get("plots") or ()),
        "=" * 78,
    ]
    return "\n".join(line for line in lines if line)
