"""``--resume``: which checkpoint a run continues from, whether it fits the run, and what it restores.

:func:`resolve_resume` turns what the user named (a checkpoint folder or a file in one, a run folder
or its ``last.pth``, ``auto``) into one intact checkpoint, passing over damaged ones of a run for the
newest intact one and refusing a damaged one named explicitly. :func:`check_recipe` refuses a
checkpoint saved by another *recipe* (:func:`recipe_of`: the settings that shape the saved state)
with the list of what differs, and :func:`check_run_folder` keeps one timeline per folder of rotating
checkpoints. :func:`resume_point` does all of that for a run before its folder is created;
:func:`load_keeping_schedule` restores the state once the run is built, with the schedule of the
resuming run's flags.

The checkpoints themselves (writing, integrity, loading) are :mod:`timm_ortho.train.checkpoint`'s.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from accelerate.logging import get_logger

from .checkpoint import (
    MARKER,
    NAME_PATTERN,
    CheckpointError,
    check_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    updates_of,
)
from .config import ConfigError, TrainConfig, base_optimizer_name
from .data import check_data

__all__ = [
    "check_recipe",
    "check_run_folder",
    "expected_num_classes",
    "load_keeping_schedule",
    "recipe_of",
    "resolve_resume",
    "resume_point",
    "saved_total_updates",
    "set_aside",
]

_log = get_logger("timm_ortho.train")
_plain_log = logging.getLogger(__name__)  # for what the main process does alone


# ----------------------------------------------------------------------------------------------
# which checkpoint
# ----------------------------------------------------------------------------------------------
def _named_folder(resume: str) -> Path:
    """The folder that ``--resume PATH`` stands for: ``PATH``, or the folder of a file in a checkpoint,
    or the run folder of a ``last.pth`` (a ``FileNotFoundError`` for anything else)."""
    path = Path(resume).expanduser()
    if not path.exists() and path.name == "last.pth" and path.parent.is_dir():
        path = path.parent  # a run stopped before its first epoch ended has checkpoints, no last.pth
    if not path.exists():
        raise FileNotFoundError(
            f"--resume {resume}: {path} does not exist. Name a checkpoint folder ckpt-<updates>, a file "
            "in one, a run folder or its last.pth, or pass --resume auto with --experiment"
        )
    if not path.is_file():
        return path
    # A file inside a checkpoint folder (complete or not) stands for the folder; a run's last.pth
    # for the run folder, whose newest checkpoint is taken.
    in_checkpoint = (path.parent / MARKER).is_file() or NAME_PATTERN.match(path.parent.name)
    if not in_checkpoint and path.name != "last.pth":
        raise FileNotFoundError(
            f"--resume {resume}: this file is not part of a checkpoint (weights files such as "
            "model_best.pth hold no optimizer state). Name a checkpoint folder ckpt-<updates>, "
            "a file in one, a run folder or its last.pth"
        )
    return path.parent


def resolve_resume(
    resume: str, run_dir: Path | None, skipped: list[tuple[Path, list[str]]] | None = None
) -> Path:
    """The checkpoint folder that ``--resume`` names.

    ``resume`` is a checkpoint folder, a run folder (its newest intact checkpoint is taken), a
    ``checkpoints`` folder, or ``auto`` / ``latest`` for the newest intact checkpoint of ``run_dir``.
    As with timm's ``--resume FILE``, it may also name a file: one inside a checkpoint folder stands
    for that folder, and a run folder's ``last.pth`` for the run's newest checkpoint. Damaged
    checkpoints passed over on the way are appended to ``skipped`` with what is wrong with them; a
    damaged checkpoint named explicitly is a :class:`CheckpointError` naming its files.
    """
    skipped = [] if skipped is None else skipped
    if resume in ("auto", "latest"):
        if run_dir is None:
            raise FileNotFoundError("--resume auto needs --experiment to name the run folder to resume")
        candidates = [run_dir / "checkpoints"]
    else:
        path = _named_folder(resume)
        if (path / MARKER).is_file():
            problems = check_checkpoint(path)
            if problems:
                raise CheckpointError(
                    f"checkpoint {path} is damaged: {'; '.join(problems)}. Resume from its run folder "
                    f"{path.parent.parent} to take the newest intact checkpoint"
                )
            return path
        if path.is_dir() and NAME_PATTERN.match(path.name):
            raise FileNotFoundError(
                f"{path} is an incomplete checkpoint (no {MARKER}: the save was interrupted); "
                f"resume from the run folder {path.parent.parent} to take its newest complete checkpoint"
            )
        candidates = [path / "checkpoints", path]
    for c in candidates:
        found = latest_checkpoint(c, skipped)
        if found is not None:
            return found
    if skipped:
        listed = "; ".join(f"{p}: {', '.join(problems)}" for p, problems in skipped)
        raise CheckpointError(
            f"--resume {resume}: every checkpoint found is damaged ({listed}). Nothing intact is left "
            "to resume from: start a new run (another --experiment, without --resume)"
        )
    raise FileNotFoundError(
        f"no complete checkpoint found for --resume {resume!r} (looked in "
        f"{', '.join(str(c) for c in candidates)}); a checkpoint is a folder ckpt-<updates> holding {MARKER}"
    )


def set_aside(damaged: list[tuple[Path, list[str]]]) -> None:
    """Rename damaged checkpoints to ``<name>.damaged`` (main process): resume and rotation then
    ignore them, and they stay for inspection. Each one is logged."""
    for path, _ in damaged:
        target = path.with_name(f"{path.name}.damaged")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(path, target)
        _plain_log.warning("set aside as %s (delete it when no longer needed)", target)


# ----------------------------------------------------------------------------------------------
# the recipe: what must match for a checkpoint's state to load
# ----------------------------------------------------------------------------------------------
def recipe_of(cfg: Any, num_classes: int | None) -> dict[str, Any]:
    """The settings of ``cfg`` (a ``TrainConfig``) that decide the shapes of the saved state.

    Model and classes shape the weights; the optimizer, the method (its parameter groups) and the
    modulation shape the optimizer state; the EMA and an LR schedule (any ``--sched`` but ``none``)
    each add a registered object. The schedule's settings are not part of it: a resume rebuilds the
    schedule from its own flags.
    """
    recipe = {
        "model": cfg.model,
        "model_kwargs": dict(cfg.model_kwargs),
        "num_classes": num_classes,
        "opt": base_optimizer_name(cfg.opt),
        "method": "baseline" if cfg.baseline else "orthonormality regularizer",
        "modulation": cfg.modulation is not False,
        "model_ema": bool(cfg.model_ema),
        "lr_scheduler": cfg.sched != "none",
    }
    return json.loads(json.dumps(recipe, default=str))  # as a marker stores it


def _saved_recipe(path: Path) -> dict[str, Any] | None:
    """The recipe of the checkpoint at ``path``: its marker's, or its run's ``config.json``'s."""
    marker = json.loads((path / MARKER).read_text())
    if isinstance(marker.get("recipe"), dict):
        return marker["recipe"]
    config = path.parent.parent / "config.json"
    if path.parent.name != "checkpoints" or not config.is_file():
        return None
    try:  # the saved settings, read like a TrainConfig
        info = json.loads(config.read_text())
        return recipe_of(SimpleNamespace(**info["config"]), info.get("num_classes"))
    except (ValueError, KeyError, AttributeError, TypeError):
        return None


