#!/usr/bin/env python
"""The paper's CIFAR-10 protocol: plain and residual 44/110-layer nets, method vs baseline.

Defaults (He et al.'s schedule, which the paper follows): batch 128, SGD momentum 0.9, lr 0.1
divided by 10 at 32k and 48k updates, 64k updates, no data augmentation (``--augment cifar`` switches on
pad-4 crop + flip).

    accelerate launch scripts/train_cifar.py --data-dir ~/data/cifar-10-batches-py --model plain_cnn44
    accelerate launch scripts/train_cifar.py --data-dir ~/data --model plain_cnn44 --baseline
    accelerate launch scripts/train_cifar.py --data-dir ~/data --model cifar_resnet110 --modulation

Without ``--data-dir`` it trains on the embedded synthetic set at 32x32. All flags: ``--help``.
"""

import sys
from pathlib import Path

try:
    import timm_ortho  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timm_ortho.train.loop import main

if __name__ == "__main__":
    sys.exit(main(preset="cifar"))
