"""Whole-model initialization of the filter banks: orthonormal (the paper's) or MSRA (the baseline).

The paper keeps the constraint "both at initialization and in regularization": every target weight
(:func:`~timm_ortho.targets.find_targets`, the same layers the regularizer acts on) starts with
orthonormal filters, ``Wm Wm^T = I``, group-wise where ``f_out > f_in`` (the rule of
:func:`~timm_ortho.ortho.group_layout`). The baseline is He et al.'s Kaiming-normal init.

The registered models initialize themselves with :func:`init_weights_`; a training loop calls it on a
model from elsewhere (e.g. any timm model) to give it the method's init.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .defaults import DEFAULT_INIT, INIT_SCHEMES, InitScheme
from .ortho import orthonormal_
from .targets import FilterBank, find_targets

__all__ = ["check_init_scheme", "init_weights_"]

# Upper bound on the elements initialized by one batched QR call (float64: 32 MiB of Gaussian draws).
_ORTHO_CHUNK_NUMEL = 1 << 22


def check_init_scheme(scheme: str) -> None:
    """Raise a ``ValueError`` that names the choices unless ``scheme`` is one of :data:`INIT_SCHEMES`."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init {scheme!r}: choose one of {INIT_SCHEMES} (e.g. init='orthonormal')")


@torch.no_grad()
def init_weights_(
    model: nn.Module,
    scheme: InitScheme = DEFAULT_INIT,
    targets: Sequence[FilterBank] | None = None,
    *,
    zero_bias: bool = True,
) -> list[FilterBank]:
    """Initialize the filter banks of ``model`` in place; returns the banks it initialized.

    Args:
        model: the model; its targets are found with :func:`~timm_ortho.find_targets` defaults
            unless ``targets`` is given.
        scheme: ``"orthonormal"``: each conv group's filter matrix ``Wm`` (``f_out x f_in``) gets
            orthonormal rows, ``Wm Wm^T = I``, group-wise (``ceil(f_out / f_in)`` groups) where
            ``f_out > f_in``: a Haar draw, see :func:`~timm_ortho.orthonormal_`. ``"msra"``: convs get
            ``N(0, 2 / (out_channels * kh * kw))`` (Kaiming normal, fan-out, ReLU gain); a linear
            layer keeps PyTorch's default ``U(-1/sqrt(f_in), 1/sqrt(f_in))``, as in timm's ResNet.
        targets: the already-found banks (so that the model is walked once).
        zero_bias: also set the biases of the targets' modules to zero.

    Weights on the meta device hold no values and are skipped. Normalization layers are left as
    they are: their init belongs to the model.
    """
    check_init_scheme(scheme)
    banks = [t for t in (find_targets(model) if targets is None else targets) if not t.param.is_meta]
    if scheme == "orthonormal":
        _orthonormal_banks_(banks)
    for t in banks:
        if scheme == "msra":
            _msra_(t.module)
        bias = getattr(t.module, "bias", None)
        if zero_bias and isinstance(bias, torch.Tensor):
            nn.init.zeros_(bias)
    return banks


def _msra_(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        module.reset_parameters()
    else:
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def _orthonormal_banks_(banks: Sequence[FilterBank]) -> None:
    """:func:`orthonormal_` for many banks, one QR call per chunk of equal shapes.

    Banks of equal weight shape are stacked into one weight whose conv groups are the banks' conv
    groups side by side, so :func:`orthonormal_` draws an independent orthonormal filter bank per
    layer (per conv group, per fat-matrix group) in one batched QR. A deep chain has hundreds of
    equal layers, and one small QR per layer costs far more in call overhead than in arithmetic.
    """
    by_shape: dict[tuple[Any, ...], list[nn.Parameter]] = defaultdict(list)
    for t in banks:
        w = t.param
        by_shape[(tuple(w.shape), t.conv_groups, w.dtype, w.device)].append(w)
    for (shape, groups, dtype, device), same in by_shape.items():
        per_chunk = max(1, _ORTHO_CHUNK_NUMEL // same[0].numel())
        for start in range(0, len(same), per_chunk):
            chunk = same[start : start + per_chunk]
            stacked = torch.empty((len(chunk) * shape[0], *shape[1:]), dtype=dtype, device=device)
            orthonormal_(stacked, len(chunk) * groups)
            for w, drawn in zip(chunk, stacked.split(shape[0]), strict=True):
                w.copy_(drawn)