def check_recipe(path: Path, recipe: dict[str, Any]) -> None:
    """Refuse (a :class:`CheckpointError`) to resume ``path`` with another ``recipe`` than it was saved with.

    Settings that are ``None`` in ``recipe`` (not known yet) are not compared, nor are checkpoints
    that record no recipe.
    """
    saved = _saved_recipe(path)
    if saved is None:
        return
    differences = [
        f"{key} {saved[key]!r} in the checkpoint, {value!r} now"
        for key, value in recipe.items()
        if value is not None and key in saved and saved[key] != value
    ]
    if differences:
        raise CheckpointError(
            f"checkpoint {path} was saved by another recipe: {'; '.join(differences)}. Resume with the "
            "checkpoint's settings, or start a new run (another --experiment, without --resume)"
        )


def check_run_folder(run_dir: Path, resume_path: Path | None) -> None:
    """Refuse to mix two timelines in one folder of rotating checkpoints (a ``ConfigError``).

    A fresh run into a folder that holds checkpoints, or a resume from a checkpoint older than the
    folder's newest, would interleave its checkpoints with the others, and a later ``--resume auto``
    would pick the wrong one.
    """
    existing = list_checkpoints(run_dir / "checkpoints")
    if not existing:
        return
    if resume_path is None:
        raise ConfigError(
            f"{run_dir} already holds checkpoints ({existing[-1].name} is the newest): continue it with "
            f"--resume auto (and --experiment {run_dir.name}), or choose another --experiment"
        )
    newest = existing[-1]
    if resume_path.resolve() != newest.resolve() and updates_of(resume_path) < updates_of(newest):
        raise ConfigError(
            f"resuming from {resume_path} would continue in {run_dir}, which holds the newer "
            f"{newest.name}; pass --experiment NAME to branch into a new run folder"
        )


