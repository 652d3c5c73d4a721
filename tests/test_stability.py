"""What makes a deep plain net train: the depth-shaped activation, the step bound, precise BN."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import timm_ortho  # noqa: F401  (registers the models)
from timm_ortho import OrthoModulated
from timm_ortho.precise_bn import bn_layers, recompute_bn_statistics
from timm_ortho.shaping import leaky_relu_cmap, network_c0, tat_leaky_relu_slope

# -- the depth-shaped activation -----------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(
    c=st.floats(-0.95, 0.95),
    alpha=st.floats(0.0, 1.0),
)
def test_cmap_matches_a_monte_carlo_estimate(c, alpha):
    """C_alpha(c) against the correlation of the normalized leaky ReLU measured on Gaussian pairs."""
    g = torch.Generator().manual_seed(0)
    n = 2_000_000
    x = torch.randn(n, generator=g, dtype=torch.float64)
    y = c * x + math.sqrt(1 - c * c) * torch.randn(n, generator=g, dtype=torch.float64)
    fx, fy = nn.functional.leaky_relu(x, alpha), nn.functional.leaky_relu(y, alpha)
    second_moment = (1 + alpha**2) / 2  # E[LReLU(x)^2] for x ~ N(0, 1)
    measured = float((fx * fy).mean()) / second_moment
    assert leaky_relu_cmap(c, alpha) == pytest.approx(measured, abs=4e-3)


def test_cmap_limits_linear_and_relu():
    for c in (-0.5, 0.0, 0.3, 0.9):
        assert leaky_relu_cmap(c, 1.0) == pytest.approx(c)
        # ReLU's normalized arc-cosine kernel: (sqrt(1 - c^2) + (pi - arccos c) c) / pi.
        relu = (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / math.pi
        assert leaky_relu_cmap(c, 0.0) == pytest.approx(relu)


@settings(max_examples=20, deadline=None)
@given(layers=st.integers(20, 2000), eta=st.floats(0.5, 0.95))
def test_tat_slope_meets_the_criterion(layers, eta):
    alpha = tat_leaky_relu_slope(layers, eta)
    if alpha == 0.0:  # too shallow to reach eta even with ReLU
        assert network_c0(0.0, layers) <= eta
    else:
        assert network_c0(alpha, layers) == pytest.approx(eta, abs=1e-9)
        assert 0.0 < alpha < 1.0


def test_tat_slope_grows_with_depth_and_models_use_it():
    slopes = [tat_leaky_relu_slope(n) for n in (19, 43, 109, 1201)]
    assert slopes == sorted(slopes)
    assert slopes[2] == pytest.approx(0.5856, abs=1e-3)
    model = timm.create_model("plain_cnn20", num_classes=3)
    acts = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 19 and all(a.negative_slope == slopes[0] for a in acts)
    relu = timm.create_model("plain_cnn20", num_classes=3, act_layer="relu")
    assert not any(isinstance(m, nn.LeakyReLU) for m in relu.modules())
    assert sum(isinstance(m, nn.ReLU) for m in relu.modules()) == 19
    twin = timm.create_model("cifar_resnet20", num_classes=3)
    assert not any(isinstance(m, nn.LeakyReLU) for m in twin.modules())  # twins keep He et al.'s ReLU
    gelu = timm.create_model("plain_cnn20", num_classes=3, act_layer="gelu")
    assert sum(type(m).__name__ == "GELU" for m in gelu.modules()) == 19  # timm's own GELU class


def test_bad_activation_and_slope_arguments_are_explained():
    with pytest.raises(ValueError, match="positive int"):
        tat_leaky_relu_slope(0)
    with pytest.raises(ValueError, match="eta"):
        tat_leaky_relu_slope(10, eta=1.0)
    with pytest.raises((ValueError, KeyError), match="act"):
        timm.create_model("plain_cnn20", act_layer="no_such_activation")


# -- the step bound ------------------------------------------------------------------------------


def small_net(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.LeakyReLU(0.5),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.LeakyReLU(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).to(dtype)


def loss_of(model, seed: int, dtype=torch.float64, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 6, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 5, (6,), generator=g)
    return nn.functional.cross_entropy(model(x), y) * scale


@settings(max_examples=15, deadline=None)
@given(ratio=st.floats(1e-4, 10.0), scale=st.floats(1e-2, 1e3), seed=st.integers(0, 10_000))
def test_step_bound_matches_a_naive_loop(ratio, scale, seed):
    """Each target gradient is min(1, ratio ||W|| / ||g||) * g, computed here layer by layer in float64."""
    model = small_net(seed % 7)
    opt = OrthoModulated(
        torch.optim.SGD(model.parameters(), lr=0.1), model, ortho_decay=1e-3, max_grad_ratio=ratio
    )
    loss_of(model, seed, scale=scale).backward()
    opt.apply_orthonormality()
    expected = {}
    for t in opt.targets:
        g, w = t.param.grad, t.param.detach()
        factor = min(1.0, ratio * float(w.norm()) / float(g.norm()))
        expected[t.name] = g * factor
    other = {n: p.grad.clone() for n, p in model.named_parameters() if p.ndim == 1}
    opt.bound_gradients()
    for t in opt.targets:
        torch.testing.assert_close(t.param.grad, expected[t.name], rtol=1e-6, atol=0)
        assert float(t.param.grad.norm()) <= ratio * float(t.param.detach().norm()) * (1 + 1e-6)
    for n, p in model.named_parameters():  # BN and bias gradients are not targets: untouched
        if p.ndim == 1:
            assert torch.equal(p.grad, other[n])


def test_step_bound_leaves_small_and_zero_gradients_bit_identical():
    model = small_net()
    opt = OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.1), model, max_grad_ratio=1e6)
    loss_of(model, 0).backward()
    opt.targets[0].param.grad.zero_()
    before = [t.param.grad.clone() for t in opt.targets]
    opt.bound_gradients()
    for t, g in zip(opt.targets, before, strict=True):
        assert torch.equal(t.param.grad, g)


def test_step_bound_under_a_grad_scaler_sees_unscaled_gradients():
    """A step under GradScaler (power-of-two scale: exact) equals the unscaled step bit for bit."""
    model = small_net(dtype=torch.float32)
    reference = copy.deepcopy(model)
    make = lambda m: OrthoModulated(torch.optim.SGD(m.parameters(), lr=0.1), m, max_grad_ratio=0.01)  # noqa: E731
    opt, ref_opt = make(model), make(reference)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(loss_of(model, 3, torch.float32)).backward()
    scaler.step(opt)
    loss_of(reference, 3, torch.float32).backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_step_bound_keeps_a_blown_up_start_finite():
    """ReLU plain_cnn44, lr 1.0: the first gradients explode toward the stem; the bound keeps it finite."""
    torch.manual_seed(0)
    model = timm.create_model("plain_cnn44", num_classes=4, act_layer="relu")
    opt = OrthoModulated(
        torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9), model, ortho_decay=1e-3, max_grad_ratio=0.1
    )
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for t in opt.targets:  # at most ratio * lr * sum of momentum factors relative growth per step
        assert float(t.param.detach().norm()) < 10 * math.sqrt(t.f_out)


def test_step_bound_validates_and_follows_the_group_field():
    model = small_net()
    for bad in (0, -1.0, float("inf"), float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="max_grad_ratio"):
            OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.1), model, max_grad_ratio=bad)
    opt = OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.1), model, max_grad_ratio=None)
    assert opt.param_groups[0]["max_grad_ratio"] is None
    opt.param_groups[0]["max_grad_ratio"] = 1e-3
    loss_of(model, 0).backward()
    opt.bound_gradients()
    for t in opt.targets:
        assert float(t.param.grad.norm()) <= 1e-3 * float(t.param.detach().norm()) * (1 + 1e-6)


@settings(max_examples=10, deadline=None)
@given(
    ratio=st.floats(1e-3, 1.0),
    beta=st.floats(0.05, 0.99),
    scales=st.lists(st.floats(1e-2, 1e2), min_size=2, max_size=5),
    seed=st.integers(0, 10_000),
)
def test_averaged_step_bound_matches_a_naive_loop(ratio, beta, scales, seed):
    """With ``bound_momentum=beta`` each target gradient is ``min(1, ratio ||W|| / ||a||) * g`` for the
    running average ``a <- beta a + (1 - beta) g`` (``a = g`` first), all in a float64 loop here, over
    steps whose losses are scaled differently (the average lags a change of scale, the raw bound not)."""
    model = small_net(seed % 7)
    opt = OrthoModulated(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        model,
        ortho_decay=1e-3,
        max_grad_ratio=ratio,
        bound_momentum=beta,
    )
    averages: dict[str, torch.Tensor] = {}
    for step, scale in enumerate(scales):
        opt.zero_grad()
        loss_of(model, seed + step, scale=scale).backward()
        opt.apply_orthonormality()
        expected = {}
        for t in opt.targets:
            g, w = t.param.grad.clone(), t.param.detach()
            a = averages.get(t.name)
            averages[t.name] = a = g if a is None else beta * a + (1 - beta) * g
            expected[t.name] = g * min(1.0, ratio * max(float(w.norm()), 1e-3) / float(a.norm()))
        opt.bound_gradients()
        for t in opt.targets:
            torch.testing.assert_close(t.param.grad, expected[t.name], rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(opt.bound_averages.averages[opt.targets.index(t)], averages[t.name])
        opt.base_optimizer.step()


def test_averaged_step_bound_survives_a_checkpoint_and_validates():
    """A run saved and restored mid-way continues bit for bit (the averages are in the state dict,
    only when used); a bad ``bound_momentum`` is refused with what it must be."""

    def run(model, opt, steps):
        for step in steps:
            opt.zero_grad()
            loss_of(model, step, torch.float32).backward()
            opt.step()

    def make(model):
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return OrthoModulated(base, model, max_grad_ratio=0.01, bound_momentum=0.9)

    straight = small_net(dtype=torch.float32)
    resumed = copy.deepcopy(straight)
    opt = make(straight)
    run(straight, opt, range(6))
    first = make(resumed)
    run(resumed, first, range(3))
    saved = copy.deepcopy({"model": resumed.state_dict(), "opt": first.state_dict()})
    assert len(saved["opt"]["bound_averages"]) == len(first.targets)
    resumed = small_net(dtype=torch.float32)
    resumed.load_state_dict(saved["model"])
    second = make(resumed)
    second.load_state_dict(saved["opt"])
    run(resumed, second, range(3, 6))
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert "running average" in opt.summary()

    plain = small_net(dtype=torch.float32)
    unaveraged = OrthoModulated(torch.optim.SGD(plain.parameters(), lr=0.1), plain, max_grad_ratio=0.01)
    run(plain, unaveraged, range(2))
    assert "bound_averages" not in unaveraged.state_dict()  # the base optimizer's own state dict
    with pytest.raises(ValueError, match="saved for another model"):
        unaveraged.load_state_dict({**unaveraged.state_dict(), "bound_averages": {99: torch.ones(1)}})
    with pytest.raises(ValueError, match="saved for another model"):  # an index in range, the wrong shape
        unaveraged.load_state_dict({**unaveraged.state_dict(), "bound_averages": {0: torch.ones(1)}})
    for bad in (0, 1.0, -0.5, float("nan"), "0.9", True):
        with pytest.raises(ValueError, match="bound_momentum"):
            OrthoModulated(torch.optim.SGD(plain.parameters(), lr=0.1), plain, bound_momentum=bad)


@settings(max_examples=10, deadline=None)
@given(
    ratio=st.floats(1e-3, 1.0),
    reference=st.floats(1e-3, 1.0),
    lrs=st.lists(st.floats(1e-4, 1.0), min_size=1, max_size=3),
    decoupled=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_step_bound_at_a_reference_lr_holds_the_step(ratio, reference, lrs, decoupled, seed):
    """With ``bound_reference_lr`` the gradient's bound is ``ratio * reference / lr`` at the group's
    current lr (a float64 loop here), so the step ``lr * g`` is held to ``reference * ratio * ||W||``;
    in the decoupled form the term's update is held to the same."""
    model = small_net(seed % 7)
    make = torch.optim.AdamW if decoupled else torch.optim.SGD
    base = make(model.parameters(), lr=lrs[0], weight_decay=0.0)
    opt = OrthoModulated(base, model, ortho_decay=1e-2, max_grad_ratio=ratio, bound_reference_lr=reference)
    for step, lr in enumerate(lrs):
        opt.param_groups[0]["lr"] = lr  # as a scheduler changes it
        opt.zero_grad()
        loss_of(model, seed + step).backward()
        weights = {t.name: t.param.detach().clone() for t in opt.targets}
        opt.apply_orthonormality()
        for t in opt.targets:
            moved = (t.param.detach() - weights[t.name]).norm()  # decoupled: the term's update
            assert float(moved) <= reference * ratio * float(weights[t.name].norm()) * (1 + 1e-6)
        expected = {}
        for t in opt.targets:
            g, w = t.param.grad, t.param.detach()
            expected[t.name] = g * min(1.0, ratio * reference / lr * float(w.norm()) / float(g.norm()))
        opt.bound_gradients()
        for t in opt.targets:
            torch.testing.assert_close(t.param.grad, expected[t.name], rtol=1e-6, atol=1e-12)
        opt.base_optimizer.step()
    opt.param_groups[0]["lr"] = 0.0  # no step: no bound (and no division by zero)
    loss_of(model, seed).backward()
    before = [t.param.grad.clone() for t in opt.targets]
    opt.bound_gradients()
    assert all(torch.equal(t.param.grad, g) for t, g in zip(opt.targets, before, strict=True))
    for bad in (0, -0.1, float("inf"), float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="bound_reference_lr"):
            OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.1), model, bound_reference_lr=bad)
    assert "on the step, as at lr" in opt.summary()


