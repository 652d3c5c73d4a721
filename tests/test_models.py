"""The registered model family against timm's model contract and METHOD.md section 5.

Mirrors timm's own model tests (forward, backward, default cfgs, TorchScript, features_only,
forward_intermediates, fx, fx + TorchScript, reset_classifier, grad checkpointing) for every
registered name, at tiny inputs (16x16 CIFAR, 32x32 ImageNet), and
checks the method's claims: the plain nets are a single chain, the layer shapes are the paper's, the
orthonormal init gives orthonormal filters and every CIFAR layer has ``f_in >= f_out``.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import operator
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.fx
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models import FeatureInfo, group_parameters
from torch import nn

import timm_ortho.init
from timm_ortho import find_targets, orthonormality_penalty
from timm_ortho.constants import CIFAR10_MEAN, CIFAR10_STD
from timm_ortho.models.plain_cnn import (
    BasicBlock,
    CifarResNet,
    PadShortcut,
    PlainCnn,
)

ROOT = Path(__file__).resolve().parents[1]
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
CIFAR_PLAIN = [f"plain_cnn{d}" for d in CIFAR_DEPTHS]
CIFAR_RESNET = [f"cifar_resnet{d}" for d in CIFAR_DEPTHS]
IMAGENET = ["plain_cnn44_imagenet", "plain_cnn110_imagenet"]
ALL = CIFAR_PLAIN + CIFAR_RESNET + IMAGENET
# Full API runs of these take several seconds each on a 2-core CPU; the cheap meta-device test below
# still constructs and counts them in the default run.
SLOW = {"plain_cnn1202", "cifar_resnet1202", "plain_cnn110_imagenet"}
IMAGENET_STAGE_CONVS = {44: (8, 10, 16, 8), 110: (10, 13, 75, 10)}


def models(names: list[str]) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def depth_of(name: str) -> int:
    return int(name.removeprefix("plain_cnn").removeprefix("cifar_resnet").removesuffix("_imagenet"))


def is_imagenet(name: str) -> bool:
    return name.endswith("_imagenet")


_BUILT: dict[tuple, nn.Module] = {}


def create(name: str, **kwargs) -> nn.Module:
    """A fresh copy of the model (construction is the costly part of most tests, copies are cheap)."""
    # The init does not matter for API checks; the ImageNet nets' orthonormal init is a few GFLOP
    # of float64 QR, tested separately on narrow variants (and in full under -m slow).
    if is_imagenet(name):
        kwargs.setdefault("init", "msra")
    key = (name, repr(sorted(kwargs.items())))
    if key not in _BUILT:
        _BUILT[key] = timm.create_model(name, **kwargs)
    return copy.deepcopy(_BUILT[key])


def tiny_input(name: str, batch: int = 2, chans: int = 3) -> torch.Tensor:
    size = 32 if is_imagenet(name) else 16
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- registration -----------------------------------------------------------------------------


def test_family_is_registered_on_import():
    assert set(timm.list_models("plain_cnn*")) == set(CIFAR_PLAIN + IMAGENET)
    assert set(timm.list_models("cifar_resnet*")) == set(CIFAR_RESNET)
    assert not timm.list_models("plain_cnn*", pretrained=True)  # no weights are claimed
    model = timm.create_model("plain_cnn110")
    assert isinstance(model, PlainCnn) and model.num_layers == 110
    assert isinstance(timm.create_model("cifar_resnet20"), CifarResNet)


def test_no_name_collides_with_timm_builtins():
    """No timm model module defines one of our names, and the registry maps each to our module."""
    builtin = {
        name
        for mod_name, mod in list(sys.modules.items())
        if mod_name.startswith("timm.models.") and mod is not None
        for name in ALL
        if hasattr(mod, name)
    }
    assert builtin == set()
    for name in ALL:
        assert timm.models.model_entrypoint(name).__module__ == "timm_ortho.models.plain_cnn"


@pytest.mark.slow
def test_import_in_a_fresh_interpreter_warns_nothing():
    """A fresh interpreter: our names are absent before the import and the import warns nothing."""
    code = (
        "import json, warnings, timm\n"
        "before = set(timm.list_models())\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import timm_ortho\n"
        "ours = set(timm.list_models()) - before\n"
        "clash = before & set(timm_ortho.models.plain_cnn.__all__)\n"
        "overwrites = [str(w.message) for w in caught if 'Overwriting' in str(w.message)]\n"
        "print(json.dumps({'ours': sorted(ours), 'clash': sorted(clash), 'warnings': overwrites}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(report["ours"]) == set(ALL)
    assert report["clash"] == [] and report["warnings"] == []


def test_pretrained_true_says_there_are_no_weights():
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("plain_cnn20", pretrained=True)


@pytest.mark.parametrize("init", ["xavier", "", "Orthonormal"])
def test_unknown_init_is_a_clear_error(init):
    with pytest.raises(ValueError, match="orthonormal"):
        timm.create_model("plain_cnn20", init=init)


# --- timm contract ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", models(ALL))
def test_default_cfg(name):
    model = create(name).eval()
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert cfg["first_conv"] == "stem.conv" and "stem.conv.weight" in state
    assert cfg["classifier"] == "head.fc" and "head.fc.weight" in state
    assert not any(cfg.get(k) for k in ("url", "file", "hf_hub_id"))
    paper_ids = cfg["paper_ids"] if isinstance(cfg["paper_ids"], tuple) else (cfg["paper_ids"],)
    assert "arXiv:1703.01827" in paper_ids and cfg["license"] == "apache-2.0"
    if is_imagenet(name):
        assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000
        assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    else:
        assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 10
        assert cfg["mean"] == CIFAR10_MEAN and cfg["std"] == CIFAR10_STD
    assert model.num_classes == cfg["num_classes"] == model.get_classifier().out_features
    data_cfg = timm.data.resolve_data_config(model=model)  # what timm's data pipeline will use
    assert (data_cfg["input_size"], data_cfg["mean"], data_cfg["std"]) == (
        cfg["input_size"],
        cfg["mean"],
        cfg["std"],
    )
    # pool_size is the final map at the cfg's input size
    reduction = model.feature_info[-1]["reduction"]
    assert cfg["pool_size"] == tuple(s // reduction for s in cfg["input_size"][1:])
    assert model.num_features > 0 and model.head_hidden_size == model.num_features


@pytest.mark.parametrize("name", models(ALL))
def test_forward_features_and_head(name):
    model = create(name).eval()
    x = tiny_input(name)
    reduction = model.feature_info[-1]["reduction"]
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
        full = model(x)
    side = math.ceil(x.shape[-1] / reduction)
    assert feats.shape == (2, model.num_features, side, side)
    assert pooled.shape == (2, model.head_hidden_size)
    torch.testing.assert_close(pooled, feats.mean(dim=(2, 3)))
    assert logits.shape == (2, model.num_classes)
    torch.testing.assert_close(full, logits)
    torch.testing.assert_close(logits, model.get_classifier()(pooled))


@pytest.mark.parametrize("name", models(ALL))
def test_reset_classifier_both_ways(name):
    model = create(name).eval()
    x = tiny_input(name)
    with torch.no_grad():
        feats = model.forward_features(x)
        model.reset_classifier(0)
        pooled = model(x)
        assert pooled.shape == (2, model.num_features) and model.num_classes == 0
        model.reset_classifier(0, "")
        unpooled = model(x)
        model.reset_classifier(7, "avg")
        logits = model(x)
    torch.testing.assert_close(pooled, feats.mean(dim=(2, 3)))
    torch.testing.assert_close(unpooled, feats)
    assert logits.shape == (2, 7) and model.get_classifier().out_features == 7
    # the new classifier follows the model's init scheme (bias 0)
    assert torch.count_nonzero(model.get_classifier().bias) == 0
    # the same through __init__
    model = create(name, num_classes=0, global_pool="").eval()
    with torch.no_grad():
        out = model(x)
    assert out.ndim == 4 and out.shape[1] == model.num_features


@pytest.mark.parametrize("name", models(ALL))
def test_forward_intermediates(name):
    model = create(name).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    levels = 5 if is_imagenet(name) else 3
    assert len(info) == levels
    x = tiny_input(name)
    with torch.no_grad():
        out, inter = model.forward_intermediates(x)
        feats = model.forward_features(x)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        first = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        model.set_grad_checkpointing()
        out_ckpt, inter_ckpt = model.forward_intermediates(x)
    torch.testing.assert_close(out, feats)
    assert len(inter) == levels
    for c, r, o in zip(info.channels(), info.reduction(), inter, strict=True):
        assert o.shape == (2, c, math.ceil(x.shape[-2] / r), math.ceil(x.shape[-1] / r))
    for a, b in zip(last2, inter[-2:], strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(first[0], inter[0])
    torch.testing.assert_close(out_ckpt, out)
    for a, b in zip(inter_ckpt, inter, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", models(ALL))
def test_prune_intermediate_layers(name):
    model = create(name).eval()
    x = tiny_input(name)
    with torch.no_grad():
        _, inter = model.forward_intermediates(x)
        kept = model.prune_intermediate_layers(indices=[0, 1])
        _, pruned = model.forward_intermediates(x)
        out = model(x)
    assert kept == [0, 1] and model.num_classes == 0
    assert len(pruned) == 2 and len(model.stages) == (1 if is_imagenet(name) else 2)
    for a, b in zip(pruned, inter[:2], strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out, inter[1])  # the head is now an identity on the last kept level
    assert model.num_features == model.head_hidden_size == model.feature_info[1]["num_chs"]


@pytest.mark.parametrize("name", models(ALL))
def test_features_only(name):
    model = create(name, features_only=True).eval()
    levels = 5 if is_imagenet(name) else 3
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    if is_imagenet(name):
        assert channels == [64, 64, 128, 256, 512] and reductions == [2, 4, 8, 16, 32]
    else:
        assert channels == [16, 32, 64] and reductions == [1, 2, 4]
    x = tiny_input(name)
    with torch.no_grad():
        outs = model(x)
        assert len(outs) == levels
        for c, r, o in zip(channels, reductions, outs, strict=True):
            assert o.shape == (2, c, math.ceil(x.shape[-2] / r), math.ceil(x.shape[-1] / r))
        # the same levels as forward_intermediates of the full model, with its weights
        full = create(name).eval()
        # FeatureListNet flattens `stages.<i>` into `stages_<i>`; map the keys back, the head stays
        state = {k.replace("stages_", "stages.", 1): v for k, v in model.state_dict().items()}
        missing, unexpected = full.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith("head.") for k in missing)
        _, inter = full.forward_intermediates(x)
    for a, b in zip(outs, inter, strict=True):
        torch.testing.assert_close(a, b)
    picked = create(name, features_only=True, out_indices=(-1,))
    assert picked.feature_info.channels() == [channels[-1]]


@pytest.mark.parametrize("feature_cls", ["list", "dict", "hook", "fx", "getter"])
@pytest.mark.parametrize("name", ["plain_cnn20", "cifar_resnet20"])
def test_every_timm_feature_extractor_sees_three_levels(name, feature_cls):
    model = create(name, features_only=True, feature_cls=feature_cls).eval()
    with torch.no_grad():
        outs = model(tiny_input(name))
    outs = list(outs.values()) if isinstance(outs, dict) else outs
    assert [tuple(o.shape[1:]) for o in outs] == [(16, 16, 16), (32, 8, 8), (64, 4, 4)]


@pytest.mark.parametrize("name", models(ALL))
def test_grad_checkpointing_gives_same_output_and_grads(name):
    torch.manual_seed(0)
    model = create(name).train()
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    x = tiny_input(name, batch=4)
    out, out_ckpt = model(x), ckpt(x)
    torch.testing.assert_close(out_ckpt, out)
    out.square().sum().backward()
    out_ckpt.square().sum().backward()
    # Recomputation must reproduce the same numbers, non-finite ones included: at init the error of a
    # plain chain grows toward the bottom and overflows float32 within a few hundred layers (1202).
    assert torch.isfinite(model.get_classifier().weight.grad).all()
    for (n, p), p_ckpt in zip(model.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p_ckpt.grad, p.grad, equal_nan=True, msg=n)


@pytest.mark.parametrize("name", models(ALL))
def test_in_chans_and_drop_rate(name):
    model = create(name, in_chans=1, drop_rate=0.25).eval()
    assert model.stem.conv.in_channels == 1 and model.in_chans == 1
    assert model.head.drop.p == 0.25 and model.drop_rate == 0.25
    with torch.no_grad():
        out = model(tiny_input(name, chans=1))
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", models(ALL))
def test_group_matcher_covers_every_parameter(name):
    model = create(name)
    names = [n for n, _ in model.named_parameters()]
    stages = len(model.stages)
    blocks = sum(len(s) for s in model.stages)
    for coarse, groups in ((True, 1 + stages + 1), (False, 1 + blocks + 1)):
        grouping = group_parameters(model, model.group_matcher(coarse=coarse))
        assert sorted(n for g in grouping.values() for n in g) == sorted(names)
        assert len(grouping) == groups  # stem, then stages or blocks, then the head
        assert all(n.startswith("stem.") for n in grouping[0])


def _script(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated upstream; it still works
        return torch.jit.script(module)


@pytest.mark.parametrize("name", models(ALL))
def test_torchscript_forward(name):
    model = create(name).eval()
    scripted = _script(model)
    x = tiny_input(name)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


# --- timm's tests/test_models.py checks, for every registered name at a tiny size -----------------


@pytest.mark.parametrize("name", models(ALL))
def test_backward_reaches_every_parameter(name):
    """timm's test_model_backward: 42 classes, every parameter gets a gradient, no NaN."""
    model = create(name, num_classes=42).train()
    out = model(tiny_input(name))
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"


