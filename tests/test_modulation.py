"""Backward error modulation: the rule's math, the hooks, and their effect on real models.

Independent computations: gradients of the same model without hooks (float64), a loop over
moments written here, and the identity "backward is linear in the error" (a weight gradient with
modulation = the unmodulated one times the product of the scale factors at and above its layer).

Run as a script (``python tests/test_modulation.py``) to print the 44-layer measurement reported in
docs/modulation.md.
"""

from __future__ import annotations

import collections
import math
import os
import tempfile
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import timm_ortho
from timm_ortho import modulation_function
from timm_ortho.modulation import ErrorModulation, ModulationStats, scale_factor, simulate_chain
from timm_ortho.train.plots import plot_error_moments, plot_ratio_history

SETTINGS = settings(max_examples=60, deadline=None)


# -- models built here (no dependency on the registered plain nets) -----------------------------


class Chain(nn.Module):
    """Plain Conv-BN-ReLU chain, pooled, with a Linear classifier; optionally checkpointed."""

    def __init__(self, depth: int, width: int = 8, classes: int = 5, spread: float = 0.0) -> None:
        super().__init__()
        blocks = []
        cin = 3
        for _ in range(depth):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
                )
            )
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(width, classes)
        self.checkpoint: bool | None = None  # None: off; else use_reentrant
        if spread:
            # Random BN gains in [e^-spread, e^spread] make consecutive error moments mismatch.
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    with torch.no_grad():
                        m.weight.copy_(torch.empty_like(m.weight).uniform_(-spread, spread).exp())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint is None:
            x = self.blocks(x)
        else:
            # The stem runs normally (a reentrant checkpoint needs an input that requires grad);
            # the rest, the top of the chain included, in checkpointed segments of 3 blocks.
            x = self.blocks[0](x)
            for i in range(1, len(self.blocks), 3):
                x = checkpoint(self.blocks[i : i + 3], x, use_reentrant=self.checkpoint)
        return self.fc(x.mean((2, 3)))


def plain44(n: int = 7, widths: tuple[int, ...] = (16, 32, 64), classes: int = 10) -> nn.Sequential:
    """The CIFAR 6n+2 plain net (n=7: 43 convs + FC), MSRA (He) init, no shortcuts."""
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1, bias=False)]
    layers += [nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    cin = widths[0]
    for stage, w in enumerate(widths):
        for b in range(2 * n):
            stride = 2 if stage > 0 and b == 0 else 1
            layers += [nn.Conv2d(cin, w, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(w)]
            layers += [nn.ReLU(inplace=True)]
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


def make_chain(depth: int = 10, *, seed: int = 0, dtype: torch.dtype = torch.float64, spread: float = 1.5):
    torch.manual_seed(seed)
    model = Chain(depth, spread=spread).to(dtype)
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    y = torch.randint(0, 5, (4,))
    return model, x, y


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float = 1.0) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y) * c


def grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float = 1.0) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_of(model, x, y, c).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_rel(got: torch.Tensor, want: torch.Tensor, tol: float, floor: float = 1e-14) -> None:
    """``||got - want|| <= tol * ||want|| + floor`` (a conv bias before BN has a ~1e-17 gradient)."""
    err, size = torch.linalg.vector_norm(got - want), torch.linalg.vector_norm(want)
    assert err <= tol * size + floor, (float(err), float(size))


def assert_close(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float, atol: float = 0.0
) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


# -- the identity: weight gradient = unmodulated gradient x product of the scales above ------------


@pytest.mark.parametrize(
    "options",
    [
        {"band": 1.3},
        {"band": 1.3, "mode": "match"},
        {"band": 1.1, "statistic": "mean", "max_scale": 1.5},
        {"band": 1.5, "reference": "top"},
    ],
)
def test_grad_is_unmodulated_times_cumulative_scale(options: dict) -> None:
    model, x, y = make_chain(10)
    plain = grads(model, x, y)
    with ErrorModulation(model, **options) as em:
        mod = grads(model, x, y)
        stats = em.last_stats()
    assert stats.names == [f"blocks.{i}.0" for i in reversed(range(10))]  # top first
    assert stats.scale.dtype == torch.float64 and stats.scale.shape == (10,)
    assert stats.scale[0] == 1  # the top only sets the reference
    assert (stats.scale != 1).sum() >= 2, "the test must exercise the rule"
    cumulative = torch.cumprod(stats.scale, 0)  # independent of ModulationStats.cumulative_scale
    factor = {name: cumulative[i] for i, name in enumerate(stats.names)}
    for i in range(10):
        conv = f"blocks.{i}.0"
        for p in ("weight", "bias"):
            assert_rel(mod[f"{conv}.{p}"], plain[f"{conv}.{p}"] * factor[conv], 1e-12)
        # BN i sits between conv i and conv i+1: it gets the factors of the layers above conv i.
        above = factor.get(f"blocks.{i + 1}.0", torch.ones((), dtype=torch.float64))
        for p in ("weight", "bias"):
            assert_rel(mod[f"blocks.{i}.1.{p}"], plain[f"blocks.{i}.1.{p}"] * above, 1e-12)
    for p in ("fc.weight", "fc.bias"):
        assert torch.equal(mod[p], plain[p])  # above the chain
    torch.testing.assert_close(stats.cumulative_scale(), cumulative)


def test_stats_views_are_consistent() -> None:
    model, x, y = make_chain(10)
    with ErrorModulation(model, measure_only=True) as em:
        grads(model, x, y)
        base = em.last_stats()
    with ErrorModulation(model, band=1.3) as em:
        grads(model, x, y)
        stats = em.last_stats()
    assert not base.modulated and torch.equal(base.scale, torch.ones(10, dtype=torch.float64))
    assert torch.equal(base.q_before, base.q_after)
    torch.testing.assert_close(stats.unmodulated(), base.q_before, rtol=1e-10, atol=0)
    torch.testing.assert_close(stats.q_after, stats.q_before * stats.scale**2, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        stats.bottom_top_ratio("unmodulated"), base.bottom_top_ratio(), rtol=1e-10, atol=0
    )
    assert stats.bottom_top_ratio().shape == ()
    torch.testing.assert_close(stats.bottom_top_ratio(), stats.q_after[-1] / stats.q_after[0])
    # The moments against a naive computation: sum of squares of the error at the conv output.
    model.zero_grad()
    outs = []

    def keep(module: nn.Module, args: object, out: torch.Tensor) -> None:
        out.retain_grad()
        outs.append(out)

    handles = [model.blocks[i][0].register_forward_hook(keep) for i in range(10)]
    loss_of(model, x, y).backward()
    for h in handles:
        h.remove()
    naive = torch.stack([(o.grad**2).sum() for o in reversed(outs)])
    torch.testing.assert_close(base.q_before, naive, rtol=1e-10, atol=0)
    d = stats.as_dict()
    assert set(d) >= {"bottom_top_ratio", "bottom_top_ratio_unmodulated", "layers_rescaled"}
    assert d["layers_rescaled"] == float((stats.scale != 1).sum())