# -- precise BN ----------------------------------------------------------------------------------


def test_precise_bn_is_the_average_of_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Dropout(0.0), nn.BatchNorm2d(3))
    model.eval()
    weights = copy.deepcopy(model.state_dict())
    batches = [torch.randn(5, 2, 4, 4) * (i + 1) + i for i in range(4)]
    used = recompute_bn_statistics(model, iter(batches), num_batches=3)
    assert used == 3 and not model.training
    with torch.no_grad():
        outs = [model[0](b) for b in batches[:3]]
    mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert model[1].momentum == 0.1  # restored
    for k, v in model.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, weights[k])


def test_precise_bn_takes_pairs_and_a_prepare_function_and_refuses_nothing():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    pairs = [(torch.randn(4, 2, 3, 3), torch.zeros(4)) for _ in range(2)]
    assert recompute_bn_statistics(model, pairs, num_batches=10) == 2
    assert recompute_bn_statistics(model, [{"x": pairs[0][0]}], 1, prepare=lambda b: b["x"]) == 1
    before = model[1].running_mean.clone()
    with pytest.raises(ValueError, match="no batch"):
        recompute_bn_statistics(model, [], 5)
    assert torch.equal(model[1].running_mean, before)  # left as they were
    with pytest.raises(ValueError, match="num_batches"):
        recompute_bn_statistics(model, pairs, 0)
    with pytest.raises(TypeError, match="prepare"):
        recompute_bn_statistics(model, ["not a tensor"], 1)
    assert bn_layers(nn.Linear(2, 2)) == []


