"""OrthoModulated as an optimizer: exact updates, torch.optim conventions, AMP, Accelerate, timm."""

from __future__ import annotations

import copy
import io
import math

import pytest
import timm
import torch
from torch import nn

from timm_ortho import OrthoModulated, param_groups_for_ortho
from timm_ortho.diagnostics import layer_penalties
from timm_ortho.ortho import orthonormality_grad, orthonormality_penalty
from timm_ortho.targets import find_targets


def tiny_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 20),  # fat classifier: 20 filters of 16 inputs, group-wise
    ).to(dtype)


def batch(seed: int, n: int = 4, size: int = 8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=dtype), torch.randint(0, 20, (n,), generator=g)


def train(model, opt, steps: int, first: int = 0, scaler=None):
    for s in range(first, first + steps):
        x, y = batch(s)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()


def assert_bit_identical(a: nn.Module, b: nn.Module):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_everything_off_is_bit_identical_to_the_bare_optimizer(make):
    bare_model, wrapped_model = tiny_net(), tiny_net()
    bare = make(bare_model.parameters())
    wrapped = OrthoModulated(
        make(wrapped_model.parameters()),
        wrapped_model,
        ortho_decay=0.0,
        max_grad_ratio=None,
        modulation=False,
    )
    train(bare_model, bare, 5)
    train(wrapped_model, wrapped, 5)
    assert_bit_identical(bare_model, wrapped_model)
    assert wrapped.ortho_step == 5


def test_coupled_step_adds_the_closed_form_gradient():
    model = tiny_net(dtype=torch.float64)
    opt = OrthoModulated(
        torch.optim.SGD(model.parameters(), lr=0.3), model, ortho_decay=0.02, max_grad_ratio=None
    )
    assert opt.form == "coupled"
    x, y = batch(1, dtype=torch.float64)
    nn.functional.cross_entropy(model(x), y).backward()
    before = {t.name: (t.param.detach().clone(), t.param.grad.clone()) for t in opt.targets}
    opt.step()
    for t in opt.targets:
        w, g = before[t.name]
        reg = orthonormality_grad(t.matrix(w), 0.02).reshape(w.shape)
        torch.testing.assert_close(t.param.detach(), w - 0.3 * (g + reg), rtol=0, atol=1e-14)


def test_decoupled_step_for_adam_matches_a_manual_adamw():
    model = tiny_net(dtype=torch.float64)
    reference = copy.deepcopy(model)
    opt = OrthoModulated(
        torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0),
        model,
        ortho_decay=0.5,
        max_grad_ratio=None,
    )
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.0)
    assert opt.form == "decoupled"
    for s in range(3):
        x, y = batch(s, dtype=torch.float64)
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
        with torch.no_grad():  # W <- W - lr * 2 lambda (W W^T - I) W, then Adam
            for t in find_targets(reference):
                t.param.sub_(0.01 * orthonormality_grad(t.matrix(t.param), 0.5).reshape(t.param.shape))
        opt.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13)


def test_penalty_matches_the_formula_and_follows_the_group_field():
    model = tiny_net(dtype=torch.float64)
    opt = OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.1), model, ortho_decay=0.3)
    expected = sum(orthonormality_penalty(t.matrix().detach(), 0.3).sum() for t in opt.targets)
    torch.testing.assert_close(opt.penalty().double(), expected, rtol=1e-6, atol=0)
    measured = layer_penalties(opt.targets)  # what a logging loop has already computed
    assert torch.equal(opt.penalty(measured), opt.penalty())
    with pytest.raises(ValueError, match="one value per target"):
        opt.penalty(measured[:-1])
    for group in opt.param_groups:  # what a scheduler driving "ortho_decay" does
        group["ortho_decay"] = 0.0
    assert opt.penalty() == 0
    x, y = batch(0, dtype=torch.float64)
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [t.param.grad.clone() for t in opt.targets]
    opt.apply_orthonormality()
    assert all(torch.equal(g, t.param.grad) for g, t in zip(grads, opt.targets, strict=True))


