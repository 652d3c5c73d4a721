"""The checks only a GPU can answer, as one short script (a few minutes on one GPU).

    python scripts/gpu_check.py            # needs CUDA
    python scripts/gpu_check.py --cpu      # the same flow on the CPU, as a smoke test (no timings)

1. No host-device synchronization: backward with the modulation hooks and ``OrthoModulated.step``
   (regularizer + SGD) run under ``torch.cuda.set_sync_debug_mode("error")``, in bf16 autocast.
   (``GradScaler.step`` synchronizes by design to decide whether to skip a step; it is left out.)
2. fp16 autocast + ``GradScaler``: a step with an injected overflow changes no parameter; a normal
   step keeps every parameter finite; the gradients the wrapper sees are unscaled.
3. bf16 and fp16 training of plain_cnn56 for a few dozen steps: the loss stays finite.
4. Throughput under bf16 autocast, as ratios against SGD + weight decay measured in the same run:
   ``OrthoModulated(SGD)`` and ``OrthoModulated(SGD, modulation=True)`` on plain_cnn56 (batch 128,
   32 px) and resnet50 (batch 64, 224 px, channels_last).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm_ortho


def make(name: str, device: torch.device, ortho: bool, modulation: bool, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).to(device)
    if not ortho:
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    base = torch.optim.SGD(timm_ortho.param_groups_for_ortho(model), lr=0.01, momentum=0.9)
    return model, timm_ortho.OrthoModulated(base, model, modulation=modulation)


def batch(n: int, size: int, classes: int, device: torch.device):
    return torch.randn(n, 3, size, size, device=device), torch.randint(0, classes, (n,), device=device)


def check_no_sync(device: torch.device) -> None:
    model, opt = make("plain_cnn56", device, ortho=True, modulation=True)
    x, y = batch(32, 32, 10, device)
    for _ in range(3):  # warm up: lazy index tensors, cuDNN plans
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            stats = opt.modulation.last_stats()  # tensors only: must not sync either
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    print(
        f"[1] no host-device sync in backward hooks and step: ok (bottom/top {stats.bottom_top_ratio():.3g})"
    )


def check_fp16_scaler(device: torch.device) -> None:
    model, opt = make("plain_cnn20", device, ortho=True, modulation=True)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**14)
    x, y = batch(16, 32, 10, device)
    with torch.autocast(device.type, dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    opt.targets[3].param.grad.view(-1)[0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    print(f"[2] fp16 + GradScaler: overflow step skipped: {unchanged}, ortho_step {opt.ortho_step}")
    assert unchanged and opt.ortho_step == 0


def check_training(device: torch.device, steps: int) -> None:
    for dtype in (torch.bfloat16, torch.float16):
        model, opt = make("plain_cnn56", device, ortho=True, modulation=True)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        losses = []
        for s in range(steps):
            x, y = batch(64, 32, 10, device)
            with torch.autocast(device.type, dtype=dtype):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.detach())
            del s
        finite = bool(torch.isfinite(torch.stack(losses)).all())
        print(f"[3] {dtype}: {steps} steps, finite loss {finite}, penalty {opt.penalty():.4g}")
        assert finite


def timed(model, opt, x, y, device, repeats: int) -> float:
    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_throughput(device: torch.device, repeats: int) -> None:
    cases = (("plain_cnn56", 128, 32, {}), ("resnet50", 64, 224, {}))
    for name, n, size, kwargs in cases:
        result = {}
        for label, ortho, mod in (
            ("sgd+wd", False, False),
            ("ortho", True, False),
            ("ortho+mod", True, True),
        ):
            model, opt = make(name, device, ortho, mod, **kwargs)
            if name == "resnet50":
                model = model.to(memory_format=torch.channels_last)
            x, y = batch(n, size, model.num_classes, device)
            if name == "resnet50":
                x = x.contiguous(memory_format=torch.channels_last)
            result[label] = timed(model, opt, x, y, device, repeats)
        print(
            f"[4] {name} batch {n}, {size}px, bf16: sgd+wd {result['sgd+wd'] * 1e3:.1f} ms, "
            f"ortho x{result['ortho'] / result['sgd+wd']:.3f}, "
            f"ortho+mod x{result['ortho+mod'] / result['sgd+wd']:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="run the flow on the CPU (smoke test, no timings)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --cpu for a smoke test of the flow")
    device = torch.device("cpu" if args.cpu else "cuda")
    print(
        f"torch {torch.__version__}, "
        f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
    )
    check_no_sync(device)
    check_fp16_scaler(device)
    check_training(device, 3 if args.cpu else args.steps)
    if not args.cpu:
        check_throughput(device, args.repeats)


if __name__ == "__main__":
    main()
