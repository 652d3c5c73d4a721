"""Property tests of the regularizer's math against independent computations (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from timm_ortho.batched import BatchedOrthonormality
from timm_ortho.ortho import (
    gram_mean_abs_cosine,
    group_layout,
    mean_abs_cosine,
    orthonormal_,
    orthonormality_grad,
    orthonormality_penalty,
)
from timm_ortho.targets import find_targets

SETTINGS = settings(max_examples=40, deadline=None)
dims = st.integers(min_value=1, max_value=12)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def gaussian(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def naive_penalty(wm: torch.Tensor, decay: float) -> torch.Tensor:
    """The rule written out: a Python loop over balanced consecutive groups, no padding tricks."""
    f_out, f_in = wm.shape
    groups = math.ceil(f_out / f_in)
    total = wm.new_zeros(())
    for g in torch.tensor_split(wm, groups, dim=0):
        total = total + ((g @ g.T - torch.eye(g.shape[0], dtype=wm.dtype)) ** 2).sum()
    return 0.5 * decay * total


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(gaussian(n, n, seed=seed))
    return q


@SETTINGS
@given(f_out=dims, f_in=dims, seed=seeds, decay=st.floats(0.0, 10.0))
def test_penalty_is_non_negative_and_matches_the_naive_group_loop(f_out, f_in, seed, decay):
    wm = gaussian(f_out, f_in, seed=seed)
    penalty = orthonormality_penalty(wm, decay)
    assert penalty >= -1e-12
    torch.testing.assert_close(penalty, naive_penalty(wm, decay), rtol=1e-10, atol=1e-10)


@SETTINGS
@given(f_out=dims, f_in=dims, seed=seeds, decay=st.floats(0.01, 10.0), scale=st.floats(0.1, 3.0))
def test_closed_form_gradient_equals_autograd(f_out, f_in, seed, decay, scale):
    wm = gaussian(f_out, f_in, seed=seed, scale=scale).requires_grad_()
    (expected,) = torch.autograd.grad(naive_penalty(wm, decay), wm)
    torch.testing.assert_close(orthonormality_grad(wm.detach(), decay), expected, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(
    out_per_group=st.integers(1, 6),
    in_per_group=st.integers(1, 4),
    conv_groups=st.integers(1, 3),
    kernel=st.sampled_from([(1, 1), (3, 3), (1, 3)]),
    seed=seeds,
)
def test_conv_weights_closed_form_equals_autograd_per_conv_group(
    out_per_group, in_per_group, conv_groups, kernel, seed
):
    conv = torch.nn.Conv2d(
        in_per_group * conv_groups, out_per_group * conv_groups, kernel, groups=conv_groups, bias=False
    ).double()
    with torch.no_grad():
        conv.weight.copy_(gaussian(*conv.weight.shape, seed=seed))
    (bank,) = find_targets(torch.nn.Sequential(conv), include_depthwise=True)
    assert (bank.conv_groups, bank.f_out, bank.f_in) == (
        conv_groups,
        out_per_group,
        in_per_group * kernel[0] * kernel[1],
    )
    # Independent: each conv group's filters are rows of the flattened weight slice.
    rows = conv.weight.reshape(conv_groups, out_per_group, -1)
    loss = sum(naive_penalty(rows[c], 0.7) for c in range(conv_groups))
    (expected,) = torch.autograd.grad(loss, conv.weight)
    got = orthonormality_grad(bank.matrix().detach(), 0.7).reshape(conv.weight.shape)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(orthonormality_penalty(bank.matrix().detach(), 0.7).sum(), loss.detach())


@SETTINGS
@given(f_out=dims, f_in=dims, seed=seeds)
def test_orthonormal_init_gives_orthonormal_rows_per_group(f_out, f_in, seed):
    weight = torch.empty(f_out, f_in, dtype=torch.float64)
    orthonormal_(weight, generator=torch.Generator().manual_seed(seed))
    assert orthonormality_penalty(weight) < 1e-20
    assert orthonormality_grad(weight).abs().max() < 1e-12
    for g in torch.tensor_split(weight, group_layout(f_out, f_in).groups):
        torch.testing.assert_close(g @ g.T, torch.eye(g.shape[0], dtype=torch.float64))


def test_orthonormal_init_of_grouped_conv_and_low_precision():
    conv = torch.nn.Conv2d(8, 12, 3, groups=4)
    orthonormal_(conv.weight, conv_groups=4)
    rows = conv.weight.detach().reshape(4, 3, 18)
    torch.testing.assert_close(rows @ rows.transpose(1, 2), torch.eye(3).expand(4, 3, 3), atol=1e-6, rtol=0)
    half = torch.empty(6, 20, dtype=torch.bfloat16)
    orthonormal_(half)
    assert orthonormality_penalty(half) < 1e-3
    assert orthonormality_penalty(half).dtype == torch.float32
    with pytest.raises(ValueError, match="conv groups"):
        orthonormal_(torch.empty(5, 3), conv_groups=2)


@SETTINGS
@given(f_out=dims, extra=st.integers(0, 6), seed=seeds, seed2=seeds, seed3=seeds)
def test_penalty_is_invariant_under_orthogonal_maps_on_both_sides(f_out, extra, seed, seed2, seed3):
    f_in = f_out + extra  # thin or square: one group, so Q1 may mix all filters
    wm = gaussian(f_out, f_in, seed=seed)
    q1, q2 = random_orthogonal(f_out, seed2), random_orthogonal(f_in, seed3)
    torch.testing.assert_close(orthonormality_penalty(q1 @ wm @ q2), orthonormality_penalty(wm))


@SETTINGS
@given(f_in=dims, groups=st.integers(2, 4), short=st.integers(0, 11), seed=seeds)
def test_grouped_penalty_is_the_sum_over_its_groups(f_in, groups, short, seed):
    f_out = max(groups * f_in - short, (groups - 1) * f_in + 1)  # exactly `groups` groups
    wm = gaussian(f_out, f_in, seed=seed)
    layout = group_layout(f_out, f_in)
    assert layout.groups == groups
    parts = torch.tensor_split(wm, groups)
    assert max(p.shape[0] for p in parts) <= f_in
    expected = sum(orthonormality_penalty(p) for p in parts)
    torch.testing.assert_close(orthonormality_penalty(wm), expected)


@settings(max_examples=15, deadline=None)
@given(f_out=st.integers(1, 8), extra=st.integers(0, 8), seed=seeds)
def test_gradient_descent_on_the_penalty_reaches_orthonormal_rows(f_out, extra, seed):
    wm = gaussian(f_out, f_out + extra, seed=seed)
    wm = wm / wm.norm(dim=1, keepdim=True)  # start in the basin: unit rows, generic directions
    for _ in range(3000):
        wm = wm - 0.05 * orthonormality_grad(wm)
    gram = wm @ wm.T
    torch.testing.assert_close(gram, torch.eye(f_out, dtype=torch.float64), atol=1e-6, rtol=0)


def test_group_layout_is_balanced_and_round_trips():
    for f_out in range(1, 40):
        for f_in in range(1, 12):
            layout = group_layout(f_out, f_in)
            assert layout.groups == math.ceil(f_out / f_in)
            assert layout.size <= f_in
            if layout.gather is not None:
                assert [layout.gather[i] for i in layout.scatter] == list(range(f_out))
    with pytest.raises(ValueError):
        group_layout(0, 3)


@SETTINGS
@given(seed=seeds)
def test_batched_engine_equals_per_layer_closed_form(seed):
    torch.manual_seed(seed % 1000)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3),  # thin: 16 filters of 27 inputs
        torch.nn.Conv2d(16, 16, 3),
        torch.nn.Conv2d(16, 16, 3),  # same shape as the previous: shares a bucket
        torch.nn.Conv2d(16, 8, 1, groups=2),
        torch.nn.Conv2d(8, 20, 1),  # fat: 20 filters of 8 inputs -> 3 padded groups
        torch.nn.Linear(20, 45),  # fat: 45 of 20 -> 3 groups of 15
    ).double()
    banks = find_targets(model)
    engine = BatchedOrthonormality(banks)
    products = engine.residual_products()
    for i, bank in enumerate(banks):
        expected = orthonormality_grad(bank.matrix().detach(), 0.5).reshape(bank.param.shape)
        torch.testing.assert_close(products[i], expected, rtol=1e-10, atol=1e-12)
    squared = engine.squared_residuals()
    for i, bank in enumerate(banks):
        expected = 2 * orthonormality_penalty(bank.matrix().detach()).sum()
        torch.testing.assert_close(squared[i].double(), expected, rtol=1e-6, atol=1e-6)
    partial = engine.residual_products([1, 4])
    assert sorted(partial) == [1, 4]
    torch.testing.assert_close(partial[4], products[4])
    scaled = engine.residual_products([1, 2, 5], [3.0, -0.5, 2.0], reuse_buffers=True)
    for i, c in zip([1, 2, 5], [3.0, -0.5, 2.0], strict=True):
        torch.testing.assert_close(scaled[i], c * products[i], rtol=1e-10, atol=1e-12)
    uniform = engine.residual_products([1, 2], [0.25, 0.25])
    torch.testing.assert_close(uniform[2], 0.25 * products[2], rtol=1e-10, atol=1e-12)
    # Weights in channels_last memory (a user's model.to(memory_format=...)) give the same products.
    model.to(memory_format=torch.channels_last)
    assert not banks[1].param.is_contiguous()
    strided = BatchedOrthonormality(banks).residual_products(reuse_buffers=True)
    for i in range(len(banks)):
        torch.testing.assert_close(strided[i], products[i], rtol=1e-10, atol=1e-12)


def test_mean_abs_cosine_against_a_pairwise_loop():
    wm = gaussian(5, 7, seed=3)
    pairs = [
        abs(torch.nn.functional.cosine_similarity(wm[i], wm[j], dim=0))
        for i in range(5)
        for j in range(5)
        if i != j
    ]
    torch.testing.assert_close(mean_abs_cosine(wm), torch.stack(pairs).mean())
    orth = torch.empty(4, 9, dtype=torch.float64)
    orthonormal_(orth)
    assert mean_abs_cosine(orth) < 1e-12
    assert mean_abs_cosine(wm[:1]) == 0
    # from the Gram matrix instead: the same up to rounding, zero filters included
    with_zero = torch.cat([wm, torch.zeros(1, 7, dtype=wm.dtype)])
    for w in (wm, with_zero, wm[:1]):
        torch.testing.assert_close(gram_mean_abs_cosine(w @ w.T), mean_abs_cosine(w))
