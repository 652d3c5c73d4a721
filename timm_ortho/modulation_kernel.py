"""The modulation rule and the rescaling of the error fused into one Triton kernel (CUDA, eager mode).

In eager mode every aten op of the per-layer rule (:func:`timm_ortho.modulation_rule.log_scale`,
:func:`~timm_ortho.modulation_rule.next_log_ref`) is a kernel launch on a 0-d tensor: about ten
launches per layer per backward, which dominate the hooks' cost on a GPU at CIFAR batch sizes. This
kernel does, in one launch, what the aten path does after the norm:

    log n  = log ||e||                        (- 0.5 log numel(e) for statistic="mean")
    x      = log_ref - log n
    log s  = softshrink(x, log A)  ("clamp")  or  hardshrink(x, log A)  ("match")
    log s  = 0 where it is +-inf or NaN;  clamped to +-log max_scale (optional)
    e'     = s * e                            (in float32, rounded to e's dtype, as aten)
    ref'   = where(finite(log_ref), log_ref, log n)            reference="top"
           = where(finite(log n + log s), log n + log s, log_ref)  reference="previous"

Every program of the grid evaluates the (scalar) rule from the norm and the reference in device
memory, rescales its block of the error, and program 0 stores ``(log n, log s, s, ref')``, which the
next layer's launch reads: no host-device synchronization, no branch on a value. Inside the band
``s = exp(0) = 1`` exactly, so the error is copied bit for bit.

The kernel runs where it applies (a CUDA error that is dense in memory, Triton importable); anywhere
else the hook uses the aten path. ``TRITON_INTERPRET=1`` runs it on CPU tensors (slowly), which is
how the tests compare it with the aten path on a machine without a GPU.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch
from torch import Tensor

__all__ = ["fused_modulate", "kernel_applies", "triton_available"]

_BLOCK = 1024
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (it ships with torch's CUDA wheels on Linux)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_applies(g: Tensor) -> bool:
    """The fused kernel can rescale ``g``: on CUDA (or under the interpreter), dense, and outside a
    differentiable backward (``create_graph=True`` keeps the aten path)."""
    if not (g.is_cuda or _INTERPRET) or not triton_available():
        return False
    if g.requires_grad:  # backward(create_graph=True): the product must stay differentiable (aten)
        return False
    dense = g.is_contiguous() or (g.dim() == 4 and g.is_contiguous(memory_format=torch.channels_last))
    # float32 math only (Triton passes the band's edge as a float32 scalar, as aten rounds it for
    # float32 tensors); int32 offsets.
    return dense and g.dtype in (torch.float16, torch.bfloat16, torch.float32) and g.numel() < 2**31


@functools.cache
def _kernel() -> Any:
    """The Triton kernel, compiled on first use (importing this module does not import Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def modulate(
        g_ptr,
        out_ptr,
        norm_ptr,
        ref_ptr,
        rec_ptr,
        numel,
        edge,
        log_max,
        log_numel_half,
        MATCH: tl.constexpr,
        HAS_MAX: tl.constexpr,
        PREVIOUS: tl.constexpr,
        MEAN: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        log_ref = tl.load(ref_ptr)
        log_n = tl.log(tl.load(norm_ptr))
        if MEAN:
            log_n = log_n - log_numel_half
        x = log_ref - log_n
        if MATCH:  # noqa: SIM108 (a compile-time branch of the kernel)
            log_s = tl.where(tl.abs(x) > edge, x, 0.0)
        else:
            log_s = x - tl.minimum(tl.maximum(x, -edge), edge)
        # +-inf or NaN (a zero, infinite or NaN norm or reference): s = 1; |NaN| < inf is False.
        log_s = tl.where(tl.abs(log_s) < float("inf"), log_s, 0.0)
        if HAS_MAX:
            log_s = tl.minimum(tl.maximum(log_s, -log_max), log_max)
        scale = tl.exp(log_s)
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        g = tl.load(g_ptr + offsets, mask=mask)
        tl.store(out_ptr + offsets, (g.to(scale.dtype) * scale).to(g.dtype), mask=mask)
        if tl.program_id(0) == 0:
            if PREVIOUS:
                after = log_n + log_s
                new_ref = tl.where(tl.abs(after) < float("inf"), after, log_ref)
            else:
                new_ref = tl.where(tl.abs(log_ref) < float("inf"), log_ref, log_n)
            tl.store(rec_ptr, log_n)
            tl.store(rec_ptr + 1, log_s)
            tl.store(rec_ptr + 2, scale)
            tl.store(rec_ptr + 3, new_ref)

    return modulate


def fused_modulate(
    g: Tensor,
    norm: Tensor,
    log_ref: Tensor,
    *,
    band: float,
    mode: str,
    max_scale: float | None,
    reference: str,
    statistic: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(s * g, log n, log s, s, next reference)`` in one launch; the 0-d results share one buffer.

    ``norm`` is ``||g||`` and ``log_ref`` the reference log-norm, both 0-d in the compute dtype on
    ``g``'s device, and ``g`` one that :func:`kernel_applies` to. The same values as the aten path,
    up to the last bits of ``log`` and ``exp`` (Triton's fast float32 versions); ``s = 1`` exactly
    in the band.
    """
    out = torch.empty_like(g)  # keeps g's memory format: element i of both buffers is the same element
    record = torch.empty(4, device=g.device, dtype=norm.dtype)
    numel = g.numel()
    edge = min(math.log(band), torch.finfo(norm.dtype).max)
    _kernel()[(-(-numel // _BLOCK),)](
        g,
        out,
        norm,
        log_ref,
        record,
        numel,
        edge,
        0.0 if max_scale is None else math.log(max_scale),
        0.5 * math.log(numel) if statistic == "mean" else 0.0,
        MATCH=mode == "match",
        HAS_MAX=max_scale is not None,
        PREVIOUS=reference == "previous",
        MEAN=statistic == "mean",
        BLOCK=_BLOCK,
    )
    log_n, log_s, scale, next_ref = record.unbind()  # views: no copy, no launch
    return out, log_n, log_s, scale, next_ref