def test_weight_decay_on_targets_is_refused_with_the_way_to_build_the_groups():
    model = tiny_net()
    base = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=5e-4)
    groups = [dict(g) for g in base.param_groups]
    with pytest.raises(ValueError, match="replaces weight decay") as info:
        OrthoModulated(base, model)
    assert "param_groups_for_ortho" in str(info.value) and "create_optimizer" in str(info.value)
    assert [dict(g) for g in base.param_groups] == groups  # the refusal changed nothing
    opt = OrthoModulated(torch.optim.SGD(param_groups_for_ortho(model, weight_decay=5e-4), lr=0.1), model)
    target_ids = {id(t.param) for t in opt.targets}
    for group in opt.param_groups:
        for p in group["params"]:
            assert group["weight_decay"] == 0 or id(p) not in target_ids


def test_param_groups_helper_needs_no_split():
    model = tiny_net()
    base = torch.optim.SGD(param_groups_for_ortho(model, weight_decay=1e-4), lr=0.1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = OrthoModulated(base, model)
    assert len(opt.param_groups) == 2


def test_checkpoint_resumes_bit_identically_and_loads_without_the_wrapper():
    def make(model):
        return OrthoModulated(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, ortho_decay=0.01
        )

    straight = tiny_net()
    opt = make(straight)
    train(straight, opt, 6)

    first = tiny_net()
    opt1 = make(first)
    train(first, opt1, 3)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = tiny_net(seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    assert opt2.ortho_step == 3
    train(resumed, opt2, 3, first=3)
    assert_bit_identical(straight, resumed)

    bare = torch.optim.SGD(tiny_net().parameters(), lr=0.05, momentum=0.9)
    bare.load_state_dict(saved["opt"])  # the wrapper's fields ride along harmlessly
    assert bare.param_groups[0]["ortho_decay"] == 0.01
    wrapped_again = make(tiny_net())
    wrapped_again.load_state_dict(torch.optim.SGD(tiny_net().parameters(), lr=0.05).state_dict())
    assert wrapped_again.param_groups[0]["ortho_decay"] == 0.01  # defaults restored after a bare load


def test_grad_scaler_skips_overflowing_steps_and_sees_unscaled_grads():
    model, reference = tiny_net(), tiny_net()
    opt = OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.1), model, ortho_decay=0.05)
    ref_opt = OrthoModulated(torch.optim.SGD(reference.parameters(), lr=0.1), reference, ortho_decay=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = batch(0)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    opt.targets[1].param.grad[0, 0, 0, 0] = float("inf")
    before = copy.deepcopy(model.state_dict())
    scaler.step(opt)
    scaler.update()
    for name, value in model.state_dict().items():
        if "num_batches_tracked" not in name and "running" not in name:
            assert torch.equal(value, before[name]), name
    assert opt.ortho_step == 0 and scaler.get_scale() < 2.0**12

    # A good step under the scaler equals the same step without one: scaling by a power of two is
    # exact in float32, so a wrapper that saw scaled gradients would show up as a mismatch.
    opt.zero_grad()
    reference.load_state_dict(model.state_dict())
    for m, o, s in ((model, opt, scaler), (reference, ref_opt, None)):
        loss = nn.functional.cross_entropy(m(x), y)
        (s.scale(loss) if s else loss).backward()
        if s:
            s.unscale_(o)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1e6)  # clip after unscale works
            s.step(o)
            s.update()
        else:
            o.step()
    assert opt.ortho_step == 1
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_bf16_parameters_get_a_float32_update():
    model = tiny_net().to(torch.bfloat16)
    opt = OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.1), model, ortho_decay=0.1)
    x, y = batch(0, dtype=torch.bfloat16)
    nn.functional.cross_entropy(model(x).float(), y).backward()
    grads = [t.param.grad.clone() for t in opt.targets]
    opt.apply_orthonormality()
    for g, t in zip(grads, opt.targets, strict=True):
        expected = g.float() + orthonormality_grad(t.matrix().detach(), 0.1).reshape(g.shape)
        assert t.param.grad.dtype == torch.bfloat16
        torch.testing.assert_close(t.param.grad.float(), expected, rtol=1e-2, atol=1e-2)


def test_accelerate_gradient_accumulation_applies_the_term_once_per_update(monkeypatch):
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=4, cpu=True)
    model = tiny_net()
    opt = OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.1), model, ortho_decay=0.01)
    calls = []
    original = opt.apply_orthonormality
    monkeypatch.setattr(opt, "apply_orthonormality", lambda: calls.append(1) or original())
    model, prepared = accelerator.prepare(model, opt)
    for s in range(8):
        x, y = batch(s)
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.cross_entropy(model(x), y))
            prepared.step()
            prepared.zero_grad()
    assert len(calls) == 2
    assert opt.ortho_step == 2


