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

What resume trusts: the marker records the size and CRC-32 of every file of the checkpoint and
the run's *recipe* (:func:`timm_ortho.train.resume.recipe_of`). :func:`check_checkpoint` compares
sizes and CRCs before anything is loaded; :mod:`timm_ortho.train.resume` decides which checkpoint
a ``--resume`` continues from and whether it fits the run. A save that fails is retried once, then
written to a fallback folder, and the error says where the state went.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigError

__all__ = [
    "MARKER",
    "NAME_PATTERN",
    "CheckpointError",
    "CheckpointManager",
    "check_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "updates_of",
    "write_atomic",
]

MARKER = "checkpoint.json"
NAME_PATTERN = re.compile(r"^ckpt-(\d+)$")
"""A checkpoint folder's name, ``ckpt-<updates>`` (zero-padded as :class:`CheckpointManager` writes it)."""
_log = logging.getLogger(__name__)


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from (damaged, of another recipe) or cannot be written.

    A :class:`ConfigError`, so that the scripts report it as one line and exit with code 2.
    """


def _fsync_dir(path: Path) -> None:
    # Make the rename itself durable; not every platform can open (or fsync) a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (those with a marker), oldest first."""
    found = [p for p in Path(root).glob("ckpt-*") if NAME_PATTERN.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=updates_of)


def updates_of(path: Path) -> int:
    """The update a checkpoint folder holds: from its name ``ckpt-<updates>``, else (a folder copied
    or renamed) from its marker, which a resume has checked by then."""
    # The name first: a damaged marker must not stop a comparison of folders named by rotation.
    named = NAME_PATTERN.match(path.name)
    if named:
        return int(named.group(1))
    try:
        return int(json.loads((path / MARKER).read_text())["updates"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path} is not named ckpt-<updates> and its {MARKER} does not say which update it holds "
            f"({type(e).__name__}: {e})"
        ) from e


