"""timm's optimizer factory and train.py conventions: timm's param groups, resume, AMP, the runner.

Every check builds the same optimizer twice, once plainly through timm and once through
``timm_ortho.create_optimizer``, and compares them: the wrapped one must differ only by the wrapper and
by the absence of weight decay on the regularized weights.
"""

import argparse
import copy
import logging
import subprocess
import sys
import warnings

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.optim.lookahead import Lookahead
from torch import nn

from timm_ortho import OrthoModulated, create_optimizer, create_ortho_optimizer
from timm_ortho.factory import ORTHO_OPTIONS, routed
from timm_ortho.optim import GROUP_FIELDS


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    """A model with ``no_weight_decay()`` (pos_embed, cls_token) and 2-D parameters outside the targets."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, num_classes=3)


def _layout(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict]:
    """Per parameter name: the fields of its group other than the wrapper's own."""
    names = {id(p): n for n, p in model.named_parameters()}
    layout = {}
    for group in opt.param_groups:
        fields = {
            k: v for k, v in group.items() if k != "params" and k != "ortho_step" and k not in GROUP_FIELDS
        }
        for p in group["params"]:
            layout[names[id(p)]] = fields
    return layout


def _assert_timm_groups_except_target_decay(model, plain, ortho):
    targets = {n for n, p in model.named_parameters() if any(p is t.param for t in ortho.targets)}
    expected, got = _layout(model, plain), _layout(model, ortho)
    assert set(got) == set(expected)
    for name, fields in expected.items():
        if name in targets:
            assert got[name] == {**fields, "weight_decay": 0.0}, name
        else:
            assert got[name] == fields, name


# --- timm's registry is left alone --------------------------------------------------------------