def expected_target_names(model: nn.Module) -> set[str]:
    """Independent enumeration: every Conv/Linear module weight except depthwise convs."""
    names = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or (isinstance(m, nn.modules.conv._ConvNd) and not m.transposed):
            if getattr(m, "groups", 1) > 1 and m.groups == m.in_channels:
                continue
            names.add(f"{name}.weight")
    return names


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("resnet18", {}),
        ("efficientnet_b0", {}),
        ("convnext_atto", {}),
        ("regnetx_002", {}),
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}),
    ],
)
def test_one_step_on_timm_families(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs)
    opt = OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), model)
    assert {t.name for t in opt.targets} == expected_target_names(model)
    roles = {t.role for t in opt.targets}
    assert {"stem", "classifier"} <= roles
    x = torch.randn(2, 3, 32, 32)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 3]))
    assert torch.isfinite(loss)
    loss.backward()
    before = {t.name: t.param.detach().clone() for t in opt.targets}
    opt.step()
    moved = [n for n, w in before.items() if not torch.equal(w, dict(model.named_parameters())[n])]
    assert set(moved) == set(before)


def test_clear_errors_for_bad_input():
    model = tiny_net()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="non-negative"):
        OrthoModulated(sgd, model, ortho_decay=-1e-4)
    with pytest.raises(ValueError, match="no trainable"):
        norm_only = nn.Sequential(nn.BatchNorm2d(3))
        OrthoModulated(torch.optim.SGD(norm_only.parameters(), lr=0.1), norm_only)
    with pytest.raises(ValueError, match="does not own"):
        OrthoModulated(torch.optim.SGD(tiny_net().parameters(), lr=0.1), model)
    with pytest.raises(ValueError, match="exclude"):
        OrthoModulated(sgd, model, include=["*.nothing"])
    wrapped = OrthoModulated(sgd, model)
    with pytest.raises(ValueError, match="already wrapped"):
        OrthoModulated(wrapped, model)
    with pytest.raises(ValueError, match="form"):
        OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.1), model, form="sideways")


@pytest.mark.parametrize("bad", [math.inf, math.nan, -1.0, "1e-4", True])
def test_ortho_decay_is_checked_at_construction_and_at_every_step(bad):
    model = tiny_net()
    with pytest.raises(ValueError, match="ortho_decay must be a finite, non-negative number"):
        OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.1), model, ortho_decay=bad)
    opt = OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.1), model)
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["ortho_decay"] = bad  # e.g. a scheduler gone wrong, after wrapping
    with pytest.raises(ValueError, match="param group 0: ortho_decay"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # untouched
    opt.param_groups[0]["ortho_decay"] = 1e-4
    opt.param_groups[0]["max_grad_ratio"] = -0.01
    with pytest.raises(ValueError, match="param group 0: max_grad_ratio"):
        opt.step()


def test_a_base_optimizer_is_wrapped_once():
    model = tiny_net()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    first = OrthoModulated(sgd, model)
    groups = [dict(g) for g in sgd.param_groups]
    with pytest.raises(ValueError, match="already wrapped by an OrthoModulated"):
        OrthoModulated(sgd, model)
    assert [dict(g) for g in sgd.param_groups] == groups  # the refusal changed nothing
    del first  # a discarded wrapper (even one held in a reference cycle) frees its base optimizer
    OrthoModulated(sgd, model)


def test_frozen_targets_are_ignored_and_partial_optimizers_work():
    model = tiny_net()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = OrthoModulated(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), model)
    assert "0.weight" not in {t.name for t in opt.targets}


def test_optimizer_protocol_hooks_closure_zero_grad_and_repr():
    model = tiny_net()
    opt = OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.1), model, ortho_decay=0.01)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss) and seen == ["pre", "post"]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    extra = nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra]})
    assert opt.param_groups[-1]["ortho_decay"] == 0.01
    groups = len(opt.param_groups)
    with pytest.raises(ValueError, match="non-negative"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "ortho_decay": -1.0})
    assert len(opt.param_groups) == groups  # a rejected group is not half-added
    text = repr(opt)
    assert "OrthoModulated" in text and "SGD" in text and "targets: 4" in text
    assert opt.state is opt.base_optimizer.state
    assert opt.defaults is opt.base_optimizer.defaults
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(closure)
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