# ----------------------------------------------------------------------------------------------
# the resume of a run
# ----------------------------------------------------------------------------------------------
def expected_num_classes(cfg: TrainConfig) -> int:
    """The class count the data of ``cfg`` will have, as far as it is known without reading them.

    An ImageFolder tree counts its class folders (``check_data`` has seen that there are some).
    """
    if cfg.num_classes is not None or check_data(cfg) != "imagefolder":
        return cfg.num_classes or 10  # the synthetic set's default and CIFAR-10's
    return sum(p.is_dir() for p in (Path(cfg.data_dir).expanduser() / cfg.train_split).iterdir())


def resume_point(cfg: TrainConfig, accelerator: Any) -> tuple[Path | None, Path | None]:
    """``(checkpoint to resume or None, run folder it continues or None)``, checked against ``cfg``."""
    given = Path(cfg.output) / cfg.experiment if cfg.experiment else None
    skipped: list[tuple[Path, list[str]]] = []
    try:
        resume_path = resolve_resume(cfg.resume, given, skipped)
    except FileNotFoundError:
        # "auto" with a named run that has no checkpoint yet is a first launch: the same command
        # line then serves the first start and every restart of a preemptible job.
        if cfg.resume not in ("auto", "latest") or given is None:
            raise
        _log.info("--resume %s: no checkpoint under %s yet, starting from scratch", cfg.resume, given)
        return None, None
    for path, problems in skipped:
        _log.warning("checkpoint %s is damaged (%s); passed over", path, "; ".join(problems))
    check_recipe(resume_path, recipe_of(cfg, expected_num_classes(cfg)))
    run_dir = given
    if run_dir is None and resume_path.parent.name == "checkpoints":
        run_dir = resume_path.parent.parent
    if skipped:
        _log.warning("resuming from %s, the newest intact checkpoint", resume_path)
        # Damaged checkpoints newer than the one resumed would confuse rotation and the next
        # --resume auto: set them aside (not deleted) when the run continues in their folder.
        here = [(p, why) for p, why in skipped if run_dir is not None and p.parent == run_dir / "checkpoints"]
        if accelerator.is_main_process:
            set_aside(here)
        accelerator.wait_for_everyone()
    return resume_path, run_dir


def load_keeping_schedule(accelerator: Any, path: Path, scheduler: Any, progress: Any) -> bool:
    """``accelerator.load_state(path)``, then the schedule this run's flags built, at the checkpoint's
    update (``progress``, the registered position, is restored by the load). Returns whether the
    checkpoint's schedule was another one, so that the caller can say so.

    The checkpoint restores the scheduler of the run that saved it, settings included: resumed with
    ``--epochs 4`` after a cosine run of 2, it would have reached its end and train on at lr 0.
    timm's ``train.py`` builds its scheduler from the new flags and restores only the position; so
    does the trainer (timm's schedulers are functions of the update count and their settings).
    """
    built = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
    load_checkpoint(accelerator, path)
    if built is None or scheduler.state_dict() == built:  # the same flags: the same schedule
        return False
    scheduler.load_state_dict(built)
    scheduler.step_update(progress.updates)
    return True


def saved_total_updates(path: Path) -> int | None:
    """The length in updates of the run that saved the checkpoint ``path`` (its marker's), if recorded."""
    try:
        return json.loads((path / MARKER).read_text()).get("total_updates")
    except (OSError, ValueError):
        return None
