"""Divergence checks and stop signals of the training application (timm_ortho.train.guards)."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from timm_ortho.train.guards import Diverged, DivergenceMonitor, StopSignals, exit_code_for, resume_command


class CountLocalScalarReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (a synchronization on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in {"_local_scalar_dense", "item", "is_nonzero"}:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_the_first_nonfinite_loss_is_reported_with_its_update_and_no_sync_per_update():
    monitor = DivergenceMonitor()
    losses = [2.3, 2.1, math.nan, 1.0, math.inf]
    with CountLocalScalarReads() as reads:
        for update, value in enumerate(losses):
            monitor.observe(torch.tensor(value), update)
    assert reads.reads == 0  # observe never reads the loss on the host
    with pytest.raises(Diverged, match=r"diverged at update 2: the loss is NaN or infinite\. Try: lower"):
        monitor.check()


def test_finite_losses_pass_and_an_unobserved_monitor_is_fine():
    monitor = DivergenceMonitor()
    monitor.check()
    for update in range(3):
        monitor.observe(torch.tensor(1.0 / (update + 1)), update)
    monitor.check()


def test_skip_mode_skips_up_to_n_in_a_row():
    monitor = DivergenceMonitor(skip=2)
    flags = [monitor.should_skip(torch.tensor(v), i) for i, v in enumerate([1.0, math.nan, math.inf, 1.0])]
    assert flags == [False, True, True, False] and monitor.skipped == 2
    monitor.should_skip(torch.tensor(math.nan), 4)
    monitor.should_skip(torch.tensor(math.nan), 5)
    with pytest.raises(Diverged, match="3 updates in a row"):
        monitor.should_skip(torch.tensor(math.nan), 6)
    with pytest.raises(ValueError, match="skip must be an int >= 0"):
        DivergenceMonitor(skip=-1)


def test_nonfinite_weights_are_refused():
    model = nn.Linear(3, 2)
    DivergenceMonitor.check_weights(model.parameters(), 7)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(Diverged, match="at update 7: the weights hold NaN"):
        DivergenceMonitor.check_weights(model.parameters(), 7)


def test_sigterm_requests_a_stop_and_a_second_sigint_aborts():
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() and stop.received == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C only asks
        assert stop.received == "SIGINT"
    assert exit_code_for("SIGINT") == 130 and exit_code_for("SIGTERM") == 143 and exit_code_for(None) == 0


def test_resume_command_replaces_any_resume_flag():
    argv = ["scripts/train_imagenet.py", "--model", "plain_cnn20", "--resume", "old", "--lr", "0.1"]
    assert resume_command(argv, "out/run/checkpoints/ckpt-40") == (
        "accelerate launch scripts/train_imagenet.py --model plain_cnn20 --lr 0.1 "
        "--resume out/run/checkpoints/ckpt-40"
    )
    assert "--resume=x" not in resume_command(["a.py", "--resume=x"], "c")