# --- faults found trying the project as a new user (each failed before its fix) -----------------


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.0),
    ],
    ids=["coupled", "decoupled"],
)
def test_the_step_bound_holds_in_both_forms(make):
    """With zero data gradients the only step is the orthonormality term's: the bound must hold it to
    ``lr * ratio * ||W||`` per layer in the decoupled form as in the coupled one."""
    model = tiny_net()
    with torch.no_grad():
        for t in find_targets(model):
            t.param.mul_(5.0)  # far from orthonormal: a large cubic term
    opt = OrthoModulated(
        make(model.parameters()), model, ortho_decay=1e-2, max_grad_ratio=0.01, modulation=False
    )
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {t.name: t.param.detach().clone() for t in opt.targets}
    opt.step()
    for t in opt.targets:
        moved = (t.param.detach() - before[t.name]).norm() / before[t.name].norm()
        assert moved <= 0.1 * 0.01 * (1 + 1e-5), (t.name, float(moved))


def test_lbfgs_steps_through_the_wrapper_and_minimizes_loss_plus_penalty():
    model = tiny_net(dtype=torch.float64)
    opt = OrthoModulated(
        torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5),
        model,
        ortho_decay=0.1,
        max_grad_ratio=None,
        modulation=False,
    )
    x, y = batch(0, dtype=torch.float64)
    calls = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        calls.append(float(loss.detach()))
        return loss

    def objective_now() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(x), y) + opt.penalty())

    objective = [objective_now()]
    for _ in range(3):
        returned = opt.step(closure)
        objective.append(objective_now())
    assert len(calls) > 3  # LBFGS evaluated the closure several times per step
    assert objective[-1] < objective[0]  # the objective it minimized is loss + R
    assert torch.isfinite(returned) and opt.ortho_step == 3


def _closure_steps(name: str) -> str | None:
    """Two closure steps of timm's optimizer ``name`` through the wrapper; a failure as text."""
    from timm.optim import create_optimizer_v2

    model = tiny_net()
    try:
        base = create_optimizer_v2(model, name, lr=1e-2)
    except (ImportError, TypeError, ValueError, RuntimeError, AssertionError):
        return None  # an optional back end (apex, bitsandbytes on a GPU, ...) or a distributed-only one
    opt = OrthoModulated(base, model, modulation=False)
    x, y = batch(0)
    calls = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward(create_graph=getattr(base, "is_second_order", False))
        calls.append(1)
        return loss

    before = [t.param.detach().clone() for t in opt.targets]
    try:
        for _ in range(2):  # some (Adopt) make no update on their first step
            opt.step(closure)
    except Exception as e:
        return f"{name}: {type(e).__name__}: {e}"
    if len(calls) < 2 or all(torch.equal(b, t.param) for b, t in zip(before, opt.targets, strict=True)):
        return f"{name}: {len(calls)} closure calls, weights moved: no"
    return None


def test_every_closure_optimizer_of_timms_registry_steps_through_the_wrapper():
    from timm.optim import get_optimizer_info, list_optimizers

    classes = {
        get_optimizer_info(n).opt_class: n for n in reversed(list_optimizers()) if not n.startswith("ortho_")
    }
    failures = [f for f in map(_closure_steps, classes.values()) if f is not None]
    assert not failures, failures


def test_a_state_saved_by_a_differently_grouped_optimizer_is_refused_with_the_reason():
    model = tiny_net()
    bare = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    bare.step()
    opt = OrthoModulated(
        torch.optim.SGD(param_groups_for_ortho(model, weight_decay=1e-4), lr=0.1, momentum=0.9), model
    )
    with pytest.raises(ValueError, match="param group") as info:
        opt.load_state_dict(bare.state_dict())
    assert "1 param group" in str(info.value) and "param_groups_for_ortho" in str(info.value)


def test_parameters_instead_of_the_model_and_a_string_lr_are_named():
    model = tiny_net()
    with pytest.raises(TypeError, match=r"model must be the nn\.Module"):
        OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.1), model.parameters())
    opt = OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.1), model)
    opt.param_groups[0]["lr"] = "0.1"  # e.g. a config value that was never converted
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="param group 0: lr must be a number"):
        opt.step()


def test_repr_says_off_and_what_the_wrapper_does():
    model = tiny_net()
    text = repr(OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.1), model, modulation=False))
    assert "modulation: off" in text and "modulation: None" not in text