def _fx_model(model: nn.Module, train: bool = False) -> nn.Module:
    """The whole model as an fx feature extractor returning its output, traced the way timm's tests do."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(),
        autowrap_functions=get_notrace_functions(),
        param_shapes_constant=True,
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model.train(train),
        train_return_nodes=[train_nodes[-1]],
        eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=tracer_kwargs,
    )


@pytest.mark.parametrize("name", models(ALL))
def test_fx_forward_matches_eager(name):
    """timm's test_model_forward_fx: the traced graph gives exactly the module's output."""
    model = create(name).eval()
    x = tiny_input(name)
    with torch.inference_mode():
        expected = model(x)
        got = torch.cat(tuple(_fx_model(model).eval()(x).values()))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", models(ALL))
def test_fx_backward_reaches_every_parameter(name):
    """timm's test_model_backward_fx."""
    fx_model = _fx_model(create(name, num_classes=42), train=True)
    out = torch.cat(tuple(fx_model(tiny_input(name)).values()))
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    out.mean().backward()
    missing = [n for n, p in fx_model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("name", models(ALL))
def test_fx_then_torchscript(name):
    """timm's test_model_forward_fx_torchscript: script the traced graph (string annotations break it)."""
    with timm.set_scriptable(True):
        model = create(name).eval()
    scripted = _script(_fx_model(model).eval())
    x = tiny_input(name)
    with torch.inference_mode():
        got = torch.cat(tuple(scripted(x).values()))
        expected = model(x)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", models(ALL))
def test_features_only_fx_torchscript_with_caller_feature_cfg(name):
    """timm's test_model_forward_torchscript_with_features_fx: the caller's feature_cfg is merged."""
    with timm.set_scriptable(True):
        model = create(name, features_only=True, feature_cfg={"feature_cls": "fx"}).eval()
    levels = 5 if is_imagenet(name) else 3
    assert type(model).__name__ == "FeatureGraphNet" and len(model.feature_info) == levels
    scripted = _script(model)
    x = tiny_input(name)
    with torch.inference_mode():
        outs, expected = scripted(x), model(x)
    assert isinstance(outs, list) and len(outs) == levels
    for a, b in zip(outs, expected, strict=True):
        torch.testing.assert_close(a, b)
    # the caller's keys win over the builder's, the builder's fill the rest
    picked = create(name, features_only=True, feature_cfg={"out_indices": (1,)})
    assert picked.feature_info.channels() == [model.feature_info.channels()[1]]


# --- the method's claims --------------------------------------------------------------------------


@pytest.mark.parametrize("name", models(ALL))
def test_targets_roles_and_count(name):
    model = create(name)
    targets = find_targets(model)
    assert len(targets) == depth_of(name) == model.num_layers
    assert targets[0].role == "stem" and targets[0].module_name == "stem.conv"
    assert targets[-1].role == "classifier" and targets[-1].module_name == "head.fc"
    assert all(t.role == "body" for t in targets[1:-1])


@pytest.mark.parametrize("name", models(CIFAR_PLAIN + CIFAR_RESNET))
def test_every_cifar_layer_keeps_f_in_ge_f_out(name):
    targets = find_targets(create(name))
    assert not [t.name for t in targets if t.breaks_principle]
    stem, fc = targets[0], targets[-1]
    assert (stem.f_in, stem.f_out) == (3 * 3 * 3, 16)
    assert (fc.f_in, fc.f_out) == (64, 10)


def test_options_that_break_the_principle_on_cifar_nets():
    """docs/models.md: one input channel makes the stem fat, more than 64 classes the classifier."""
    targets = find_targets(create("plain_cnn20", in_chans=1, num_classes=100))
    fat = {t.name: (t.f_out, t.f_in, t.ortho_groups) for t in targets if t.breaks_principle}
    assert fat == {"stem.conv.weight": (16, 9, 2), "head.fc.weight": (100, 64, 2)}


@pytest.mark.parametrize("name", models(IMAGENET))
def test_imagenet_only_the_classifier_breaks_the_principle(name):
    targets = find_targets(create(name))
    assert [t.name for t in targets if t.breaks_principle] == ["head.fc.weight"]
    assert (targets[0].f_in, targets[0].f_out) == (3 * 7 * 7, 64)
    assert (targets[-1].f_in, targets[-1].f_out, targets[-1].ortho_groups) == (512, 1000, 2)


def _penalties(model: nn.Module) -> dict[str, float]:
    return {t.name: float(orthonormality_penalty(t.matrix().detach()).sum()) for t in find_targets(model)}


@pytest.mark.parametrize("name", models(CIFAR_PLAIN + CIFAR_RESNET))
def test_orthonormal_init_gives_orthonormal_filters_and_msra_does_not(name):
    torch.manual_seed(0)
    ortho = _penalties(timm.create_model(name))  # orthonormal is the default
    assert max(ortho.values()) < 1e-8
    msra = _penalties(timm.create_model(name, init="msra"))
    assert min(msra.values()) > 0.1


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_orthonormal_init_is_group_wise_on_fat_layers(stem):
    """Narrow ImageNet-style and CIFAR-style nets with a 1000-way head: the head is fat (f_out > f_in)."""
    model = PlainCnn(depths=(1, 2, 1, 1), widths=(8, 16, 24, 64), stem=stem, num_classes=1000, in_chans=1)
    targets = find_targets(model)
    fat = [t for t in targets if t.breaks_principle]
    # in_chans=1: the stem keeps f_in >= f_out (9 or 49 inputs for 8 filters); only the head is fat
    assert [t.name for t in fat] == ["head.fc.weight"]
    assert fat[0].ortho_groups == math.ceil(1000 / 64)
    assert max(_penalties(model).values()) < 1e-8
    # each group's rows are orthonormal, rows of different groups are not orthogonal to each other
    w = model.head.fc.weight.detach().double()
    groups = torch.tensor_split(w, fat[0].ortho_groups)
    for g in groups:
        torch.testing.assert_close(g @ g.T, torch.eye(g.shape[0], dtype=w.dtype), atol=1e-6, rtol=0)
    assert (groups[0] @ groups[1].T).abs().max() > 1e-3
    model.reset_classifier(100)
    assert orthonormality_penalty(find_targets(model)[-1].matrix().detach()).sum() < 1e-8


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_orthonormal_init_full_size(name):
    assert max(_penalties(timm.create_model(name)).values()) < 1e-8


def _chain_nodes(model: nn.Module) -> tuple[torch.fx.GraphModule, list[torch.fx.Node]]:
    gm = torch.fx.symbolic_trace(model)
    return gm, list(gm.graph.nodes)


def _is_single_chain(nodes: list[torch.fx.Node]) -> bool:
    """Every node reads exactly the node before it, and is read only by the node after it."""
    for prev, node in itertools.pairwise(nodes):
        if node.all_input_nodes != [prev] or list(prev.users) != [node]:
            return False
    return nodes[0].op == "placeholder" and nodes[-1].op == "output"


MERGE_OPS = {operator.add, operator.iadd, torch.add, torch.cat, torch.concat, torch.stack}
MERGE_METHODS = {"add", "add_", "cat", "concat"}


def _leaf_types(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> list[type]:
    return [type(gm.get_submodule(n.target)) for n in nodes if n.op == "call_module"]


@pytest.mark.parametrize("act", [None, "relu"], ids=["shaped", "relu"])
@pytest.mark.parametrize("name", [*models(CIFAR_PLAIN), "plain_cnn44_imagenet"])
def test_plain_net_is_a_single_chain(name, act):
    model = create(name) if act is None else create(name, act_layer=act)
    act_type = nn.LeakyReLU if act is None else nn.ReLU
    gm, nodes = _chain_nodes(model)
    assert not [n for n in nodes if n.op == "call_function" and n.target in MERGE_OPS]
    assert not [n for n in nodes if n.op == "call_method" and n.target in MERGE_METHODS]
    assert _is_single_chain(nodes)
    types = _leaf_types(gm, nodes)
    assert types.count(nn.Conv2d) + types.count(nn.Linear) == depth_of(name)
    # Conv-BN-activation triples, in that order
    triples = [t for t in types if t in (nn.Conv2d, nn.BatchNorm2d, act_type)]
    assert triples == [nn.Conv2d, nn.BatchNorm2d, act_type] * (depth_of(name) - 1)


def test_residual_twin_is_not_a_chain():
    """Negative control for the chain test: cifar_resnet20 has 9 shortcut additions."""
    gm, nodes = _chain_nodes(create("cifar_resnet20"))
    adds = [n for n in nodes if n.op == "call_function" and n.target in MERGE_OPS]
    assert len(adds) == 9 and not _is_single_chain(nodes)
    types = _leaf_types(gm, nodes)
    assert types.count(nn.Conv2d) + types.count(nn.Linear) == 20


def _conv_layout(model: nn.Module, size: int) -> list[tuple[int, int, int, int, int]]:
    """(in_channels, out_channels, kernel, stride, output side) of every conv, in execution order."""
    layout: list[tuple[int, int, int, int, int]] = []

    def record(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        k, s = module.kernel_size[0], module.stride[0]
        layout.append((module.in_channels, module.out_channels, k, s, output.shape[-1]))

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return layout


@pytest.mark.parametrize(("name", "n"), [("plain_cnn44", 7), ("plain_cnn110", 18)])
def test_cifar_layer_shapes_match_method(name, n):
    """METHOD.md section 5: 3x3 stem with 16 filters, 2n 3x3 convs at 16/32/64 on 32/16/8 maps, FC 10."""
    model = create(name)
    expected = [(3, 16, 3, 1, 32)]
    for stage, (width, side) in enumerate(zip((16, 32, 64), (32, 16, 8), strict=True)):
        for i in range(2 * n):
            first = i == 0
            in_chs = width // 2 if first and stage else width
            stride = 2 if first and stage else 1
            expected.append((in_chs, width, 3, stride, side))
    assert _conv_layout(model, 32) == expected
    assert (model.head.fc.in_features, model.head.fc.out_features) == (64, 10)
    assert len(expected) + 1 == 6 * n + 2


@pytest.mark.parametrize("name", models(IMAGENET))
def test_imagenet_layer_shapes(name):
    model = create(name)
    layout = _conv_layout(model, 64)  # 224 would give 112/56/28/14/7; 64 is cheaper and divides as well
    assert layout[0] == (3, 64, 7, 2, 32)
    expected, prev = [], 64
    for stage, (width, convs, side) in enumerate(
        zip((64, 128, 256, 512), IMAGENET_STAGE_CONVS[depth_of(name)], (16, 8, 4, 2), strict=True)
    ):
        for i in range(convs):
            expected.append((prev if i == 0 else width, width, 3, 2 if i == 0 and stage else 1, side))
        prev = width
    assert layout[1:] == expected
    assert (model.head.fc.in_features, model.head.fc.out_features) == (512, 1000)


@pytest.mark.parametrize("name", ["plain_cnn1202", "cifar_resnet1202", "plain_cnn110_imagenet"])
def test_slow_models_construct_and_count_on_meta_device(name):
    """The deepest nets, built without memory or init cost: layer count and feature levels."""
    with torch.device("meta"):
        model = timm.create_model(name)
    targets = find_targets(model)
    assert len(targets) == depth_of(name) == model.num_layers
    assert [t.role for t in (targets[0], targets[-1])] == ["stem", "classifier"]
    assert [t.name for t in targets if t.breaks_principle] == (
        ["head.fc.weight"] if is_imagenet(name) else []
    )
    assert len(model.feature_info) == (5 if is_imagenet(name) else 3)


def test_residual_twin_has_the_plain_nets_parametric_layers():
    """Option-A shortcuts add no parameters: same filter-matrix shapes, same parameter count."""
    plain, res = create("plain_cnn56"), create("cifar_resnet56")
    shapes = [(t.f_out, t.f_in) for t in find_targets(plain)]
    assert shapes == [(t.f_out, t.f_in) for t in find_targets(res)]
    count = sum(p.numel() for p in plain.parameters())
    assert count == sum(p.numel() for p in res.parameters())


@pytest.mark.parametrize("side", [7, 8])
def test_option_a_shortcut_against_a_naive_loop(side):
    """With its residual branch zeroed, a downsampling block is relu(shortcut(x)); check it by loops."""
    block = BasicBlock(4, 8, stride=2).eval()
    nn.init.zeros_(block.conv2.weight)
    x = torch.randn(2, 4, side, side, dtype=torch.float64)
    block = block.double()
    with torch.no_grad():
        out = block(x)
    out_side = (side + 2 - 3) // 2 + 1  # the 3x3/2 conv's output grid
    expected = torch.zeros(2, 8, out_side, out_side, dtype=torch.float64)
    for c in range(4):
        for i in range(out_side):
            for j in range(out_side):
                expected[:, c, i, j] = x[:, c, 2 * i, 2 * j].clamp_min(0)
    torch.testing.assert_close(out, expected)
    assert isinstance(block.shortcut, PadShortcut) and not list(block.shortcut.parameters())


@settings(max_examples=12, deadline=None)
@given(
    depths=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    stem=st.sampled_from(["cifar", "imagenet"]),
    residual=st.booleans(),
    side=st.integers(9, 24),
    in_chans=st.integers(1, 3),
)
def test_random_layouts_keep_the_contract(depths, stem, residual, side, in_chans):
    """Any stage layout: targets count the layers, levels have the reported shapes, init is orthonormal."""
    widths = [4 * 2**i for i in range(len(depths))]
    cls = CifarResNet if residual else PlainCnn
    model = cls(depths=depths, widths=widths, stem=stem, num_classes=5, in_chans=in_chans).eval()
    targets = find_targets(model)
    assert len(targets) == model.num_layers == 2 + sum(depths) * cls.convs_per_block
    assert max(_penalties(model).values()) < 1e-8
    x = torch.randn(2, in_chans, side, side)
    with torch.no_grad():
        _, inter = model.forward_intermediates(x)
        logits = model(x)
    assert len(inter) == len(model.feature_info) == len(depths) + (stem == "imagenet")
    for info, o in zip(model.feature_info, inter, strict=True):
        assert o.shape[1] == info["num_chs"]
        # every stride-2 layer (3x3/2 conv, 7x7/2 conv, 3x3/2 max pool, padding k//2) maps s -> ceil(s/2)
        expected = side
        for _ in range(int(math.log2(info["reduction"]))):
            expected = math.ceil(expected / 2)
        assert o.shape[-2:] == (expected, expected)
    assert logits.shape == (2, 5)
    if not residual:
        assert _is_single_chain(_chain_nodes(model)[1])


@pytest.mark.parametrize("chunk", [1, 16 * 144 * 2 + 1, 1 << 22])
def test_batched_orthonormal_init_draws_each_layer_independently(monkeypatch, chunk):
    """Equal layers share one QR call (in chunks of at most `chunk` elements), never one draw."""
    monkeypatch.setattr(timm_ortho.init, "_ORTHO_CHUNK_NUMEL", chunk)
    model = PlainCnn(depths=(5, 2), widths=(16, 32), num_classes=10)
    assert max(_penalties(model).values()) < 1e-8
    same_shape = [b.conv.weight for b in model.stages[0]]
    for i, j in itertools.combinations(range(len(same_shape)), 2):
        # independent Haar draws: |<w_i, w_j>| over 16 filters is far from the 16 of identical ones
        assert (same_shape[i] * same_shape[j]).sum().abs() < 8


def test_init_weights_on_any_model_is_group_wise_and_leaves_norms_alone():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.Conv2d(8, 12, 1, groups=2),  # 2 conv groups of 6 x 4
        nn.BatchNorm2d(12),
        nn.Flatten(),
        nn.Linear(12, 30),  # 30 filters of 12 inputs: fat
    )
    nn.init.constant_(model[2].weight, 3.0)
    banks = timm_ortho.init_weights_(model)
    assert [b.name for b in banks] == ["0.weight", "1.weight", "4.weight"]
    assert max(_penalties(model).values()) < 1e-10
    assert all(not m.bias.any() for m in (model[0], model[1], model[4]))
    assert torch.equal(model[2].weight, torch.full((12,), 3.0))  # normalization is the model's
    nn.init.ones_(model[0].bias)
    timm_ortho.init_weights_(model, "msra", targets=banks[:1], zero_bias=False)
    assert torch.equal(model[0].bias, torch.ones(8))
    assert _penalties(model)["0.weight"] > 0.1 and _penalties(model)["4.weight"] < 1e-10
    with pytest.raises(ValueError, match="unknown init"):
        timm_ortho.init_weights_(model, "xavier")  # type: ignore[arg-type]
    on_meta = nn.Linear(4, 4, device="meta")
    assert timm_ortho.init_weights_(on_meta) == []


def test_cifar_statistics_agree_with_the_data_module():
    from timm_ortho.train import data

    assert (CIFAR10_MEAN, CIFAR10_STD) == (data.CIFAR10_MEAN, data.CIFAR10_STD)
    cfg = timm.create_model("plain_cnn20").pretrained_cfg
    assert (tuple(cfg["mean"]), tuple(cfg["std"])) == (CIFAR10_MEAN, CIFAR10_STD)


def test_bad_layouts_are_clear_errors():
    with pytest.raises(ValueError, match="one width per stage"):
        PlainCnn(depths=(1, 1), widths=(8,))
    with pytest.raises(ValueError, match="positive"):
        PlainCnn(depths=(0,), widths=(8,))
    with pytest.raises(ValueError, match="stem"):
        PlainCnn(depths=(1,), widths=(8,), stem="vit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="add channels"):
        PadShortcut(8, 4)


def test_orthonormal_init_is_reproducible_under_a_seed():
    torch.manual_seed(3)
    a = timm.create_model("plain_cnn20").state_dict()
    torch.manual_seed(3)
    b = timm.create_model("plain_cnn20").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    torch.manual_seed(4)
    c = timm.create_model("plain_cnn20").state_dict()
    assert not torch.allclose(a["stem.conv.weight"], c["stem.conv.weight"])
