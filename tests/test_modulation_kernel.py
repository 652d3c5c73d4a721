"""The fused Triton kernel of the modulation (timm_ortho.modulation_kernel) against the aten path.

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors. The
interpreter computes ``log``/``exp`` with numpy, so scales may differ from aten's in the last bit,
and it truncates float32 to bfloat16 where a GPU rounds to nearest: the comparisons are exact for
float32 and float16 products of equal scales, and to float32 rounding for the scales themselves.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import timm_ortho.modulation_kernel as mk
from timm_ortho.modulation import ErrorModulation
from timm_ortho.modulation_rule import log_scale, next_log_ref

pytest.importorskip("triton")
# The interpreter evaluates log(0) and inf - inf with numpy, which warns; the results are checked.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture
def interpreted(monkeypatch):
    """The kernel compiled for Triton's interpreter, applied to CPU tensors; restored afterwards."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(mk, "_INTERPRET", True)
    mk._kernel.cache_clear()
    yield
    mk._kernel.cache_clear()


NORMS = st.one_of(
    st.floats(1e-20, 1e20),
    st.sampled_from([0.0, math.inf, math.nan]),
)
RULES = st.fixed_dictionaries(
    {
        "band": st.sampled_from([1.0, 1.1, 2.0, math.inf]),
        "mode": st.sampled_from(["clamp", "match"]),
        "max_scale": st.sampled_from([None, 1.5]),
        "reference": st.sampled_from(["top", "previous"]),
        "statistic": st.sampled_from(["total", "mean"]),
    }
)


def aten_rule(g, norm, log_ref, *, band, mode, max_scale, reference, statistic):
    """What the eager hook computes for a layer below the top (modulation.py, aten path)."""
    log_n = norm.log()
    if statistic == "mean":
        log_n = log_n - 0.5 * math.log(g.numel())
    log_s = log_scale(log_n, log_ref, band, mode, max_scale)
    after = log_n + log_s if reference == "previous" else log_n
    return g * log_s.exp(), log_n, log_s, log_s.exp(), next_log_ref(after, log_ref, reference)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(norm=NORMS, ref=NORMS, rule=RULES, numel=st.integers(1, 3000), seed=st.integers(0, 2**16))
def test_fused_rule_equals_the_aten_rule(interpreted, norm, ref, rule, numel, seed) -> None:
    g = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    norm_t = torch.tensor(norm, dtype=torch.float32)
    log_ref = torch.tensor(ref, dtype=torch.float32).log()
    out, *fused = mk.fused_modulate(g, norm_t, log_ref, **rule)
    want_out, *want = aten_rule(g, norm_t, log_ref, **rule)
    names = ("log_n", "log_s", "scale", "next_ref")
    for name, a, b in zip(names, fused, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6, equal_nan=True, msg=name)
    scale = fused[2]
    # Exactly 1 where the aten rule gives exactly 1 (inside the band, invalid moments), and then the
    # error is copied bit for bit; elsewhere the product is the error times the kernel's own scale.
    if want[2] == 1:
        assert scale == 1
        assert torch.equal(out, g)
    assert torch.equal(out, g * scale)
    if torch.equal(scale, want[2]):
        assert torch.equal(out, want_out)


def _chain(dtype: torch.dtype = torch.float32, channels_last: bool = False):
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1)]
    for width in (1.0, 3.0, 0.3, 2.0, 0.5, 1.0):
        conv = nn.Conv2d(8, 8, 3, padding=1)
        nn.init.orthogonal_(conv.weight, gain=width)  # mismatched gains: the rule has work to do
        layers += [nn.ReLU(), conv]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).to(dtype)
    x = torch.randn(4, 3, 6, 6, dtype=dtype)
    if channels_last:
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    return model, x


def _backward(kernel: str, options: dict, dtype=torch.float32, channels_last=False, autocast=None):
    options = dict(options)
    model, x = _chain(dtype, channels_last)
    band = options.pop("band")
    with ErrorModulation(model, kernel=kernel, band=3.0, **options) as em:
        em.band = band  # the rule's options are read at every backward, in both paths
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = nn.functional.cross_entropy(model(x), torch.arange(4))
        loss.backward()
        stats = em.last_stats()
    return [p.grad for p in model.parameters()], stats


