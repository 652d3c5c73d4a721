#!/usr/bin/env python
"""Train a timm model on ImageNet (or any ImageFolder tree) with orthonormality and modulation.

    accelerate launch scripts/train_imagenet.py --data-dir /data/imagenet --model plain_cnn44_imagenet
    accelerate launch scripts/train_imagenet.py --data-dir /data/imagenet --model resnet34 --baseline

Without ``--data-dir`` it trains on the embedded synthetic data set. All flags: ``--help``; the guide:
docs/training.md. The loop itself lives in :mod:`timm_ortho.train.loop`.
"""

import sys
from pathlib import Path

try:
    import timm_ortho  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timm_ortho.train.loop import main

if __name__ == "__main__":
    sys.exit(main(preset="imagenet"))