@pytest.mark.parametrize("mode", ["clamp", "match"])
@pytest.mark.parametrize("reference", ["previous", "top"])
def test_simulate_chain_reproduces_the_hooks(mode: str, reference: str) -> None:
    model, x, y = make_chain(12, seed=1)
    with ErrorModulation(model, measure_only=True) as em:
        grads(model, x, y)
        q = em.last_stats().q_before
    with ErrorModulation(model, band=1.25, mode=mode, reference=reference) as em:
        grads(model, x, y)
        stats = em.last_stats()
    scales, q_after = simulate_chain(q, band=1.25, mode=mode, reference=reference)
    assert (scales != 1).any()
    torch.testing.assert_close(stats.scale, scales, rtol=1e-9, atol=0)
    torch.testing.assert_close(stats.q_after, q_after, rtol=1e-9, atol=0)


# -- property tests of the rule ------------------------------------------------------------------

log_moments = st.floats(min_value=-12.0, max_value=12.0)  # log10 of a moment
bands = st.floats(min_value=1.0, max_value=8.0)
modes = st.sampled_from(["clamp", "match"])
max_scales = st.one_of(st.none(), st.floats(min_value=1.0, max_value=50.0))
special = st.sampled_from([0.0, math.inf, math.nan, -1.0, -math.inf])


def _r_in_band(r: float, band: float, margin: float = 1e-9) -> bool:
    e = 2 * math.log(band)
    return abs(math.log(r)) <= e * (1 - margin) - margin


@SETTINGS
@given(lq=log_moments, lref=log_moments, band=bands, mode=modes, max_scale=max_scales)
def test_scale_factor_rule(lq: float, lref: float, band: float, mode: str, max_scale: float | None) -> None:
    q, ref = 10.0**lq, 10.0**lref
    s = scale_factor(
        torch.tensor(q, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64), band, mode, max_scale
    )
    assert s.dtype == torch.float64 and s.shape == ()
    s = float(s)
    r = ref / q
    e = 2 * math.log(band)
    if _r_in_band(r, band):
        assert s == 1.0  # exactly
    if max_scale is not None:
        assert 1 / max_scale * (1 - 1e-12) <= s <= max_scale * (1 + 1e-12)
    bounded = max_scale is not None and abs(math.log(s)) >= math.log(max_scale) * (1 - 1e-9)
    after = math.log(ref / (q * s * s))
    if mode == "clamp" and not bounded:
        assert abs(after) <= e + 1e-9  # lands inside the band (on its edge if it was outside)
    if mode == "match" and not bounded and abs(math.log(r)) > e + 1e-9:
        assert abs(after) <= 1e-9  # equal moments
    # float32 input computes in float32 and agrees
    s32 = scale_factor(
        torch.tensor(q, dtype=torch.float32), torch.tensor(ref, dtype=torch.float32), band, mode, max_scale
    )
    assert s32.dtype == torch.float32
    if mode == "clamp":
        assert math.isclose(float(s32), s, rel_tol=1e-4)


@SETTINGS
@given(bad=special, other=log_moments, bad_is_q=st.booleans(), band=bands, mode=modes, max_scale=max_scales)
def test_scale_factor_leaves_invalid_moments_alone(
    bad: float, other: float, bad_is_q: bool, band: float, mode: str, max_scale: float | None
) -> None:
    q, ref = (bad, 10.0**other) if bad_is_q else (10.0**other, bad)
    for dtype in (torch.float32, torch.float64):
        s = scale_factor(torch.tensor(q, dtype=dtype), torch.tensor(ref, dtype=dtype), band, mode, max_scale)
        assert s == 1.0  # exactly, also for nan and inf


@SETTINGS
@given(
    lq=log_moments, lref=log_moments, lc=st.floats(-10.0, 10.0), band=bands, mode=modes, max_scale=max_scales
)
def test_scale_factor_is_loss_scale_invariant(
    lq: float, lref: float, lc: float, band: float, mode: str, max_scale: float | None
) -> None:
    q, ref, c2 = 10.0**lq, 10.0**lref, 10.0 ** (2 * lc)  # loss x c -> moments x c^2
    r, e = math.log(ref / q), 2 * math.log(band)
    assume(mode == "clamp" or abs(abs(r) - e) > 1e-6)  # "match" jumps at the band's edge
    s = scale_factor(
        torch.tensor(q, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64), band, mode, max_scale
    )
    sc = scale_factor(
        torch.tensor(q * c2, dtype=torch.float64),
        torch.tensor(ref * c2, dtype=torch.float64),
        band,
        mode,
        max_scale,
    )
    assert math.isclose(float(s), float(sc), rel_tol=1e-9)


chains = st.lists(
    st.one_of(log_moments.map(lambda v: 10.0**v), special.filter(lambda v: v >= 0 or math.isnan(v))),
    min_size=1,
    max_size=14,
)


def _naive_chain(q: list[float], band: float, mode: str, max_scale: float | None, reference: str):
    """A loop over Python floats: the rule as written in METHOD.md section 4."""
    lo, hi = band**-2, band**2
    ref, cum, scales, after = None, 1.0, [], []
    for qi in q:
        arrived = qi * cum
        ok = math.isfinite(arrived) and arrived > 0
        s2 = 1.0
        if ok and ref is not None:
            r = ref / arrived
            if not lo <= r <= hi:
                s2 = r / min(max(r, lo), hi) if mode == "clamp" else r
            if max_scale is not None:
                s2 = min(max(s2, max_scale**-2), max_scale**2)
        scales.append(math.sqrt(s2))
        after.append(arrived * s2)
        cum *= s2
        if ok and (ref is None or reference == "previous"):
            ref = arrived * s2
    return scales, after