def _crc32(path: Path) -> int:
    """CRC-32 of a file's bytes, read in chunks (about a second per GB; the page cache makes the
    one at save time cheaper still)."""
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def check_checkpoint(path: str | Path) -> list[str]:
    """What is wrong with the checkpoint folder ``path``; an empty list when it looks loadable.

    Checks the marker, then each file it recorded: present, of the recorded size and CRC-32 (one
    read of the checkpoint, no unpickling). A marker that records no files (written by an earlier
    version) is taken on trust.
    """
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text())
        int(marker["updates"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MARKER}: unreadable ({type(e).__name__}: {e})"]
    files = marker.get("files")
    if not isinstance(files, dict):
        return []
    problems = []
    for name, (size, crc) in sorted(files.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size != size:
            problems.append(f"{name}: {file.stat().st_size} bytes, {size} when it was saved")
        elif _crc32(file) != crc:
            problems.append(f"{name}: its content changed since it was saved (CRC-32 differs)")
    return problems


def latest_checkpoint(root: str | Path, skipped: list[tuple[Path, list[str]]] | None = None) -> Path | None:
    """The newest checkpoint under ``root`` that passes :func:`check_checkpoint`, or ``None``; the
    newer damaged ones are appended to ``skipped`` with their problems."""
    for found in reversed(list_checkpoints(root)):
        problems = check_checkpoint(found)
        if not problems:
            return found
        if skipped is not None:
            skipped.append((found, problems))
    return None


def load_checkpoint(accelerator: Any, path: Path) -> None:
    """``accelerator.load_state(path)``, with a failure reported as a :class:`CheckpointError` naming it."""
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # torch, safetensors and pickle each raise their own types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"cannot load checkpoint {path}: {type(e).__name__}: {first}. Resume from its run folder "
            f"{path.parent.parent} to fall back to an intact checkpoint, or check the flags match the run's"
        ) from e


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def write_atomic(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` through a temporary name and a rename, retried once.

    A failure leaves the previous file intact and raises a :class:`CheckpointError` naming ``path``.
    """
    import torch

    tmp = path.with_name(f".tmp-{path.name}")
    for attempt in (1, 2):
        try:
            torch.save(obj, tmp)
            os.replace(tmp, path)
            return
        except Exception as e:  # OSError, or torch's RuntimeError from its zip writer
            error = f"{type(e).__name__}: {e}"
            if tmp.parent.is_dir():
                tmp.unlink(missing_ok=True)
            if attempt == 1:
                _log.warning("writing %s failed (%s); retrying once", path, error)
    raise CheckpointError(f"cannot write {path} ({error}); tried twice, the previous file is unchanged")


class CheckpointManager:
    """Saves ``accelerator.save_state`` checkpoints into rotating folders under ``root``.

    Args:
        accelerator: the run's ``Accelerator``; every process must call :meth:`save` together.
        root: folder of the checkpoints, e.g. ``<run>/checkpoints``.
        keep: complete checkpoints to keep (at least 1).
        recipe: :func:`recipe_of` the run, recorded in every marker and compared on resume.
        fallback: where a save goes when ``root`` fails twice; default
            ``<system temp>/timm_ortho-rescue/<run folder name>/checkpoints``.
    """

    def __init__(
        self,
        accelerator: Any,
        root: str | Path,
        keep: int = 2,
        recipe: dict[str, Any] | None = None,
        fallback: str | Path | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.accelerator, self.root, self.keep, self.recipe = accelerator, Path(root), keep, recipe
        rescue = Path(tempfile.gettempdir()) / "timm_ortho-rescue" / self.root.parent.name / "checkpoints"
        self.fallback = Path(fallback) if fallback is not None else rescue
        self.saved: tuple[int, Path] | None = None
        """``(updates, folder)`` of the newest checkpoint this manager has written, or ``None``."""

    def save(self, updates: int, info: dict[str, Any] | None = None) -> Path:
        """Save the full training state as ``ckpt-<updates>``; returns its folder.

        A failed write is retried once; if that fails too, the state goes to :attr:`fallback` and a
        :class:`CheckpointError` says where it went (the in-memory state is untouched either way).
        """
        error = None
        for attempt in (1, 2):
            error = self._attempt(self.root, updates, info)
            if error is None:
                self.saved = (updates, self.root / f"ckpt-{updates:09d}")
                return self.saved[1]
            if attempt == 1 and self.accelerator.is_main_process:
                _log.warning(
                    "saving checkpoint %d into %s failed (%s); retrying once", updates, self.root, error
                )
        failed = f"cannot write checkpoint ckpt-{updates:09d} into {self.root} ({error}); tried twice"
        rescue_error = self._attempt(self.fallback, updates, info)
        if rescue_error is not None:
            raise CheckpointError(
                f"{failed}; the fallback folder {self.fallback} failed too ({rescue_error}). The training "
                f"state of update {updates} is only in memory: free space or fix permissions and restart "
                "from the newest checkpoint"
            )
        rescued = self.fallback / f"ckpt-{updates:09d}"
        raise CheckpointError(
            f"{failed}. The training state of update {updates} was saved to {rescued} instead: once "
            f"{self.root} is writable again, continue with --resume {rescued} --output "
            f"{self.root.parent.parent} --experiment {self.root.parent.name}"
        )

    def _together(self, action: Callable[[], object], main_only: bool = False) -> str | None:
        """Run ``action`` on every process (with ``main_only``: on the main one), then wait for all;
        returns the first error of any process, on every process (a collective when there are several)."""
        acc, error = self.accelerator, None
        if acc.is_main_process or not main_only:
            try:
                action()
            except Exception as e:  # OSError, or torch's RuntimeError from its zip writer; not interrupts
                error = f"{type(e).__name__}: {e}"
        acc.wait_for_everyone()
        if getattr(acc, "num_processes", 1) <= 1:
            return error
        from accelerate.utils import gather_object

        return next((e for e in gather_object([error]) if e is not None), None)

    def _attempt(self, root: Path, updates: int, info: dict[str, Any] | None) -> str | None:
        """One save into ``root``; returns what went wrong (the same on every process) or ``None``."""
        final = root / f"ckpt-{updates:09d}"
        tmp = root / f".tmp-{final.name}"

        def prepare() -> None:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):  # left by an interrupted or failed save
                shutil.rmtree(stale, ignore_errors=True)

        return (
            self._together(prepare, main_only=True)
            or self._together(lambda: self.accelerator.save_state(str(tmp)))
            or self._together(lambda: self._commit(tmp, final, updates, info), main_only=True)
        )

    def _commit(self, tmp: Path, final: Path, updates: int, info: dict[str, Any] | None) -> None:
        """Main process: the marker (sizes and recipe), the atomic rename, then the rotation."""
        files = {
            str(f.relative_to(tmp)): [f.stat().st_size, _crc32(f)]
            for f in sorted(tmp.rglob("*"))
            if f.is_file()
        }
        marker = {"updates": updates, "time": time.time(), **(info or {}), "files": files}
        if self.recipe is not None:
            marker["recipe"] = self.recipe
        with (tmp / MARKER).open("w") as f:
            json.dump(marker, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = final.with_name(f".tmp-old-{final.name}")  # none yet: the save began by clearing .tmp-*
        if final.exists():  # the same update count saved twice (e.g. step and epoch end)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
        for stale in list_checkpoints(final.parent)[: -self.keep]:
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True)