def test_precise_bn_gives_every_module_back_its_own_mode():
    """A model in training with one part held in eval (a frozen BN, a dropout switched off) comes
    back exactly so: each module's mode is restored, not the root's copied onto all of them."""
    model = nn.Sequential(
        nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Sequential(nn.Dropout(0.5), nn.BatchNorm2d(3))
    )
    model.train()
    model[2].eval()  # the submodule and its children
    modes = {name: m.training for name, m in model.named_modules()}
    assert modes["2.1"] is False and modes["1"] is True
    recompute_bn_statistics(model, [torch.randn(4, 2, 3, 3)], 1)
    assert {name: m.training for name, m in model.named_modules()} == modes
    model.eval()
    model[1].train()
    modes = {name: m.training for name, m in model.named_modules()}
    recompute_bn_statistics(model, [torch.randn(4, 2, 3, 3)], 1)
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_precise_bn_recovers_what_stale_statistics_hide():
    """A deep chain whose running statistics lag its weights evaluates far off the batch statistics;
    recomputed statistics bring eval-mode outputs back to train-mode ones on the same data."""
    torch.manual_seed(0)
    model = timm.create_model("plain_cnn20", num_classes=4)
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():  # change the weights after the statistics were taken
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(torch.empty(m.weight.shape[0], 1, 1, 1).uniform_(0.2, 3.0))
        model.train()
        target = model(x)
    model.eval()
    with torch.no_grad():
        stale = (model(x) - target).abs().mean()
    recompute_bn_statistics(model, [x], 1)
    with torch.no_grad():
        fresh = (model(x) - target).abs().mean()
    assert fresh < 0.05 * stale


