"""The checks only a GPU can answer, as one short script (a few minutes on one GPU).

    python scripts/gpu_check.py            # needs CUDA
    python scripts/gpu_check.py --cpu      # the same flow on the CPU, as a smoke test (no timings)

1. No host-device synchronization: backward with the modulation hooks and ``OrthoModulated.step``
   (regularizer + SGD) run under ``torch.cuda.set_sync_debug_mode("error")``, in bf16 autocast.
   (``GradScaler.step`` synchronizes by design to decide whether to skip a step; it is left out.)
2. fp16 autocast + ``GradScaler``: a step with an injected overflow changes no parameter; a normal
   step keeps every parameter finite; the gradients the wrapper sees are unscaled.
3. bf16 and fp16 training of plain_cnn56 for a few dozen steps: the loss stays finite.
4. Throughput under bf16 autocast, as ratios against SGD + weight decay measured in the same run
   (median of interleaved steps): the orthonormality term alone, the modulation alone, both, and the
   library's defaults (with the step bound), on plain_cnn110 (batch 128, 32 px) and resnet50
   (batch 256, 224 px, channels_last); with ``--compiled`` also under ``torch.compile``.
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

# name -> (orthonormality term, modulation, step bound): every part alone and the library's defaults.
VARIANTS = {
    "sgd+wd": None,
    "term": dict(modulation=False, max_grad_ratio=None),
    "mod": dict(ortho_decay=0.0, modulation=True, max_grad_ratio=None),
    "term+mod": dict(modulation=True, max_grad_ratio=None),
    "defaults": {},
}


def make(name: str, device: torch.device, variant: str = "defaults", **kwargs):
    """The model and optimizer of one variant; ``"sgd+wd"`` is the baseline (SGD with L2)."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).to(device)
    options = VARIANTS[variant]
    if options is None:
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    # timm's "momentum": the same SGD (momentum 0.9, no Nesterov) as the baseline, without L2.
    return model, timm_ortho.create_optimizer(model, "momentum", lr=0.01, momentum=0.9, **options)


def batch(n: int, size: int, classes: int, device: torch.device):
    return torch.randn(n, 3, size, size, device=device), torch.randint(0, classes, (n,), device=device)


def check_no_sync(device: torch.device, variant: str = "term+mod") -> None:
    model, opt = make("plain_cnn56", device, variant)
    opt.param_groups[0]["max_grad_ratio"] = 0.1  # the step bound must not sync either
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
        f"[1] no host-device sync in backward hooks and step ({variant}): ok "
        f"(bottom/top {stats.bottom_top_ratio():.3g})"
    )


def check_fp16_scaler(device: torch.device) -> None:
    model, opt = make("plain_cnn20", device, "term+mod")
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
        model, opt = make("plain_cnn56", device, "defaults")
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


def train_step(model, opt, x, y, device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


THROUGHPUT_CASES = (("plain_cnn110", 128, 32), ("resnet50", 256, 224))


def check_throughput(
    device: torch.device, repeats: int, compiled: bool, deadline: float, cases=THROUGHPUT_CASES
) -> None:
    """Median step time of every variant, interleaved (one step of each in turn), as ratios vs SGD + wd."""
    variants = ("sgd+wd", "term", "term+mod") if compiled else tuple(VARIANTS)
    for name, n, size in cases:
        if time.perf_counter() > deadline:
            print(f"[4] {name} {'compiled' if compiled else 'eager'}: skipped (deadline)")
            continue
        runs = {}
        for v in variants:
            model, opt = make(name, device, v)
            if name == "resnet50":
                model = model.to(memory_format=torch.channels_last)
            if compiled:
                model = torch.compile(model)
            x, y = batch(n, size, 1000 if name == "resnet50" else 10, device)
            if name == "resnet50":
                x = x.contiguous(memory_format=torch.channels_last)
            compile_start = time.perf_counter()
            for _ in range(3):  # warm up (and compile)
                train_step(model, opt, x, y, device)
            torch.cuda.synchronize() if device.type == "cuda" else None
            runs[v] = (model, opt, x, y, [], time.perf_counter() - compile_start)
        for _ in range(repeats):
            for model, opt, x, y, times, _ in runs.values():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                train_step(model, opt, x, y, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        base = statistics.median(runs["sgd+wd"][4])
        ratios = ", ".join(
            f"{v} x{statistics.median(r[4]) / base:.3f}" for v, r in runs.items() if v != "sgd+wd"
        )
        warm = max(r[5] for r in runs.values())
        print(
            f"[4] {name} batch {n}, {size}px, bf16, {'compiled' if compiled else 'eager'}: "
            f"sgd+wd {base * 1e3:.1f} ms/step, {ratios} (median of {repeats} interleaved; "
            f"warm-up up to {warm:.0f} s)",
            flush=True,
        )
        del runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="run the flow on the CPU (smoke test, no timings)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compiled", action="store_true", help="also time torch.compile'd models")
    parser.add_argument(
        "--eager", action=argparse.BooleanOptionalAction, default=True, help="time eager models"
    )
    parser.add_argument("--checks", action=argparse.BooleanOptionalAction, default=True, help="checks 1-3")
    parser.add_argument("--deadline", type=float, default=480.0, help="seconds after which no timing starts")
    parser.add_argument(
        "--models",
        nargs="+",
        default=[name for name, _, _ in THROUGHPUT_CASES],
        choices=[name for name, _, _ in THROUGHPUT_CASES],
        help="which models to time",
    )
    args = parser.parse_args()
    cases = tuple(case for case in THROUGHPUT_CASES if case[0] in args.models)
    deadline = time.perf_counter() + args.deadline
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --cpu for a smoke test of the flow")
    device = torch.device("cpu" if args.cpu else "cuda")
    print(
        f"torch {torch.__version__}, "
        f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
    )
    if args.checks:
        check_no_sync(device)
        check_fp16_scaler(device)
        check_training(device, 3 if args.cpu else args.steps)
    if not args.cpu and args.eager:
        check_throughput(device, args.repeats, compiled=False, deadline=deadline, cases=cases)
    if not args.cpu and args.compiled:
        check_throughput(device, args.repeats, compiled=True, deadline=deadline, cases=cases)


if __name__ == "__main__":
    main()