@SETTINGS
@given(q=chains, band=bands, mode=modes, max_scale=max_scales, reference=st.sampled_from(["previous", "top"]))
def test_simulate_chain_rule(
    q: list[float], band: float, mode: str, max_scale: float | None, reference: str
) -> None:
    qt = torch.tensor(q, dtype=torch.float64)
    scales, q_after = simulate_chain(qt, band, mode, max_scale, reference=reference)
    assert scales.shape == q_after.shape == qt.shape and scales.dtype == torch.float64
    e = 2 * math.log(band)
    want_s, want_after = _naive_chain(q, band, mode, max_scale, reference)
    valid = [math.isfinite(v) and v > 0 for v in q]
    cum = torch.cumprod(scales**2, 0)
    ref = None
    for i, (qi, ok) in enumerate(zip(q, valid, strict=True)):
        arrived = qi * float(cum[i] / scales[i] ** 2)
        s, qa = float(scales[i]), float(q_after[i])
        if not ok:  # zero / inf / nan: untouched, and not a reference
            assert s == 1.0
            assert qa == qi or (math.isnan(qa) and math.isnan(qi))
            continue
        assert math.isclose(qa, arrived * s * s, rel_tol=1e-9)
        r = None if ref is None else math.log(ref / arrived)
        bounded = max_scale is not None and abs(math.log(s)) >= math.log(max_scale) * (1 - 1e-9)
        if r is None or abs(r) <= e * (1 - 1e-9) - 1e-9:
            assert s == 1.0  # inside the band (or the top): nothing changes, exactly
        elif mode == "clamp" and not bounded:
            assert abs(math.log(ref / qa)) <= e + 1e-9  # back inside the band
        elif mode == "match" and not bounded and abs(r) > e + 1e-9:
            assert math.isclose(qa, ref, rel_tol=1e-9)  # consecutive moments equal
        # Against the naive loop, away from a band edge where rounding may decide either way.
        if r is None or abs(abs(r) - e) > 1e-7:
            assert math.isclose(s, want_s[i], rel_tol=1e-8), (i, s, want_s[i])
            assert math.isclose(qa, want_after[i], rel_tol=1e-7), (i, qa, want_after[i])
        if ref is None or reference == "previous":
            ref = qa
    # Leading dimensions are independent chains.
    batch_s, _ = simulate_chain(torch.stack([qt, qt]), band, mode, max_scale, reference=reference)
    assert torch.equal(batch_s[0], scales) and torch.equal(batch_s[1], scales)


@SETTINGS
@given(q=st.lists(log_moments.map(lambda v: 10.0**v), min_size=2, max_size=14), band=bands)
def test_clamp_keeps_every_consecutive_ratio_in_band(q: list[float], band: float) -> None:
    _, q_after = simulate_chain(torch.tensor(q, dtype=torch.float64), band, "clamp", reference="previous")
    log_ratio = (q_after[:-1] / q_after[1:]).log().abs()
    assert (log_ratio <= 2 * math.log(band) + 1e-9).all()
    _, q_top = simulate_chain(torch.tensor(q, dtype=torch.float64), band, "clamp", reference="top")
    assert ((q_top[0] / q_top).log().abs() <= 2 * math.log(band) + 1e-9).all()


def test_rule_argument_errors() -> None:
    with pytest.raises(ValueError, match="band"):
        scale_factor(1.0, 1.0, band=0.5)
    with pytest.raises(ValueError, match="mode"):
        simulate_chain(torch.ones(3), mode="equal")
    with pytest.raises(ValueError, match="max_scale"):
        scale_factor(1.0, 1.0, max_scale=0.9)
    with pytest.raises(ValueError, match="reference"):
        simulate_chain(torch.ones(3), reference="bottom")
    with pytest.raises(ValueError, match="last dimension"):
        simulate_chain(torch.tensor(1.0))


# -- modulation off is bit-identical ---------------------------------------------------------------


def test_off_removed_and_measuring_are_bit_identical() -> None:
    model, x, y = make_chain(8, dtype=torch.float32)
    plain = grads(model, x, y)
    assert_bit_identical(plain, grads(model, x, y))  # the CPU kernels are deterministic
    for options in ({"schedule": 0}, {"measure_only": True}, {"schedule": 0, "record_when_inactive": False}):
        with ErrorModulation(model, band=1.01, **options) as em:
            assert_bit_identical(plain, grads(model, x, y))
            if options.get("record_when_inactive", True):
                assert not em.last_stats().modulated
    em = ErrorModulation(model, band=1.01)
    on = grads(model, x, y)
    assert any(not torch.equal(on[k], plain[k]) for k in plain)  # the hooks were really on
    # removed before the backward of a graph they already hooked: nothing changes
    model.zero_grad(set_to_none=True)
    loss = loss_of(model, x, y)
    em.remove()
    em.remove()  # idempotent
    loss.backward()
    assert_bit_identical(plain, {n: p.grad for n, p in model.named_parameters()})
    assert_bit_identical(plain, grads(model, x, y))
    for m in model.modules():  # no hook left behind
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_top_layer_and_unmodulated_layers_are_untouched() -> None:
    # band=inf never rescales: the modulated hook path (multiplying by exactly 1) is bit-identical.
    model, x, y = make_chain(8, dtype=torch.float32)
    plain = grads(model, x, y)
    with ErrorModulation(model, band=math.inf) as em:
        assert_bit_identical(plain, grads(model, x, y))
        assert em.last_stats().modulated and torch.equal(em.last_stats().scale, torch.ones(8))


def test_resnet18_inplace_relu_shortcuts() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    plain = grads(model, x, y)
    order: list[str] = []
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_hook(lambda m, a, o, n=n: order.append(n)) for n, m in convs]
    with ErrorModulation(model, band=1.2) as em:
        mod = grads(model, x, y)
        stats = em.last_stats()
        for h in handles:
            h.remove()
        # "consecutive" = consecutive in the order the hooks fire = reverse forward order on one device
        assert stats.names == list(reversed(order))
        assert len(stats) == 20 and "fc" not in stats.names and stats.names[-1] == "conv1"
        assert stats.q_before.dtype == torch.float32 and torch.isfinite(stats.q_after).all()
        assert (stats.scale != 1).any()
        assert all(torch.isfinite(g).all() for g in mod.values())
        assert not torch.equal(mod["conv1.weight"], plain["conv1.weight"])
        assert torch.equal(mod["fc.weight"], plain["fc.weight"])
        em.set_step(0)
        em.schedule = 0  # schedule off: bit-identical on a real timm model too
        assert_bit_identical(plain, grads(model, x, y))


# -- several forwards, checkpointing, loss scale, autocast -------------------------------------------


@pytest.fixture(params=["host", "tensor"])
def state_path(request, monkeypatch) -> str:
    """Both ways the chain's state travels: as Python floats (CPU errors, the default here) and as
    the token's gradient (a GPU's, forced on CPU tensors): the flows below hold on each."""
    if request.param == "tensor":
        monkeypatch.setattr(modulation_function, "runs_on_host", lambda g: False)
    return request.param


def _run_alone(model, em, x, y):
    g = grads(model, x, y)
    return g, em.last_stats().scale.clone()