def test_step_bound_on_half_precision_weights_does_not_overflow():
    """A float16 gradient whose norm exceeds float16's range is bounded, not zeroed by an inf norm."""
    model = nn.Sequential(nn.Linear(4000, 8, bias=False)).half()
    opt = OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.1), model, max_grad_ratio=0.5)
    w = model[0].weight
    w.grad = torch.full_like(w, 300.0)  # ||g|| = 300 * sqrt(32000) ~ 5.4e4 per 8 rows: near fp16's max
    w.grad[0] = 3000.0  # now beyond it
    opt.bound_gradients()
    assert torch.isfinite(w.grad).all() and w.grad.abs().max() > 0
    expected = 0.5 * float(w.detach().float().norm())
    assert float(w.grad.float().norm()) == pytest.approx(expected, rel=5e-3)  # float16 rounding


def test_step_bound_lets_a_zero_initialized_layer_start_moving():
    """||W|| = 0 would allow no step at all; the norm floor (1e-3) lets the layer leave zero."""
    model = small_net()
    with torch.no_grad():
        model[3].weight.zero_()
    opt = OrthoModulated(torch.optim.SGD(model.parameters(), lr=1.0), model, max_grad_ratio=0.1)
    loss_of(model, 0).backward()
    opt.step()
    moved = float(model[3].weight.detach().norm())
    assert 0 < moved <= 0.1 * 1e-3 * (1 + 1e-9)