def test_importing_the_package_changes_nothing_in_timms_optimizer_registry():
    code = (
        "import timm.optim as o; from timm.optim._optim_factory import default_registry as r; "
        "before = (o.list_optimizers(), r.create_optimizer); import timm_ortho; "
        "print(before == (o.list_optimizers(), r.create_optimizer), len(before[0]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "True"


@pytest.mark.parametrize(
    ("name", "base_cls", "nesterov"),
    [
        ("ortho_sgd", torch.optim.SGD, True),
        ("momentum", torch.optim.SGD, False),
        ("ortho_adamw", None, None),
    ],
)
def test_the_factory_wraps_the_optimizer_timm_builds(vit, name, base_cls, nesterov):
    opt = create_optimizer(vit, name, lr=0.01, weight_decay=0.05, ortho_decay=1e-3)
    plain = create_optimizer_v2(vit, name.removeprefix("ortho_"), lr=0.01, weight_decay=0.05)
    assert isinstance(opt, OrthoModulated) and type(opt.base_optimizer) is type(plain)
    if base_cls is not None:
        assert opt.param_groups[0]["nesterov"] is nesterov
    assert {g["ortho_decay"] for g in opt.param_groups} == {1e-3}


def test_lookahead_inside_the_wrapper(vit):
    opt = create_optimizer(vit, "ortho_lookahead_adamw", lr=1e-3, weight_decay=0.05)
    assert isinstance(opt.base_optimizer, Lookahead) and opt.form == "decoupled"
    vit(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    assert opt.ortho_step == 1 and opt.param_groups[0]["lookahead_step"] == 1


@pytest.mark.parametrize("bad", ["lookahead_ortho_adamw", "ortho_ortho_sgd"])
def test_misplaced_prefix_is_a_clear_error(vit, bad):
    with pytest.raises(ValueError, match="must come first"):
        create_optimizer(vit, bad, lr=0.1)


@pytest.mark.parametrize(
    ("bad", "hint"), [("ortho_foo", "timm's registry has no 'foo'"), ("adamww", "adamw")]
)
def test_unknown_names_and_misspelt_options_fail_before_anything_is_built(vit, bad, hint):
    with pytest.raises(ValueError, match="unknown optimizer") as info:
        create_optimizer(vit, bad, lr=0.1)
    assert hint in str(info.value)
    with pytest.raises(TypeError, match="did you mean 'ortho_decay'"):
        create_optimizer(vit, "sgd", lr=0.1, ortho_decayy=1e-4)
    with pytest.raises(TypeError, match="lr must be a number"):
        create_optimizer(vit, "sgd", lr="0.1")
    with pytest.raises(TypeError, match="did you mean 'ortho_decay'"):  # the runner's path too
        routed(create_optimizer_v2)(vit, "ortho_sgd", lr=0.1, ortho_decayy=1e-4)


def test_parameters_instead_of_the_model_is_a_clear_error(vit):
    with pytest.raises(TypeError, match="pass the model itself"):
        create_optimizer(list(vit.parameters()), "sgd", lr=0.1)
    with pytest.raises(ValueError, match="pass the model"):
        routed(create_optimizer_v2)(list(vit.parameters()), "ortho_sgd", lr=0.1)


def test_plain_names_go_to_timm_through_the_runner_factory(vit):
    opt = routed(create_optimizer_v2)(vit, "sgd", lr=0.1, weight_decay=0.05)
    assert type(opt) is torch.optim.SGD
    with pytest.raises(TypeError, match="use 'ortho_sgd'"):  # --opt sgd --opt-kwargs ortho_decay=...
        routed(create_optimizer_v2)(vit, "sgd", lr=0.1, ortho_decay=1e-4)


# --- timm's parameter-group semantics -----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"filter_bias_and_bn": False},
        {"layer_decay": 0.7},
        {"param_group_fn": lambda m: [{"params": list(m.parameters()), "weight_decay": 0.05}]},
    ],
    ids=["default", "no_filter_bias_and_bn", "layer_decay", "param_group_fn"],
)
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_groups_are_timms_except_no_decay_on_targets(vit, kwargs, opt_name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the groups are built right: nothing to warn about
        ortho = create_optimizer(vit, opt_name, lr=0.01, weight_decay=0.05, **kwargs)
    plain = create_optimizer_v2(vit, opt_name, lr=0.01, weight_decay=0.05, **kwargs)
    _assert_timm_groups_except_target_decay(vit, plain, ortho)
    layout = _layout(vit, ortho)
    if "param_group_fn" not in kwargs:  # timm's no_weight_decay() list is honoured
        assert layout["pos_embed"]["weight_decay"] == layout["cls_token"]["weight_decay"] == 0.0
    else:  # the custom groups decay everything but the targets
        assert layout["pos_embed"]["weight_decay"] == 0.05
    if "layer_decay" in kwargs:
        scales = {g["lr_scale"] for g in plain.param_groups}
        assert {g["lr_scale"] for g in ortho.param_groups} == scales and len(scales) > 2


def test_create_ortho_optimizer_is_the_same_factory(vit):
    a = create_ortho_optimizer(vit, "adamw", lr=0.01, weight_decay=0.05, layer_decay=0.7, ortho_decay=2e-4)
    b = routed(create_optimizer_v2)(
        vit, "ortho_adamw", lr=0.01, weight_decay=0.05, layer_decay=0.7, ortho_decay=2e-4
    )
    assert _layout(vit, a) == _layout(vit, b) and a.form == b.form == "decoupled"
    assert [t.name for t in a.targets] == [t.name for t in b.targets]
    excluded = create_ortho_optimizer(vit, "sgd", lr=0.1, target_kwargs={"exclude": ["head.*"]})
    assert "head.weight" not in {t.name for t in excluded.targets}


def test_what_the_wrapper_did_is_one_log_line(vit, caplog):
    with caplog.at_level(logging.INFO, logger="timm_ortho"):
        create_optimizer(vit, "ortho_sgd", lr=0.1, weight_decay=0.05)
    (record,) = [r for r in caplog.records if r.name == "timm_ortho"]
    message = record.getMessage()
    assert "orthonormality term on 10 conv/linear weights" in message and "not a plain chain" in message


# --- what timm's train.py does ------------------------------------------------------------------


def _train_py_optimizer(model: nn.Module, opt: str, opt_kwargs: dict) -> torch.optim.Optimizer:
    """As timm's train.py under the runner: ``create_optimizer_v2(model, **optimizer_kwargs(cfg=args),
    **args.opt_kwargs)`` with the runner's binding of ``create_optimizer_v2``."""
    args = argparse.Namespace(
        opt=opt,
        lr=0.05,
        weight_decay=1e-4,
        momentum=0.9,
        opt_eps=None,
        opt_betas=None,
        layer_decay=None,
        opt_kwargs=opt_kwargs,
    )
    return routed(create_optimizer_v2)(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)


def test_train_py_opt_kwargs_reach_the_wrapper():
    model = timm.create_model("plain_cnn20", num_classes=2)
    opt = _train_py_optimizer(
        model, "ortho_momentum", {"ortho_decay": 1e-4, "modulation": True, "exclude": ["head.fc.weight"]}
    )
    assert opt.modulation is not None and opt.param_groups[0]["ortho_decay"] == 1e-4
    assert opt.form == "coupled" and len(opt.targets) == 19
    opt.remove_hooks()
    assert set(ORTHO_OPTIONS) >= {"ortho_decay", "modulation", "form"}


def _run(model, opt, xs, ys, scaler=None):
    for x, y in zip(xs, ys, strict=True):
        loss = nn.functional.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler(loss, opt)  # timm's NativeScaler: backward, unscale, step, update
        opt.zero_grad()


@pytest.mark.parametrize("opt_name", ["ortho_momentum", "ortho_adamw"])
def test_timm_resume_checkpoint_continues_exactly(tmp_path, opt_name):
    """Save as train.py does, load with timm's resume_checkpoint: the run continues bit for bit."""
    from timm.models import resume_checkpoint

    torch.manual_seed(0)
    xs = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    ys = [torch.randint(0, 2, (4,)) for _ in range(4)]
    kwargs = {"ortho_decay": 1e-3, "modulation": True}
    model = timm.create_model("plain_cnn20", num_classes=2)
    start = copy.deepcopy(model.state_dict())
    opt = _train_py_optimizer(model, opt_name, kwargs)
    _run(model, opt, xs[:2], ys[:2])
    path = tmp_path / "last.pth.tar"
    # the fields of timm's CheckpointSaver (version 2: the saved epoch is complete)
    state = {"epoch": 0, "version": 2, "state_dict": model.state_dict(), "optimizer": opt.state_dict()}
    torch.save(state, path)
    _run(model, opt, xs[2:], ys[2:])

    resumed = timm.create_model("plain_cnn20", num_classes=2)
    resumed.load_state_dict(start)
    opt2 = _train_py_optimizer(resumed, opt_name, kwargs)
    assert resume_checkpoint(resumed, str(path), optimizer=opt2, log_info=False) == 1
    assert opt2.ortho_step == 2 and opt2.modulation.step == 2
    _run(resumed, opt2, xs[2:], ys[2:])
    for (n, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_ema_grad_accumulation_and_timm_native_scaler():
    """train.py's EMA (ModelEmaV3 after the optimizer), accumulation (step every N) and NativeScaler."""
    from timm.utils import ModelEmaV3, NativeScaler

    torch.manual_seed(0)
    model = timm.create_model("plain_cnn20", num_classes=2)
    opt = _train_py_optimizer(model, "ortho_momentum", {"ortho_decay": 1e-3, "modulation": True})
    ema = ModelEmaV3(model, decay=0.5)
    scaler = NativeScaler(device="cpu")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 2, (4,))
    for step in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y) / 2
        scaler(loss, opt, need_update=step % 2 == 1)  # timm's accumulation: update every second call
        if step % 2 == 1:
            opt.zero_grad()
            ema.update(model)
    assert opt.ortho_step == 2
    ema.module.eval()
    with torch.no_grad():
        out = ema.module(x)
    assert torch.isfinite(out).all()
    assert not torch.equal(ema.module.stem.conv.weight, model.stem.conv.weight)