def test_gradient_accumulation_and_retain_graph(state_path: str) -> None:
    model, x, y = make_chain(10, seed=2)
    x1, y1, x2, y2 = x[:2], y[:2], x[2:], y[2:]
    with ErrorModulation(model, band=1.3) as em:
        g1, s1 = _run_alone(model, em, x1, y1)
        g2, s2 = _run_alone(model, em, x2, y2)
        assert not torch.equal(s1, s2)
        total = {k: g1[k] + g2[k] for k in g1}

        for order in ((1, 2), (2, 1)):  # two forwards, then two backwards (either order)
            model.zero_grad(set_to_none=True)
            losses = {1: loss_of(model, x1, y1), 2: loss_of(model, x2, y2)}
            for i in order:
                losses[i].backward()
                torch.testing.assert_close(em.last_stats().scale, s1 if i == 1 else s2, rtol=1e-12, atol=0)
            assert_close({n: p.grad for n, p in model.named_parameters()}, total, rtol=1e-10)

        model.zero_grad(set_to_none=True)  # forward, backward, forward, backward
        loss_of(model, x1, y1).backward()
        loss_of(model, x2, y2).backward()
        assert_close({n: p.grad for n, p in model.named_parameters()}, total, rtol=1e-10)

        model.zero_grad(set_to_none=True)  # two forwards, one backward of the sum
        (loss_of(model, x1, y1) + loss_of(model, x2, y2)).backward()
        assert_close({n: p.grad for n, p in model.named_parameters()}, total, rtol=1e-10)

        model.zero_grad(set_to_none=True)  # one forward, two backwards through the same graph
        loss = loss_of(model, x1, y1)
        loss.backward(retain_graph=True)
        loss.backward()
        torch.testing.assert_close(em.last_stats().scale, s1, rtol=1e-12, atol=0)
        assert_close({n: p.grad for n, p in model.named_parameters()}, {k: 2 * g1[k] for k in g1}, rtol=1e-10)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing(use_reentrant: bool, state_path: str) -> None:
    model, x, y = make_chain(10, seed=3)
    with ErrorModulation(model, band=1.3) as em:
        want, want_s = _run_alone(model, em, x, y)
        model.checkpoint = use_reentrant
        got, got_s = _run_alone(model, em, x, y)
        torch.testing.assert_close(got_s, want_s, rtol=1e-12, atol=0)
        assert em.last_stats().names == [f"blocks.{i}.0" for i in reversed(range(10))]
        assert_close(got, want, rtol=1e-10)
        model.zero_grad(set_to_none=True)  # forward, backward, forward, backward
        loss_of(model, x, y).backward()
        loss_of(model, x, y).backward()
        torch.testing.assert_close(em.last_stats().scale, want_s, rtol=1e-12, atol=0)
        assert_close(
            {n: p.grad for n, p in model.named_parameters()}, {k: 2 * v for k, v in want.items()}, rtol=1e-10
        )
        # Forward, forward, backward, backward on two micro-batches, the top of the chain inside a
        # checkpointed segment: each backward gets its own chain (also reentrant: the recomputed
        # layers join the chain whose backward runs, not the latest forward's).
        model.checkpoint = None
        (g1, s1), (g2, s2) = _run_alone(model, em, x[:2], y[:2]), _run_alone(model, em, x[2:], y[2:])
        model.checkpoint = use_reentrant
        model.zero_grad(set_to_none=True)
        l1, l2 = loss_of(model, x[:2], y[:2]), loss_of(model, x[2:], y[2:])
        l1.backward()
        torch.testing.assert_close(em.last_stats().scale, s1, rtol=1e-12, atol=0)
        l2.backward()
        torch.testing.assert_close(em.last_stats().scale, s2, rtol=1e-12, atol=0)
        assert_close({n: p.grad for n, p in model.named_parameters()}, {k: g1[k] + g2[k] for k in g1}, 1e-10)


def test_create_graph_treats_the_factor_as_a_constant(state_path: str) -> None:
    model, x, y = make_chain(6, seed=8)
    with ErrorModulation(model, band=1.3) as em:
        want, s = _run_alone(model, em, x, y)
        before = em.last_stats()
        names, params = zip(*model.named_parameters(), strict=True)
        got = dict(
            zip(names, torch.autograd.grad(loss_of(model, x, y), params, create_graph=True), strict=True)
        )
        assert em.last_stats() is not before  # torch.autograd.grad published its own chain
        torch.testing.assert_close(em.last_stats().scale, s, rtol=1e-12, atol=0)
        assert got["blocks.0.0.weight"].requires_grad  # a graph was built through the hooks
        assert_close({k: v.detach() for k, v in got.items()}, want, rtol=1e-10)


def test_loss_scale_invariance() -> None:
    model, x, y = make_chain(10, seed=4, dtype=torch.float32)
    with ErrorModulation(model, band=1.3) as em:
        g, s = _run_alone(model, em, x, y)
        assert (s != 1).sum() >= 2
        for c in (1000.0, 1e-3, 2.0**16):
            gc = grads(model, x, y, c)
            torch.testing.assert_close(em.last_stats().scale, s, rtol=1e-5, atol=0)
            for k in g:
                assert_rel(gc[k], g[k] * c, 1e-4, floor=1e-6 * c)


def test_bf16_autocast_cpu() -> None:
    model, x, y = make_chain(10, seed=5, dtype=torch.float32)

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model, x, y)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = run()
    with ErrorModulation(model, band=1.3) as em:
        mod = run()
        stats = em.last_stats()
    assert stats.q_before.dtype == stats.scale.dtype == torch.float32  # statistics in float32
    assert torch.isfinite(stats.q_after).all() and (stats.scale != 1).any()
    for i, name in enumerate(stats.names):
        w = f"{name}.weight"
        want = plain[w] * torch.cumprod(stats.scale, 0)[i]
        assert torch.linalg.vector_norm(mod[w] - want) <= 3e-2 * torch.linalg.vector_norm(want), name


def test_nonfinite_error_passes_through_and_does_not_poison(state_path: str) -> None:
    # An overflow in the error must stay visible (GradScaler) and not become the reference.
    model, x, y = make_chain(6, seed=6, dtype=torch.float32)
    seen = []
    with ErrorModulation(model, band=1.3) as em:

        def overflow(module: nn.Module, args: object, out: torch.Tensor) -> None:
            out.register_hook(lambda g: torch.full_like(g, math.inf))

        def look(module: nn.Module, args: object, out: torch.Tensor) -> None:
            out.register_hook(seen.append)

        h = model.blocks[3].register_forward_hook(overflow)
        h2 = model.blocks[3][0].register_forward_hook(look)
        grads(model, x, y)
        h.remove()
        h2.remove()
        stats = em.last_stats()
    assert not torch.isfinite(seen[0]).any()  # inf through ReLU and BN backward: NaN
    i = stats.names.index("blocks.3.0")
    assert stats.names[i + 1 :] == ["blocks.2.0", "blocks.1.0", "blocks.0.0"]
    assert not torch.isfinite(stats.q_before[i:]).any() and (stats.scale[i:] == 1).all()
    assert torch.isfinite(stats.q_before[:i]).all() and (stats.scale[:i] != 1).any()
    assert not model.blocks[0][0].weight.grad.isfinite().any()  # visible to a GradScaler


