"""The timm optimizer-factory plug-in."""

import warnings

import pytest
import timm
import torch

from plugins.timm_optim import create_ortho_optimizer
from timm_ortho import OrthoModulated


@pytest.mark.parametrize("opt_name,form", [("sgd", "coupled"), ("adamw", "decoupled"), ("lamb", "decoupled")])
def test_timm_factory_gives_targets_no_weight_decay(opt_name, form):
    model = timm.create_model("resnet18", num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no split needed: groups are built right
        opt = create_ortho_optimizer(model, opt_name, lr=0.01, weight_decay=0.05, ortho_decay=1e-3)
    assert isinstance(opt, OrthoModulated) and opt.form == form
    target_ids = {id(t.param) for t in opt.targets}
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) in target_ids or p.ndim <= 1:
                assert group["weight_decay"] == 0.0
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert opt.ortho_step == 1
