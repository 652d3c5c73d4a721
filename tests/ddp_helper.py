"""Run by tests/test_training.py under ``accelerate launch --num_processes 2``: train, then save this
rank's final weights as ``<run>/rank<i>.pt`` so that the test can compare the ranks.

``SIGNAL_AT=<rank>:<forward>`` makes that rank send itself SIGTERM during its ``forward``-th training
forward pass (the test of a stop signal that reaches one process only)."""

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from signal_hook import send_signal_at

from timm_ortho.train import build
from timm_ortho.train.config import build_parser, config_from_args
from timm_ortho.train.guards import exit_code_for
from timm_ortho.train.loop import train


def signal_at(rank: int, forward: int) -> None:
    if int(os.environ.get("RANK", "0")) == rank:
        build.build_model = send_signal_at(build.build_model, signal.SIGTERM, forward)


if __name__ == "__main__":
    torch.set_num_threads(1)  # two processes share the machine's cores
    if os.environ.get("SIGNAL_AT"):
        signal_at(*map(int, os.environ["SIGNAL_AT"].split(":")))
    result = train(config_from_args(build_parser().parse_args()))
    from accelerate import PartialState

    rank = PartialState().process_index
    torch.save(result.model.state_dict(), result.run_dir / f"rank{rank}.pt")
    sys.exit(exit_code_for(result.stopped_by))