def test_several_passes_ending_in_one_backward(state_path: str) -> None:
    # Each pass is modulated as its own chain. Eager, last_stats reports the pass whose bottom layer
    # ran last (the engine runs the later forward's graph first); compiled, both records reach the
    # one sink and last_stats reports their per-layer mean (geometric for the scales).
    model, x, y = make_chain(6, seed=2, dtype=torch.float32)
    with ErrorModulation(model, band=1.2) as em:
        g1, s1 = _run_alone(model, em, x[:2], y[:2])
        g2, s2 = _run_alone(model, em, x[2:], y[2:])
        assert not torch.equal(s1, s2)
        model.zero_grad(set_to_none=True)
        (loss_of(model, x[:2], y[:2]) + loss_of(model, x[2:], y[2:])).backward()
        torch.testing.assert_close(em.last_stats().scale, s1, rtol=1e-6, atol=0)
        assert_close({n: p.grad for n, p in model.named_parameters()}, {k: g1[k] + g2[k] for k in g1}, 1e-5)
        torch._dynamo.reset()
        try:
            compiled = torch.compile(model, backend="aot_eager")
            (loss_of(compiled, x[:2], y[:2]) + loss_of(compiled, x[2:], y[2:])).backward()
            torch.testing.assert_close(em.last_stats().scale, (s1 * s2).sqrt(), rtol=1e-5, atol=0)
        finally:
            torch._dynamo.reset()


class _Branchy(nn.Module):
    """Three convs: a frozen ``no_grad`` one, one whose output is dropped, and one called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen, self.dead, self.twice = (nn.Conv2d(3, 3, 3, padding=1) for _ in range(3))
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.frozen(x)
        _ = self.dead(x)
        return self.fc(self.twice(self.twice(x)).mean((2, 3)))


def test_chains_beyond_the_plain_forward(state_path: str) -> None:
    model, x, y = make_chain(8, seed=5)
    with ErrorModulation(model, band=1.2) as em:
        _, want = _run_alone(model, em, x, y)
        model.zero_grad(set_to_none=True)  # a submodule called directly: a chain of its own
        nn.functional.cross_entropy(model.fc(model.blocks(x).mean((2, 3))), y).backward()
        assert em.last_stats().names == [f"blocks.{i}.0" for i in reversed(range(8))]
        torch.testing.assert_close(em.last_stats().scale, want, rtol=1e-12, atol=0)
    torch.manual_seed(0)
    model, x, y = _Branchy(), torch.randn(2, 3, 6, 6), torch.randint(0, 2, (2,))
    with ErrorModulation(model, band=1.01) as em:
        with pytest.warns(UserWarning, match="called more than 3 times"):
            loss_of(model, x, y).backward()  # 4 calls: frozen, dead, twice, twice
        loss_of(model, x, y).backward()  # the next forward has room
        stats = em.last_stats()
    # The frozen layer (no_grad, never recomputed) is left out; the dead one received no error
    # (q = 0, s = 1; an invalid moment, never a reference).
    assert stats.names == ["twice", "twice", "dead"]
    assert stats.q_before[-1] == 0 and stats.scale[-1] == 1 and (stats.q_before[:2] > 0).all()


def test_plain_chain_check_sees_through_installed_modulation() -> None:
    # OrthoModulated runs the check before it makes its own modulation; an ErrorModulation made
    # earlier (and passed in, with max_grad_ratio="auto") is on the model during the check.
    from timm_ortho.chain import check_plain_chain

    model, x, _ = make_chain(4)
    assert check_plain_chain(model, x).plain
    with ErrorModulation(model):
        assert check_plain_chain(model, x).plain


# -- options, schedule, errors ---------------------------------------------------------------------


def test_schedule() -> None:
    model, _, _ = make_chain(4)
    em = ErrorModulation(model)
    assert em.active and em.step == 0
    em.schedule = 3
    em.set_step(2)
    assert em.active
    em.set_step(3)
    assert not em.active
    em.schedule = lambda step: step % 2 == 0
    assert not em.active
    em.set_step(4)
    assert em.active
    with pytest.raises(ValueError, match=">= 0"):
        em.set_step(-1)
    with pytest.raises(TypeError):
        em.set_step(1.5)
    with pytest.raises(TypeError, match="schedule"):
        em.schedule = "early"
    em.remove()
    with pytest.raises(TypeError, match="schedule"):
        ErrorModulation(model, schedule=True)
    with pytest.raises(ValueError, match="schedule"):
        ErrorModulation(model, schedule=-2)


def test_schedule_turns_the_rule_off_between_backwards() -> None:
    model, x, y = make_chain(8, dtype=torch.float32)
    plain = grads(model, x, y)
    with ErrorModulation(model, band=1.1, schedule=1) as em:
        on = grads(model, x, y)
        assert em.last_stats().modulated
        assert any(not torch.equal(on[k], plain[k]) for k in plain)
        em.set_step(1)
        assert_bit_identical(plain, grads(model, x, y))
        assert not em.last_stats().modulated


def test_options_and_errors() -> None:
    model, x, y = make_chain(6)
    with ErrorModulation(model, include_classifier=True, band=1.0) as em:
        grads(model, x, y)
        stats = em.last_stats()
        assert stats.names[0] == "fc" and len(stats) == 7
        q = stats.q_after
        torch.testing.assert_close(q, q[0].expand_as(q), rtol=1e-10, atol=0)  # band 1: all equal
    with ErrorModulation(model, band=1.0, max_scale=1.2) as em:
        grads(model, x, y)
        s = em.last_stats().scale
        assert ((s <= 1.2 * (1 + 1e-12)) & (s >= (1 - 1e-12) / 1.2)).all()
    with ErrorModulation(model, skip_stem=True) as em:  # find_targets options
        grads(model, x, y)
        assert "blocks.0.0" not in em.last_stats().names and "blocks.0.0" not in repr(em)
    em = ErrorModulation(model)
    with pytest.raises(RuntimeError, match="no backward"):
        em.last_stats()
    with torch.no_grad():
        model(x)  # outputs that do not require grad are skipped
    with pytest.raises(RuntimeError, match="no backward"):
        em.last_stats()
    em.remove()
    assert "removed" in repr(em)
    from timm_ortho.targets import find_targets

    targets = find_targets(model)
    with pytest.raises(ValueError, match="either targets"):
        ErrorModulation(model, targets=targets, skip_stem=True)
    with pytest.raises(ValueError, match="not a submodule"):
        ErrorModulation(make_chain(3)[0], targets=targets)
    with pytest.raises(ValueError, match="no target layer"):
        ErrorModulation(model, exclude=["*"])
    with pytest.raises(ValueError, match="statistic"):
        ErrorModulation(model, statistic="median")
    with pytest.raises(ValueError, match="band"):
        ErrorModulation(model, band=0.9)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        ErrorModulation("resnet18")
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_targets_from_the_regularizer_leave_the_classifier_out() -> None:
    from timm_ortho.targets import find_targets

    model, x, y = make_chain(5)
    targets = find_targets(model)
    assert targets[-1].role == "classifier"
    with ErrorModulation(model, targets=targets) as em:
        grads(model, x, y)
        assert em.last_stats().names == [f"blocks.{i}.0" for i in reversed(range(5))]


# -- the 44-layer measurement -------------------------------------------------------------------


def measure_plain44(options: dict, seed: int = 0) -> ModulationStats:
    torch.manual_seed(seed)
    model = plain44()
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    with ErrorModulation(model, **options) as em:
        grads(model, x, y)
        return em.last_stats()


def test_plain44_bottom_top_ratio_moves_toward_one() -> None:
    base = measure_plain44({"measure_only": True})
    assert len(base) == 43
    off = abs(math.log(float(base.bottom_top_ratio())))
    assert off > math.log(100)  # at MSRA init the error grows a lot toward the bottom
    tight = measure_plain44({"band": 1.1})
    torch.testing.assert_close(
        tight.bottom_top_ratio("unmodulated"), base.bottom_top_ratio(), rtol=1e-4, atol=0
    )
    on = abs(math.log(float(tight.bottom_top_ratio())))
    assert on < off - math.log(10)  # toward 1 by more than 10x
    top = measure_plain44({"reference": "top"})
    assert abs(math.log(float(top.bottom_top_ratio()))) <= 2 * math.log(2.0) + 1e-4


# -- cost: ops dispatched per layer ---------------------------------------------------------------


def step_ops(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dispatched) -> collections.Counter[str]:
    """The ops of one training step's forward and backward."""
    model.zero_grad(set_to_none=True)
    return dispatched(lambda: loss_of(model, x, y).backward())


