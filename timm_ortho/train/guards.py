"""What keeps a run from failing silently or losing work: divergence checks and stop signals.

- :class:`DivergenceMonitor` notes a non-finite loss on the device at every update (no host-device
  synchronization) and is read where the loop synchronizes anyway: on the logging cadence, before
  every evaluation and before every checkpoint. :meth:`DivergenceMonitor.check_weights` refuses to
  let non-finite weights be saved.
- :class:`StopSignals` turns SIGTERM (what a scheduler sends before preemption) and SIGINT (Ctrl-C)
  into a request to stop after the current update, so that the loop can write a checkpoint and exit;
  a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import math
import shlex
import signal
import threading
from collections.abc import Iterable, Sequence
from types import FrameType
from typing import Any

import torch
from torch import Tensor

__all__ = ["Diverged", "DivergenceMonitor", "StopSignals", "exit_code_for", "resume_command"]

_ADVICE = (
    "lower --lr (or add --warmup-epochs), keep the step bound on (--max-grad-ratio, default 0.01), "
    "clip gradients (--clip-grad 1.0), or train in bf16 instead of fp16"
)


class Diverged(RuntimeError):
    """Training produced a non-finite loss or non-finite weights; the message says when and what to try."""

    def __init__(self, what: str, update: int | None) -> None:
        at = f" at update {update}" if update is not None else ""
        super().__init__(f"training diverged{at}: {what}. Try: {_ADVICE}.")
        self.update = update


_NONE = torch.iinfo(torch.int64).max  # no non-finite loss noted


def _on_any_process(flag: bool | Tensor, accelerator: Any) -> bool:
    """Whether ``flag`` holds on any process: a read on the host, one all-reduce when there are several."""
    if accelerator is None or accelerator.num_processes == 1:
        return bool(flag)
    flag = torch.as_tensor(flag, dtype=torch.float32, device=accelerator.device).reshape(1)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


class DivergenceMonitor:
    """Non-finite losses, found without a host-device synchronization per update.

    :meth:`observe` keeps, on the loss's device, the first update whose loss was NaN or infinite
    (``torch.where`` on a 0-d tensor, no read on the host). :meth:`check` reads that one number, a
    synchronization, so the loop calls it where it synchronizes anyway: when it logs, evaluates or
    saves. A divergence is therefore reported at most one logging interval after it happened, and
    never saved: :meth:`check_weights` runs before every checkpoint.

    Args:
        skip: ``0`` (default) stops at the first non-finite loss. ``N > 0`` instead skips updates whose
            loss is not finite, up to ``N`` in a row (:meth:`should_skip`, which reads the loss on the
            host: one synchronization per update in that mode).
    """

    def __init__(self, skip: int = 0) -> None:
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
            raise ValueError(f"skip must be an int >= 0 (consecutive updates to skip), got {skip!r}")
        self.skip = skip
        self.skipped = 0
        self._in_a_row = 0
        self._first_bad: Tensor | None = None  # the first non-finite loss's update; _NONE: none yet

    def observe(self, loss: Tensor, update: int) -> None:
        """Note ``loss`` of ``update`` (0-d; any device). No synchronization. (Skip mode reads every
        loss in :meth:`should_skip` instead.)"""
        if self.skip:
            return
        if self._first_bad is None:
            self._first_bad = torch.full((), _NONE, dtype=torch.int64, device=loss.device)
        # Four kernels, no branch on a value: |loss| < inf is False for +-inf and NaN; the clamp keeps
        # the earliest update (they only grow).
        finite = loss.detach().abs() < math.inf
        self._first_bad = torch.where(finite, self._first_bad, self._first_bad.clamp(max=update))

    def check(self, accelerator: Any = None) -> None:
        """Raise :class:`Diverged` if a loss noted since the start was not finite (one synchronization).

        With several processes every process must call it at the same point: the earliest
        non-finite update of any process is shared (one gather), so all of them stop together.
        """
        if self._first_bad is None:
            return
        first = self._first_bad
        if accelerator is not None and accelerator.num_processes > 1:
            first = accelerator.gather(first[None]).min()
        update = int(first)
        if update != _NONE:
            raise Diverged("the loss is NaN or infinite", update)

    def should_skip(self, loss: Tensor, update: int, accelerator: Any = None) -> bool:
        """With ``skip > 0``: whether to skip this update (its loss is not finite). Reads the loss.

        With several processes, a non-finite loss on any of them skips the update on all (one
        all-reduce), so that their weights stay identical. Raises :class:`Diverged` once more than
        ``skip`` updates in a row were not finite.
        """
        if self.skip == 0:
            return False
        if not _on_any_process(~torch.isfinite(loss.detach()), accelerator):
            self._in_a_row = 0
            return False
        self._in_a_row += 1
        self.skipped += 1
        if self._in_a_row > self.skip:
            raise Diverged(f"the loss was not finite for {self._in_a_row} updates in a row", update)
        return True

    @staticmethod
    @torch.no_grad()
    def check_weights(parameters: Iterable[Tensor], update: int | None = None) -> None:
        """Raise :class:`Diverged` if any parameter holds a NaN or an infinity (one synchronization).

        Called before a checkpoint or ``model_best.pth`` is written, so non-finite weights never
        reach the disk.
        """
        tensors = [p.detach() for p in parameters if p.is_floating_point()]
        if not tensors:
            return
        norms = torch._foreach_norm(tensors)
        if not bool(torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms])).all()):
            raise Diverged("the weights hold NaN or infinite values", update)


class StopSignals:
    """SIGTERM and SIGINT request a stop after the current update; a second SIGINT aborts at once.

    Used as a context manager around the loop (handlers are installed from the main thread only and
    restored on exit). :meth:`requested` answers for every process of a multi-process run: a process
    that did not receive the signal itself learns it from the others through one small all-reduce.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now
        self.received = self.received or signal.Signals(signum).name

    def requested(self, accelerator: Any = None) -> bool:
        """Whether any process received a stop signal. One process: a flag, no synchronization.

        Several processes: one all-reduce of a flag (a synchronization), so every process stops after
        the same update; call it on a cadence, not every update.
        """
        return _on_any_process(self.received is not None, accelerator)


def exit_code_for(signal_name: str | None) -> int:
    """The shell's convention, ``128 + signal number``: 130 after SIGINT, 143 after SIGTERM (also for
    a process stopped because another one received a signal)."""
    if signal_name is None:
        return 0
    return 128 + int(signal.Signals.__members__.get(signal_name, signal.SIGTERM))


def resume_command(argv: Sequence[str], checkpoint: str) -> str:
    """The command line that resumes this run from ``checkpoint``: ``argv`` with ``--resume`` set."""
    args, out = iter(argv), []
    for arg in args:
        if arg == "--resume":
            next(args, None)  # and its value
        elif not arg.startswith("--resume="):
            out.append(arg)
    return shlex.join(["accelerate", "launch", *out, "--resume", checkpoint])
