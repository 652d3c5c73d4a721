"""Run by tests/test_training.py under ``accelerate launch --num_processes 2``: train, then save this
rank's final weights as ``<run>/rank<i>.pt`` so that the test can compare the ranks."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timm_ortho.train.config import build_parser, config_from_args
from timm_ortho.train.loop import train

if __name__ == "__main__":
    torch.set_num_threads(1)  # two processes share the machine's cores
    result = train(config_from_args(build_parser().parse_args()))
    from accelerate import PartialState

    rank = PartialState().process_index
    torch.save(result.model.state_dict(), result.run_dir / f"rank{rank}.pt")