# Ops that read a tensor's value on the host: a host-device synchronization on a GPU.
SYNCING = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "allclose"}

# Per target layer, forward (the token's view) and backward (see Modulate.backward's docstring).
_MEASURE = {"view": 1, "linalg_vector_norm": 1, "select_scatter": 1}
_RULE = {"linalg_vector_norm": 1, "log": 2, "select": 1, "sub": 1, "nan_to_num": 1, "exp": 1}
_RULE |= {"abs": 1, "lt": 1, "where": 1, "stack": 1, "slice_scatter": 1, "view": 1}


@pytest.mark.parametrize(
    ("options", "per_layer"),
    [
        ({"measure_only": True}, _MEASURE),  # 3: the norm and its write into the state
        ({"band": 1.3}, _RULE | {"hardshrink": 1, "mul": 1}),  # 15, reference="top", match
        # 16: + the rescaled norm that becomes the next reference
        ({"band": 1.3, "mode": "clamp", "reference": "previous"}, _RULE | {"softshrink": 1, "mul": 2}),
        # 17: + the per-element scaling of the norm and the bound on the factor
        (
            {"band": 1.3, "statistic": "mean", "max_scale": 2.0},
            _RULE | {"hardshrink": 1, "clamp": 1, "mul": 2},
        ),
    ],
)
def test_ops_per_hook(options: dict, per_layer: dict[str, int], dispatched, monkeypatch) -> None:
    # The method's ops are the difference between a step with and without it (same graph
    # otherwise), forward and backward: the same ops on every layer, the top included (it reads no
    # reference and multiplies its error by exactly 1). History: the eager tensor hooks of commit
    # bd601a5 dispatched 1 (measuring), 2 (top) and 10-11 (below) in backward (5c6a797's: 3, 15,
    # 14), all on private autograd APIs; the traced identity used under torch.compile then
    # (TracedModulation) dispatched 27 per layer when run eagerly, one of them a copy of the output.
    # The device path (a GPU's): the rule as 0-d tensor arithmetic, forced here on CPU tensors.
    monkeypatch.setattr(modulation_function, "runs_on_host", lambda g: False)
    layers = 8
    model, x, y = make_chain(layers, dtype=torch.float32)
    plain = step_ops(model, x, y, dispatched)
    with ErrorModulation(model, **options) as em:
        hooked = step_ops(model, x, y, dispatched)
        stats = em.last_stats()
    extra = hooked - plain
    assert extra == {op: n * layers for op, n in per_layer.items()}, extra
    assert not plain - hooked  # nothing of the model's own step went away
    assert not {"clone", "copy_", "_to_copy"} & set(extra)  # the output is never copied (eager)
    assert not SYNCING & set(hooked), hooked  # no value read on the host
    if not options.get("measure_only"):
        assert (stats.scale != 1).sum() >= 2  # the rule ran


@pytest.mark.parametrize(
    "options", [{"measure_only": True}, {"band": 1.3}, {"band": 1.3, "reference": "previous"}]
)
def test_ops_per_hook_on_the_host(options: dict, dispatched) -> None:
    # On CPU tensors the state stays in Python: per layer the token's view and the norm (a view of
    # the error, one dot product, one read), the multiply only where s != 1, and one tensor per
    # backward for the record. No slice_scatter, select or lift_fresh per layer (the state as a
    # tensor cost 4-5 more dispatched ops per layer, and about 30 us of them on a 2-core CPU).
    layers = 8
    model, x, y = make_chain(layers, dtype=torch.float32)
    plain = step_ops(model, x, y, dispatched)
    with ErrorModulation(model, **options) as em:
        hooked = step_ops(model, x, y, dispatched)
        stats = em.last_stats()
    extra = hooked - plain
    rescaled = int((stats.scale != 1).sum())
    per_layer = {"view": 2, "dot": 1, "_local_scalar_dense": 1}
    expected = {op: n * layers for op, n in per_layer.items()} | {"lift_fresh": 1}
    assert extra == expected | ({"mul": rescaled} if rescaled else {}), extra
    assert not {"clone", "copy_", "_to_copy"} & set(extra)
    if not options.get("measure_only"):
        assert rescaled >= 2  # the rule ran, and only those layers were multiplied


@pytest.mark.parametrize(
    "options",
    [
        {"band": 1.3},
        {"band": 1.1, "mode": "clamp", "reference": "previous"},
        {"band": 1.3, "statistic": "mean", "max_scale": 1.5},
    ],
)
def test_host_and_device_paths_agree(options: dict, monkeypatch) -> None:
    model, x, y = make_chain(12, dtype=torch.float32)
    results = []
    for host in (True, False):
        if not host:
            monkeypatch.setattr(modulation_function, "runs_on_host", lambda g: False)
        with ErrorModulation(model, **options) as em:
            g = grads(model, x, y)
            results.append((g, em.last_stats()))
    (g_host, s_host), (g_dev, s_dev) = results
    assert torch.equal(s_host.scale != 1, s_dev.scale != 1)  # the same layers rescaled
    torch.testing.assert_close(s_host.scale, s_dev.scale, rtol=1e-5, atol=0)
    torch.testing.assert_close(s_host.q_before, s_dev.q_before, rtol=1e-5, atol=0)
    # float32 sums in another order: within 1e-5 of the gradients' scale (a conv bias before BN has
    # a gradient of 0 up to rounding, on either path)
    scale = max(float(g.abs().max()) for g in g_dev.values())
    for name in g_host:
        torch.testing.assert_close(g_host[name], g_dev[name], rtol=0, atol=1e-5 * scale)