@given(layers=st.integers(1, 5000))
def test_default_step_bound_shrinks_as_one_over_depth(layers):
    from timm_ortho.defaults import max_grad_ratio_for

    ratio = max_grad_ratio_for(layers)
    assert ratio == 1.0 / layers  # hand-derived: 1/L at every depth, no cap on shallow chains
    assert ratio * layers == pytest.approx(1.0)  # aligned per-layer steps move the chain by about 1
    assert max_grad_ratio_for(layers + 1) < ratio  # deeper, tighter


def test_auto_step_bound_follows_the_number_of_target_layers():
    shallow = small_net()
    opt = OrthoModulated(torch.optim.SGD(shallow.parameters(), lr=0.1), shallow)  # the default: "auto"
    assert opt.param_groups[0]["max_grad_ratio"] == 1 / len(opt.targets)
    deep = nn.Sequential(*(nn.Linear(4, 4) for _ in range(250)))
    opt = OrthoModulated(torch.optim.SGD(deep.parameters(), lr=0.1), deep, max_grad_ratio="auto")
    assert len(opt.targets) == 250
    assert all(g["max_grad_ratio"] == 1 / 250 for g in opt.param_groups)  # stored as a number
    assert opt.state_dict()["param_groups"][0]["max_grad_ratio"] == 1 / 250
    # "auto" is resolved when wrapping; a param group takes numbers only.
    opt.param_groups[0]["max_grad_ratio"] = "auto"
    deep(torch.randn(2, 4)).sum().backward()
    with pytest.raises(ValueError, match="param group 0: max_grad_ratio"):
        opt.step()
