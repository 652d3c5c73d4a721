"""Cost of the method per training iteration, as ratios against baselines measured in the same run.

    python scripts/bench_step.py              # all sections (several minutes on a 2-core CPU)
    python scripts/bench_step.py --quick      # fewer repetitions, smaller batches: a smoke run

Sections:
  1. regularizer vs floor: ``OrthoModulated.apply_orthonormality`` on timm resnet50's weights against
     the same Gram products done as one pre-stacked float32 ``baddbmm`` + ``bmm`` per weight shape.
  2. full iteration (forward, backward, step) on plain_cnn56 at batch 64, 32 px: the term alone,
     with the step bound, with the modulation, the modulation alone (on SGD + weight decay) and the
     defaults (``OrthoModulated(SGD(model.parameters(), ...), model)``, which on this plain chain is
     term + bound + modulation), each as a ratio to plain SGD with weight decay measured in the same
     run. Targets: term <= 1.03, defaults <= 1.05.
  3. the regularizer's share of a resnet50 iteration at batch 8, 64 and 256, from the measured
     regularizer time and the measured per-image cost of forward + backward.
  4. the same variants as in 2 on resnet50.
  5. where the modulation's cost goes on plain_cnn56: its Python per layer (forward, and forward +
     backward) at batch 2 and 8 px, where the ops themselves cost nothing, and the backward at
     batch 64, 32 px without the modulation, with it, and with it but the norm of each error
     replaced by a constant (what the norms and the rescales cost).

Every timing is the median of interleaved repetitions (A, B, A, B, ...), so that load from other
processes hits both sides alike. Nothing here is asserted: read the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm_ortho
from timm_ortho.batched import BatchedOrthonormality
from timm_ortho.defaults import max_grad_ratio_for
from timm_ortho.modulation import ErrorModulation
from timm_ortho.targets import find_targets


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, run in alternation."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def regularizer_flops(opt: timm_ortho.OrthoModulated) -> float:
    """Multiply-adds x2 of the two products per group: 2*s*s*d (Gram) + 2*s*s*d (times W)."""
    total = 0.0
    for entry in opt._batched.entries:
        total += entry.blocks * 4.0 * entry.layout.size**2 * entry.bank.f_in
    return total


def make_floor(opt: timm_ortho.OrthoModulated) -> Callable[[], None]:
    """Pre-stacked weights and preallocated outputs per group shape: the least work that computes
    the same products (no stacking, no scatter back, no accumulation into the gradients)."""
    engine: BatchedOrthonormality = opt._batched
    stacks = []
    for _key, members in engine.buckets:
        w = torch.cat([engine._blocks(i) for i in members]).float().contiguous()
        b, s, _ = w.shape
        stacks.append((w, torch.eye(s), torch.empty(b, s, s), torch.empty_like(w)))

    def floor() -> None:
        for w, eye, r, u in stacks:
            torch.baddbmm(eye, w, w.transpose(1, 2), beta=-1.0, out=r)
            torch.bmm(r, w, out=u)

    return floor


def with_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3


def section_regularizer(repeats: int) -> float:
    model = timm.create_model("resnet50")
    opt = timm_ortho.create_optimizer(model, "momentum", lr=0.1, momentum=0.0)  # only the term is timed
    with_grads(model)
    flops = regularizer_flops(opt)
    t = interleaved({"ours": opt.apply_orthonormality, "floor": make_floor(opt)}, repeats)
    print("\n[1] regularizer on resnet50's weights vs its floor")
    shapes, ratio = len(opt._batched.buckets), t["ours"] / t["floor"]
    print(f"    {len(opt.targets)} weights in {shapes} group shapes, {flops / 1e9:.1f} GFLOP/step")
    print(f"    ours {t['ours'] * 1e3:.1f} ms, floor {t['floor'] * 1e3:.1f} ms, ratio {ratio:.3f}")
    print(f"    ({flops / t['floor'] / 1e9:.0f} GFLOP/s at the floor)")
    return t["ours"]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    def run() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return run


VARIANTS = ("sgd+wd", "mod", "term", "term+bound", "term+mod", "defaults", "defaults+avg")
LABELS = {
    "sgd+wd": "SGD + weight decay (baseline)",
    "mod": "modulation + SGD + wd",
    "term": "term (no step bound)",
    "term+bound": "term + step bound",
    "term+mod": "term + modulation",
    "defaults": "defaults (auto: on a plain chain term + bound + modulation)",
    "defaults+avg": "defaults, bound_momentum=0.9",
}
# CPU, plain_cnn56, batch 64, 32 px (issue targets): the term alone and the default wrapper.
TARGETS = {"term": 1.03, "defaults": 1.05}


def variants(name: str, batch: int, size: int, **kwargs) -> dict[str, Callable[[], None]]:
    """Identical models and data: SGD + weight decay, the same with the modulation hooks, the
    orthonormality term (``OrthoModulated(SGD)``, no L2 on its weights) without and with the step
    bound, and term + modulation without and with it."""
    torch.manual_seed(0)
    reference = timm.create_model(name, **kwargs)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, reference.num_classes, (batch,))
    steps = {}
    for label in VARIANTS:
        model = timm.create_model(name, **kwargs)
        model.load_state_dict(reference.state_dict())
        if label in ("sgd+wd", "mod"):
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
            if label == "mod":
                ErrorModulation(model)  # hooks stay on this model for the whole run
        elif label.startswith("defaults"):  # exactly what a user types
            base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            options = dict(bound_momentum=0.9) if label == "defaults+avg" else {}
            opt = timm_ortho.OrthoModulated(base, model, **options)
        else:
            # timm's "momentum": the baseline's SGD (momentum 0.9, no Nesterov), without L2.
            opt = timm_ortho.create_optimizer(
                model,
                "momentum",
                lr=0.01,
                momentum=0.9,
                modulation="mod" in label,
                max_grad_ratio=max_grad_ratio_for(len(find_targets(model))) if "bound" in label else None,
            )
        steps[label] = train_step(model, opt, x, y)
    return steps


def report(t: dict[str, float], indent: str = "    ") -> None:
    """Every variant as a ratio to the baseline measured in the same run (medians)."""
    base = t["sgd+wd"]
    for label in VARIANTS:
        line = f"{indent}{LABELS[label]:32s} {t[label] * 1e3:8.1f} ms   {t[label] / base:6.3f}x"
        if label in TARGETS:
            line += f"   (target <= {TARGETS[label]:.2f}x)"
        print(line)
    print(f"{indent}modulation on top of the term: {t['term+mod'] / t['term']:.3f}x")


def section_iteration(repeats: int, batch: int, depth_model: str) -> None:
    t = interleaved(variants(depth_model, batch, 32), repeats)
    print(
        f"\n[2] full iteration, {depth_model}, batch {batch}, 32 px: ratios to SGD + weight decay "
        f"(median of {repeats} interleaved repetitions)"
    )
    report(t)


def section_share(repeats: int, reg_seconds: float, image_size: int, probe_batch: int) -> None:
    model = timm.create_model("resnet50")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    per_batch = {}
    for b in (probe_batch, 2 * probe_batch):
        x, y = torch.randn(b, 3, image_size, image_size), torch.randint(0, 1000, (b,))
        per_batch[b] = interleaved({"it": train_step(model, opt, x, y)}, repeats)["it"]
    # t(B) = fixed + B * per_image, from two batch sizes.
    per_image = (per_batch[2 * probe_batch] - per_batch[probe_batch]) / probe_batch
    fixed = max(per_batch[probe_batch] - probe_batch * per_image, 0.0)
    print(f"\n[3] regularizer share of a resnet50 iteration at {image_size} px")
    print(
        f"    measured: iteration at batch {probe_batch} {per_batch[probe_batch]:.2f} s, "
        f"at {2 * probe_batch} {per_batch[2 * probe_batch]:.2f} s -> {per_image * 1e3:.0f} ms/image "
        f"+ {fixed * 1e3:.0f} ms fixed; regularizer {reg_seconds * 1e3:.0f} ms/step"
    )
    print(f"    regularizer = {reg_seconds / per_image:.1f} images of forward+backward")
    for b in (8, 64, 256):
        total = fixed + b * per_image + reg_seconds
        print(f"    batch {b:3d}: share {reg_seconds / total:6.2%}  (= {reg_seconds:.3f} / {total:.2f} s)")


def section_resnet(repeats: int, batch: int, size: int) -> None:
    n = max(3, repeats // 3)
    t = interleaved(variants("resnet50", batch, size), n)
    print(
        f"\n[4] full iteration, resnet50, batch {batch}, {size} px: ratios to SGD + weight decay "
        f"(median of {n} interleaved repetitions)"
    )
    report(t)


def section_modulation_parts(repeats: int) -> None:
    import timm_ortho.modulation_function as function

    model = timm.create_model("plain_cnn56")
    layers = len(find_targets(model)) - 1  # the classifier is not modulated
    print(f"\n[5] where the modulation's cost goes, plain_cnn56 ({layers} modulated layers)")
    small = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    full = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))

    def forward(x, y) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    def backward_seconds(x, y) -> float:
        loss = forward(x, y)
        start = time.perf_counter()
        loss.backward()
        return time.perf_counter() - start

    small_steps = {"forward": lambda: forward(*small), "step": lambda: forward(*small).backward()}
    bare = interleaved(small_steps, 20 * repeats)
    with ErrorModulation(model):
        hooked = interleaved(small_steps, 20 * repeats)
    per_layer = [(hooked[k] - bare[k]) / layers * 1e6 for k in small_steps]
    print(
        f"    Python per layer (batch 2, 8 px): forward {per_layer[0]:.0f} us, "
        f"forward + backward {per_layer[1]:.0f} us"
    )
    norm = function._host_norm
    times: dict[str, list[float]] = {"off": [], "on": [], "on, norm replaced by 1": []}
    for _ in range(repeats):  # alternating, so that load from other processes hits all alike
        times["off"].append(backward_seconds(*full))
        with ErrorModulation(model):
            times["on"].append(backward_seconds(*full))
            function._host_norm = lambda g, dtype: 1.0  # every layer "equal": no norm, no rescale
            try:
                times["on, norm replaced by 1"].append(backward_seconds(*full))
            finally:
                function._host_norm = norm
    for label, values in times.items():
        print(
            f"    backward at batch 64, 32 px, modulation {label:24s} "
            f"{statistics.median(values) * 1e3:7.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few repetitions and small batches")
    parser.add_argument("--sections", default="12345", help="which sections to run, e.g. 12")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per variant (default 9)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 9)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    plain = "plain_cnn56" if "plain_cnn56" in timm.list_models("plain_cnn*") else "resnet18"
    reg_seconds = None
    if "1" in args.sections or "3" in args.sections:
        reg_seconds = section_regularizer(repeats)
    if "2" in args.sections:
        section_iteration(repeats, 16 if args.quick else 64, plain)
    if "3" in args.sections:
        section_share(
            max(3, repeats // 3), reg_seconds, 224 if not args.quick else 64, 4 if args.quick else 8
        )
    if "4" in args.sections:
        section_resnet(repeats, 4 if args.quick else 32, 64 if args.quick else 224)
    if "5" in args.sections:
        section_modulation_parts(repeats)


if __name__ == "__main__":
    main()