def test_last_stats_is_batched(dispatched) -> None:
    # The bookkeeping runs once after the backward, in a number of ops that does not grow with depth.
    counts = []
    for layers in (3, 9):
        model, x, y = make_chain(layers, dtype=torch.float32)
        with ErrorModulation(model, band=1.3) as em:
            grads(model, x, y)
            ops = dispatched(em.last_stats)
        counts.append(sum(ops.values()))
        assert not SYNCING & set(ops)
    assert counts[0] == counts[1]


# -- torch.compile ---------------------------------------------------------------------------------


def graph_breaks(model: nn.Module, x: torch.Tensor) -> int:
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(model)(x).graph_break_count
    finally:
        torch._dynamo.reset()


def test_compile_has_no_more_graph_breaks_than_without() -> None:
    # Before the traced path: 9 breaks on plain_cnn20 and plain_cnn110 (tensor hooks registered in
    # forward hooks, the graph-task-id query), 0 without the modulation.
    model, x, _ = make_chain(6, dtype=torch.float32)
    without = graph_breaks(model, x)
    for options in ({}, {"measure_only": True}, {"reference": "previous", "statistic": "mean"}):
        with ErrorModulation(model, **options):
            assert graph_breaks(model, x) == without == 0, options
    timm = pytest.importorskip("timm")
    import timm_ortho  # noqa: F401  (registers the plain nets)

    net = timm.create_model("plain_cnn20", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    without = graph_breaks(net, x)
    with ErrorModulation(net):
        assert graph_breaks(net, x) == without == 0


def compiled_vs_eager(model, x, y, options: dict, backend: str):
    """Gradients and statistics of an eager and a compiled backward with the same options."""
    with ErrorModulation(model, **options) as em:
        eager = grads(model, x, y)
        eager_stats = em.last_stats()
        torch._dynamo.reset()
        try:
            compiled_model = torch.compile(model, backend=backend)
            for _ in range(2):  # the second call runs the cached graph
                model.zero_grad(set_to_none=True)
                loss_of(compiled_model, x, y).backward()
                compiled = {n: p.grad.clone() for n, p in model.named_parameters()}
                compiled_stats = em.last_stats()
        finally:
            torch._dynamo.reset()
    return eager, eager_stats, compiled, compiled_stats


def assert_same_run(eager, eager_stats, compiled, compiled_stats, rtol: float) -> None:
    assert compiled_stats.names == eager_stats.names
    assert compiled_stats.modulated == eager_stats.modulated
    assert compiled_stats.scale.dtype == eager_stats.scale.dtype
    assert torch.equal(compiled_stats.scale == 1, eager_stats.scale == 1)  # the same layers rescaled
    for field_ in ("scale", "q_before", "q_after"):
        torch.testing.assert_close(
            getattr(compiled_stats, field_), getattr(eager_stats, field_), rtol=rtol, atol=0, msg=field_
        )
    for k in eager:
        assert_rel(compiled[k], eager[k], 10 * rtol, floor=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        {"band": 1.3},
        {"band": 1.3, "mode": "clamp", "reference": "previous", "max_scale": 1.5},
        {"band": 1.2, "statistic": "mean"},
        {"measure_only": True},
    ],
)
def test_compiled_matches_eager(options: dict) -> None:
    # aot_eager: dynamo + AOT autograd (the traced backward) without inductor's code generation.
    model, x, y = make_chain(6, seed=9, dtype=torch.float32)
    eager, eager_stats, compiled, compiled_stats = compiled_vs_eager(model, x, y, options, "aot_eager")
    if not options.get("measure_only"):
        assert (eager_stats.scale != 1).sum() >= 2
    assert_same_run(eager, eager_stats, compiled, compiled_stats, rtol=1e-5)


@pytest.mark.slow
def test_compiled_with_inductor_matches_eager() -> None:
    model, x, y = make_chain(5, seed=9, dtype=torch.float32)
    eager, eager_stats, compiled, compiled_stats = compiled_vs_eager(model, x, y, {"band": 1.3}, "inductor")
    assert (eager_stats.scale != 1).sum() >= 2
    assert_same_run(eager, eager_stats, compiled, compiled_stats, rtol=1e-4)


def test_compiled_inplace_activation_retain_graph_and_passes() -> None:
    # A conv followed directly by an in-place ReLU (no BN): the identity must not hand out a view.
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1), nn.ReLU(inplace=True)]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(6 * 16, 5))
    x, y = torch.randn(4, 3, 4, 4), torch.randint(0, 5, (4,))
    eager, eager_stats, compiled, compiled_stats = compiled_vs_eager(model, x, y, {"band": 1.01}, "aot_eager")
    assert (eager_stats.scale != 1).any()
    assert_same_run(eager, eager_stats, compiled, compiled_stats, rtol=1e-5)

    model, x, y = make_chain(5, seed=2, dtype=torch.float32)
    x1, y1, x2, y2 = x[:2], y[:2], x[2:], y[2:]
    with ErrorModulation(model, band=1.3) as em:
        g1, s1 = _run_alone(model, em, x1, y1)
        _, s2 = _run_alone(model, em, x2, y2)
        torch._dynamo.reset()
        try:
            compiled_model = torch.compile(model, backend="aot_eager")
            model.zero_grad(set_to_none=True)
            loss = loss_of(compiled_model, x1, y1)
            for _ in range(2):  # a second backward through a retained graph: a fresh chain
                loss.backward(retain_graph=True)
                torch.testing.assert_close(em.last_stats().scale, s1, rtol=1e-5, atol=0)
            for k in g1:
                assert_rel(model.get_parameter(k).grad, 2 * g1[k], 1e-4, floor=1e-6)
            l1, l2 = loss_of(compiled_model, x1, y1), loss_of(compiled_model, x2, y2)
            l2.backward()  # two forwards, then their backwards: each its own chain
            torch.testing.assert_close(em.last_stats().scale, s2, rtol=1e-5, atol=0)
            l1.backward()
            torch.testing.assert_close(em.last_stats().scale, s1, rtol=1e-5, atol=0)
        finally:
            torch._dynamo.reset()


