"""Target selection options and the diagnostics users inspect, against independent computations."""

from __future__ import annotations

import gc
import weakref

import pytest
import timm
import torch
from torch import nn

import timm_ortho  # noqa: F401  (registers the plain nets)
from timm_ortho import diagnostics
from timm_ortho.diagnostics import (
    filter_correlation,
    filter_report,
    filter_statistics,
    format_filter_report,
    layer_penalties,
)
from timm_ortho.ortho import mean_abs_cosine, orthonormality_penalty
from timm_ortho.targets import find_targets


def mixed_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),  # stem (first target, no timm cfg)
        nn.Conv2d(8, 8, 3, groups=8),  # depthwise
        nn.Conv2d(8, 12, 1, groups=2),  # grouped: 2 matrices of 6 x 4
        nn.BatchNorm2d(12),
        nn.ConvTranspose2d(12, 4, 2),  # never a target
        nn.Flatten(),
        nn.Linear(4, 30),  # classifier (trailing Linear), fat: 30 filters of 4 inputs
    )


def test_find_targets_roles_shapes_and_filters():
    model = mixed_net()
    banks = find_targets(model)
    assert [b.name for b in banks] == ["0.weight", "2.weight", "6.weight"]
    assert [b.role for b in banks] == ["stem", "body", "classifier"]
    grouped = banks[1]
    assert (grouped.conv_groups, grouped.f_out, grouped.f_in) == (2, 6, 4)
    assert grouped.matrix().shape == (2, 6, 4)
    assert banks[2].breaks_principle and banks[2].ortho_groups == 8
    assert "1.weight" in {b.name for b in find_targets(model, include_depthwise=True)}
    assert [b.name for b in find_targets(model, skip_stem=True, skip_classifier=True)] == ["2.weight"]
    assert [b.name for b in find_targets(model, include=["2.*"])] == ["2.weight"]
    assert [b.name for b in find_targets(model, exclude=["0.*", "6.*"])] == ["2.weight"]


def test_timm_roles_come_from_the_pretrained_cfg():
    model = timm.create_model("plain_cnn20", num_classes=10)
    banks = find_targets(model)
    assert banks[0].role == "stem" and banks[0].module_name == model.pretrained_cfg["first_conv"]
    assert banks[-1].role == "classifier" and banks[-1].module_name == model.pretrained_cfg["classifier"]
    assert all(b.role == "body" for b in banks[1:-1])


def test_lazy_modules_get_a_clear_error():
    with pytest.raises(ValueError, match="lazy module"):
        find_targets(nn.Sequential(nn.LazyLinear(3)))


def test_filter_report_flags_exactly_the_fat_layers():
    model = timm.create_model("resnet18")  # fc: 1000 filters of 512 inputs
    rows = filter_report(model)
    broken = [r.name for r in rows if r.breaks_principle]
    expected = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    expected = [
        n
        for n in expected
        if dict(model.named_parameters())[n].shape[0] > dict(model.named_parameters())[n][0].numel()
    ]
    assert broken == expected and "fc.weight" in broken
    text = format_filter_report(rows, only_breaking=True)
    assert "fc.weight" in text and f"{len(broken)} of {len(rows)} target layers" in text


def test_layer_penalties_and_correlation_match_per_layer_math():
    torch.manual_seed(0)
    model = mixed_net().double()
    banks = find_targets(model)
    expected = torch.stack([2 * orthonormality_penalty(b.matrix().detach()).sum() for b in banks])
    torch.testing.assert_close(layer_penalties(model).double(), expected, rtol=1e-5, atol=1e-6)
    cos = torch.stack([mean_abs_cosine(b.matrix().detach()).mean() for b in banks]).float()
    torch.testing.assert_close(filter_correlation(model), cos)
    orthonormal = timm.create_model("plain_cnn20", num_classes=10)
    assert layer_penalties(orthonormal).max() < 1e-6


def test_one_pass_gives_both_statistics_and_fat_grouped_convs_lose_all_padding():
    torch.manual_seed(1)
    # 2 conv groups of 10 filters x 4 inputs: 3 orthonormalized groups of 4 rows (2 of them padding)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 20, 1, groups=2), nn.Linear(20, 6)).double()
    banks = find_targets(model)
    penalties, correlation = filter_statistics(banks)
    assert torch.equal(penalties, layer_penalties(banks))
    assert torch.equal(correlation, filter_correlation(banks))
    expected = torch.stack([2 * orthonormality_penalty(b.matrix().detach()).sum() for b in banks])
    torch.testing.assert_close(penalties.double(), expected, rtol=1e-6, atol=1e-6)
    cos = torch.stack([mean_abs_cosine(b.matrix().detach()).mean() for b in banks]).float()
    torch.testing.assert_close(correlation, cos)
    assert correlation.device.type == "cpu" and correlation.dtype == torch.float32


def test_the_engine_is_built_once_per_target_list_and_dropped_with_it():
    model = timm.create_model("plain_cnn20", num_classes=10)
    banks = find_targets(model)
    engine = diagnostics._engine(banks)
    layer_penalties(banks)
    filter_correlation(list(banks))  # an equal list of the same banks: the same engine
    assert diagnostics._engine(banks) is engine
    shorter = banks[1:]
    assert diagnostics._engine(shorter) is not engine
    assert diagnostics._engine(banks[:-1]) is not engine  # same first bank, another list
    with torch.no_grad():
        model.stem.conv.weight.mul_(2)  # the engine reads the weights at call time
    assert layer_penalties(banks)[0] > 1
    alive = weakref.ref(model)
    del model, banks, shorter, engine
    gc.collect()
    assert alive() is None  # the cache kept no model alive