@pytest.mark.parametrize(
    "options",
    [
        {"band": 1.1},
        {"band": 1.3, "mode": "clamp", "reference": "previous"},
        {"band": 1.2, "statistic": "mean", "max_scale": 1.5},
    ],
)
@pytest.mark.parametrize(("channels_last", "autocast"), [(False, None), (True, None), (False, torch.float16)])
def test_fused_hooks_train_like_the_aten_hooks(interpreted, options, channels_last, autocast) -> None:
    grads_aten, stats_aten = _backward("aten", options, channels_last=channels_last, autocast=autocast)
    grads_fused, stats_fused = _backward("triton", options, channels_last=channels_last, autocast=autocast)
    assert (stats_aten.scale != 1).sum() >= 1  # the rule did something
    assert torch.equal(stats_aten.scale == 1, stats_fused.scale == 1)
    torch.testing.assert_close(stats_fused.scale, stats_aten.scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(stats_fused.q_before, stats_aten.q_before, rtol=1e-5, atol=0)
    for a, b in zip(grads_aten, grads_fused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_fused_kernel_launches_no_aten_compute(monkeypatch, dispatched) -> None:
    # Below the top, a layer's hook dispatches the norm and only allocations and views besides: the
    # rule and the multiply are the Triton launch (recorded here instead of run).
    launches = []

    class Launch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(grid)

    monkeypatch.setattr(mk, "_INTERPRET", True)  # CPU tensors count as the kernel's
    monkeypatch.setattr(mk, "_kernel", lambda: Launch())

    model, x = _chain()
    layers = 7
    with ErrorModulation(model, kernel="triton", band=1.1):
        loss = nn.functional.cross_entropy(model(x), torch.arange(4))
        hooked = dispatched(loss.backward)
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), torch.arange(4))
    extra = hooked - dispatched(loss.backward)
    assert len(launches) == layers - 1  # one per layer below the top
    assert extra["linalg_vector_norm"] == layers
    assert extra["log"] == 1  # the top's log-norm sets the reference
    no_kernel = {"empty", "empty_like", "unbind", "linalg_vector_norm", "log"}
    assert set(extra) <= no_kernel, extra


def test_triton_kernel_on_cpu_uses_the_aten_path() -> None:
    # Not interpreted: a CPU error is not the kernel's, and the hooks compute exactly as kernel="aten".
    options = {"band": 1.1}
    grads_aten, stats_aten = _backward("aten", options)
    grads_fused, stats_fused = _backward("triton", options)
    assert torch.equal(stats_aten.scale, stats_fused.scale)
    for a, b in zip(grads_aten, grads_fused, strict=True):
        assert torch.equal(a, b)


def test_unknown_kernel_is_refused() -> None:
    model, _ = _chain()
    with pytest.raises(ValueError, match="kernel must be one of"):
        ErrorModulation(model, kernel="cuda")


def test_create_graph_keeps_the_differentiable_aten_path(interpreted) -> None:
    # Under backward(create_graph=True) the rescaled error must carry its graph; the kernel's output
    # would not, so those hooks take the aten path: first derivatives equal kernel="aten"'s bit for
    # bit, and second derivatives flow through the rescaling. (The second backward's own errors do
    # not require grad: the kernel rescales them, equal to the aten path up to rounding.)
    first, second = [], []
    for kernel in ("aten", "triton"):
        model, x = _chain()
        with ErrorModulation(model, kernel=kernel, band=1.1):
            loss = nn.functional.cross_entropy(model(x), torch.arange(4))
            (grad,) = torch.autograd.grad(loss, model[0].weight, create_graph=True)
            assert grad.requires_grad
            first.append(grad.detach())
            second.append(torch.autograd.grad(grad.square().sum(), model[0].weight)[0])
    assert torch.equal(first[1], first[0])
    torch.testing.assert_close(second[1], second[0], rtol=1e-5, atol=1e-8)
