"""Rotating, crash-safe training checkpoints on top of ``accelerator.save_state``.

A checkpoint is a folder ``<run>/checkpoints/ckpt-<updates>`` holding everything
``accelerator.save_state`` writes (model, optimizer with the orthonormality and modulation fields,
GradScaler, every object registered with ``register_for_checkpointing``, and one RNG file per
process) plus a ``checkpoint.json`` marker written last.

Writing is atomic at the folder level: all processes save into ``.tmp-ckpt-<updates>``, the main
process writes the marker, fsyncs and renames the folder into place, and only then deletes the
oldest complete checkpoints beyond ``keep``. An interrupted save leaves a ``.tmp-*`` folder that
:func:`latest_checkpoint` ignores and the next save removes, so the last good checkpoint survives.
The output folder must be shared by all processes (on several nodes: a shared file system).

Why not Accelerate's own rotation (``ProjectConfiguration(automatic_checkpoint_naming=True,
total_limit=k)`` + ``save_state()``): it writes straight into ``checkpoint_<i>``, so a kill during
the save leaves a newest folder that ``load_state()`` picks and cannot load; it deletes the oldest
checkpoint *before* the new one is complete (with ``total_limit=1`` a crash then leaves nothing); and
it numbers saves, not updates, so a folder's name does not say where it resumes. What remains here
is exactly that difference: a temporary folder, a marker written last, an atomic rename, and the
rotation after it. The saving itself is ``accelerator.save_state``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

__all__ = [
    "MARKER",
    "CheckpointManager",
    "check_run_folder",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_resume",
]

MARKER = "checkpoint.json"
_NAME = re.compile(r"^ckpt-(\d+)$")


def _fsync_dir(path: Path) -> None:
    # Make the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (those with a marker), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or ``None``."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(resume: str, run_dir: Path | None) -> Path:
    """The checkpoint folder that ``--resume`` names.

    ``resume`` is a checkpoint folder, a run folder (its newest checkpoint is taken), a
    ``checkpoints`` folder, or ``auto`` / ``latest`` for the newest checkpoint of ``run_dir``. As with
    timm's ``--resume FILE``, it may also name a file: one inside a checkpoint folder stands for that
    folder, and a run folder's ``last.pth`` for the run's newest checkpoint.
    """
    if resume in ("auto", "latest"):
        if run_dir is None:
            raise FileNotFoundError("--resume auto needs --experiment to name the run folder to resume")
        candidates = [run_dir / "checkpoints"]
    else:
        path = Path(resume).expanduser()
        if path.is_file():
            # A file inside a checkpoint folder (complete or not) stands for the folder; a run's
            # last.pth for the run folder, whose newest checkpoint is taken below.
            in_checkpoint = (path.parent / MARKER).is_file() or _NAME.match(path.parent.name)
            if not in_checkpoint and path.name != "last.pth":
                raise FileNotFoundError(
                    f"--resume {resume}: this file is not part of a checkpoint (weights files such as "
                    "model_best.pth hold no optimizer state). Name a checkpoint folder ckpt-<updates>, "
                    "a file in one, a run folder or its last.pth"
                )
            path = path.parent
        if (path / MARKER).is_file():
            return path
        if path.is_dir() and _NAME.match(path.name):
            raise FileNotFoundError(
                f"{path} is an incomplete checkpoint (no {MARKER}: the save was interrupted); "
                f"resume from the run folder {path.parent.parent} to take its newest complete checkpoint"
            )
        candidates = [path / "checkpoints", path]
    for c in candidates:
        found = latest_checkpoint(c)
        if found is not None:
            return found
    raise FileNotFoundError(
        f"no complete checkpoint found for --resume {resume!r} (looked in "
        f"{', '.join(str(c) for c in candidates)}); a checkpoint is a folder ckpt-<updates> holding {MARKER}"
    )


class CheckpointManager:
    """Saves ``accelerator.save_state`` checkpoints into rotating folders under ``root``.

    Args:
        accelerator: the run's ``Accelerator``; every process must call :meth:`save` together.
        root: folder of the checkpoints, e.g. ``<run>/checkpoints``.
        keep: complete checkpoints to keep (at least 1).
    """

    def __init__(self, accelerator: Any, root: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.accelerator, self.root, self.keep = accelerator, Path(root), keep

    def save(self, updates: int, info: dict[str, Any] | None = None) -> Path:
        """Save the full training state as ``ckpt-<updates>``; returns its folder."""
        acc = self.accelerator
        final = self.root / f"ckpt-{updates:09d}"
        tmp = self.root / f".tmp-{final.name}"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):  # left by an interrupted save
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            marker = {"updates": updates, "time": time.time(), **(info or {})}
            with (tmp / MARKER).open("w") as f:
                json.dump(marker, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            old = None
            if final.exists():  # the same update count saved twice (e.g. step and epoch end)
                old = final.with_name(f".tmp-old-{final.name}")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            for stale in list_checkpoints(self.root)[: -self.keep]:
                if stale != final:
                    shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        return final


def check_run_folder(run_dir: Path, resume_path: Path | None) -> None:
    """Refuse to mix two timelines in one folder of rotating checkpoints (a ``ValueError``).

    A fresh run into a folder that holds checkpoints, or a resume from a checkpoint older than the
    folder's newest, would interleave its checkpoints with the others, and a later ``--resume auto``
    would pick the wrong one.
    """
    from .config import ConfigError

    existing = list_checkpoints(run_dir / "checkpoints")
    if not existing:
        return
    if resume_path is None:
        raise ConfigError(
            f"{run_dir} already holds checkpoints ({existing[-1].name} is the newest): continue it with "
            f"--resume auto (and --experiment {run_dir.name}), or choose another --experiment"
        )
    newest = existing[-1]
    updates = [int(json.loads((p / MARKER).read_text())["updates"]) for p in (resume_path, newest)]
    if resume_path.resolve() != newest.resolve() and updates[0] < updates[1]:
        raise ConfigError(
            f"resuming from {resume_path} would continue in {run_dir}, which holds the newer "
            f"{newest.name}; pass --experiment NAME to branch into a new run folder"
        )