@pytest.mark.parametrize("reference", ["previous", "top"])
def test_compiled_with_checkpointing(reference: str) -> None:
    # Dynamo cannot trace the hooks' attribute stores inside a checkpointed segment (a HOP): one
    # graph break, and dynamo then runs the looped segments eagerly while the rest stays compiled.
    # The eager part joins the forward's token chain: one chain, the same factors and gradients as
    # without compile. (The stem, compiled as a frame of its own there, lost its rescaling when the
    # identity returned its input marked dirty instead of a copy; reference="previous" and
    # band=1.01 rescale it.)
    model, x, y = make_chain(7, seed=4, dtype=torch.float32)
    model.checkpoint = False  # non-reentrant
    without = graph_breaks(model, x)
    with ErrorModulation(model, band=1.01, reference=reference):
        assert graph_breaks(model, x) <= without + 1
    eager, eager_stats, compiled, compiled_stats = compiled_vs_eager(
        model, x, y, {"band": 1.01, "reference": reference}, "aot_eager"
    )
    assert eager_stats.scale[-1] != 1  # the stem is rescaled
    assert_same_run(eager, eager_stats, compiled, compiled_stats, rtol=1e-5)


def test_compiled_schedule_does_not_recompile_every_step() -> None:
    model, x, y = make_chain(4, dtype=torch.float32)
    compiles = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        compiles.append(1)
        return gm.forward

    plain = grads(model, x, y)
    torch._dynamo.reset()
    try:
        with ErrorModulation(model, band=1.01, schedule=3) as em:
            compiled_model = torch.compile(model, backend=backend)
            modulated = []
            for step in range(6):
                em.set_step(step)
                model.zero_grad(set_to_none=True)
                loss_of(compiled_model, x, y).backward()
                modulated.append(em.last_stats().modulated)
            g = {n: p.grad for n, p in model.named_parameters()}
            assert modulated == [True] * 3 + [False] * 3
            for k in plain:  # schedule off: the factor is exactly 1
                torch.testing.assert_close(g[k], plain[k], rtol=1e-5, atol=1e-7)
        assert len(compiles) == 2  # one graph while on, one once off; not one per step
        torch._dynamo.reset()
        with ErrorModulation(model, schedule=0, record_when_inactive=False):
            assert graph_breaks(model, x) == 0
    finally:
        torch._dynamo.reset()


# -- data parallel -----------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, x, y = make_chain(6, seed=7)
        ddp = nn.parallel.DistributedDataParallel(model)
        with ErrorModulation(ddp, band=1.3) as em:
            grads(ddp, x[2 * rank : 2 * rank + 2], y[2 * rank : 2 * rank + 2])
            torch.save(
                {"grads": {n: p.grad for n, p in model.named_parameters()}, "scale": em.last_stats().scale},
                os.path.join(out_dir, f"rank{rank}.pt"),
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_data_parallel_each_rank_modulates_its_own_error() -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        out = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    assert_bit_identical(out[0]["grads"], out[1]["grads"])  # all ranks step identically
    assert not torch.equal(out[0]["scale"], out[1]["scale"])  # with their own statistics
    # Independent computation: each shard modulated alone, then averaged (DDP's all-reduce mean).
    model, x, y = make_chain(6, seed=7)
    with ErrorModulation(model, band=1.3) as em:
        shards = []
        for r in range(2):
            shards.append(grads(model, x[2 * r : 2 * r + 2], y[2 * r : 2 * r + 2]))
            torch.testing.assert_close(em.last_stats().scale, out[r]["scale"], rtol=1e-12, atol=0)
    assert_close(out[0]["grads"], {k: (shards[0][k] + shards[1][k]) / 2 for k in shards[0]}, rtol=1e-10)


# -- plots -----------------------------------------------------------------------------------------


def test_plots_write_png(tmp_path) -> None:
    model, x, y = make_chain(4)
    with ErrorModulation(model, band=1.2) as em:
        grads(model, x, y)
        stats = em.last_stats()
    p1 = plot_error_moments(stats, tmp_path / "one.png")
    p2 = plot_error_moments(
        [stats, stats], tmp_path / "sub" / "two.png", labels=["a", "b"], which=("before", "after")
    )
    p3 = plot_ratio_history({"off": ([0, 1, 2], [1e-3, 1e-2, 0.1])}, tmp_path / "ratio.png", title="Fig. 3")
    for p in (p1, p2, p3):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(ValueError):
        plot_error_moments([], tmp_path / "x.png")
    with pytest.raises(ValueError):
        plot_error_moments(stats, tmp_path / "x.png", which=("sideways",))


if __name__ == "__main__":  # the measurement reported in docs/modulation.md
    prev = {"reference": "previous"}
    configs = {
        "off (measure_only)": {"measure_only": True},
        "clamp A=2, previous": {"mode": "clamp", **prev},
        "match A=2, previous": {"mode": "match", **prev},
        "clamp A=1.1, previous": {"band": 1.1, "mode": "clamp", **prev},
        "match A=1.1, previous": {"band": 1.1, "mode": "match", **prev},
        "clamp A=1.05, previous": {"band": 1.05, "mode": "clamp", **prev},
        "clamp A=2, top": {"mode": "clamp", "reference": "top"},
        "match A=2, top (default)": {},
        "mean, off": {"statistic": "mean", "measure_only": True},
        "mean, clamp A=1.1, previous": {"statistic": "mean", "band": 1.1, "mode": "clamp", **prev},
        "classifier in chain, total, clamp A=2, previous": {
            "include_classifier": True,
            "mode": "clamp",
            **prev,
        },
        "classifier in chain, mean, clamp A=2, previous": {
            "include_classifier": True,
            "statistic": "mean",
            "mode": "clamp",
            **prev,
        },
    }
    torch.set_num_threads(2)
    print("| configuration | bottom/top, seeds 0 / 1 / 2 | layers rescaled | largest factor |")
    print("| --- | --- | --- | --- |")
    for label, options in configs.items():
        ratios, rescaled, largest = [], [], []
        for seed in range(3):
            s = measure_plain44(options, seed)
            ratios.append(f"{float(s.bottom_top_ratio()):.3g}")
            rescaled.append(str(int((s.scale != 1).sum())))
            big = s.scale.log().abs().max().exp()
            largest.append(f"{float(big):.3g}")
        print(f"| {label} | {' / '.join(ratios)} | {' / '.join(rescaled)} | {' / '.join(largest)} |")


def test_option_typos_and_single_layer_are_reported() -> None:
    model, _, _ = make_chain(3)
    with pytest.raises(TypeError, match=r"'bnd' \(did you mean 'band'\?\)"):
        ErrorModulation(model, bnd=2.0)
    with pytest.raises(TypeError, match=r"'referenc' \(did you mean 'reference'\?\)"):
        ErrorModulation(model, referenc="top")
    with pytest.raises(TypeError, match="unknown ErrorModulation option"):
        timm_ortho.OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.1), model, modulation={"bnd": 2})
    single = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    single(torch.randn(1, 3, 8, 8))
    with pytest.warns(UserWarning, match="single layer"):
        ErrorModulation(single).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ErrorModulation(single, measure_only=True).remove()  # measuring one layer is fine
