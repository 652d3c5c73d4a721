"""A one-minute look at the regularizer: wrap SGD around a timm model and watch the penalty fall.

    python scripts/demo.py --model resnet18 --steps 30

The model starts from timm's own (non-orthonormal) init and trains on random 32x32 images; the
orthonormality penalty R = lambda/2 * sum ||W W^T - I||_F^2 drops while the loss is optimized.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm_ortho


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--ortho-decay", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10)
    # timm's "momentum" optimizer is SGD with momentum 0.9 (no Nesterov), wrapped in OrthoModulated.
    opt = timm_ortho.create_optimizer(
        model, "momentum", lr=args.lr, momentum=0.9, ortho_decay=args.ortho_decay
    )
    print(f"{args.model}: {len(opt.targets)} weights regularized, form={opt.form}")
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    for step in range(args.steps + 1):
        loss = nn.functional.cross_entropy(model(x), y)
        if step % 5 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}  penalty {opt.penalty().item():.4f}")
        opt.zero_grad()
        loss.backward()
        opt.step()


if __name__ == "__main__":
    main()