def test_skipped_amp_step_applies_nothing():
    """A GradScaler step with an inf gradient skips the update: the term is not applied either."""
    from timm.utils import NativeScaler

    model = timm.create_model("plain_cnn20", num_classes=2)
    opt = _train_py_optimizer(model, "ortho_sgd", {"ortho_decay": 1e-2})
    before = copy.deepcopy(model.state_dict())
    scaler = NativeScaler(device="cpu")
    loss = model(torch.randn(2, 3, 8, 8)).sum() * float("inf")
    scaler(loss, opt)
    assert opt.ortho_step == 0
    for n, v in model.state_dict().items():
        if n.endswith("weight"):
            assert torch.equal(v, before[n]), n


def test_param_groups_for_ortho_follow_timms_decay_rules(vit):
    """The hand-built groups: targets without decay, the rest as timm's param_groups_weight_decay."""
    from timm.optim import param_groups_weight_decay

    from timm_ortho import param_groups_for_ortho

    groups = param_groups_for_ortho(vit, 0.05, exclude=["head.*"])
    names = {id(p): n for n, p in vit.named_parameters()}
    got = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    timm_groups = param_groups_weight_decay(vit, 0.05, no_weight_decay_list=vit.no_weight_decay())
    expected = {names[id(p)]: g["weight_decay"] for g in timm_groups for p in g["params"]}
    targets = {n for n in expected if n.endswith(".weight") and n != "head.weight" and expected[n]}
    assert got == {n: 0.0 if n in targets else wd for n, wd in expected.items()}
    assert got["pos_embed"] == 0.0 and got["head.weight"] == 0.05 and len(targets) == 9  # conv + 8 linear
