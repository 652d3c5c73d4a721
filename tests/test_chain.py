"""Which models are plain chains, and what the wrapper's "auto" settings become on each."""

import logging

import pytest
import timm
import torch
from torch import nn

import timm_ortho  # noqa: F401  (registers the models)
from timm_ortho import OrthoModulated
from timm_ortho.chain import check_plain_chain
from timm_ortho.defaults import max_grad_ratio_for


class Residual(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class SqueezeExcite(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x * self.fc(x.mean((2, 3))).sigmoid()[:, :, None, None]


def _chain(*middle: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        *middle,
        nn.Conv2d(4, 4, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4, 3),
    )


@pytest.mark.parametrize(
    ("model", "plain"),
    [
        (_chain(), True),
        (_chain(nn.LeakyReLU(0.5), nn.MaxPool2d(2)), True),
        (_chain(Residual()), False),
        (_chain(SqueezeExcite()), False),
        (nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)), True),
    ],
)
def test_branches_are_found_in_the_autograd_graph(model, plain):
    check = check_plain_chain(model)
    assert check.plain is plain and check.traced
    if not plain:
        assert "branch" in check.reason


@pytest.mark.parametrize(
    ("name", "kwargs", "plain"),
    [
        ("plain_cnn20", {}, True),
        ("plain_cnn44_imagenet", {}, True),
        ("cifar_resnet20", {}, False),
        ("resnet18", {}, False),
        ("mobilenetv3_small_100", {}, False),
        ("test_vit", {}, False),
        ("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, depth=2), False),  # a size of its own
    ],
)
def test_timm_models(name, kwargs, plain):
    check = check_plain_chain(timm.create_model(name, num_classes=3, **kwargs))
    assert check.traced and check.plain is plain, check.reason


def test_the_check_changes_nothing_of_the_model():
    model = timm.create_model("plain_cnn20", num_classes=3)
    model.stages[1].eval()  # a submodule in eval mode stays in eval mode, the rest in train mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert check_plain_chain(model).plain
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics too
    assert model.training and not model.stages[1].training and model.stages[1][0].bn.training is False
    assert all(p.grad is None for p in model.parameters())


def test_a_model_that_cannot_be_traced_is_not_called_a_chain():
    class NeedsTwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x, y):
            return self.conv(x) + y

    check = check_plain_chain(NeedsTwoInputs())
    assert not check.plain and not check.traced and "TypeError" in check.reason


def _wrap(model, **kwargs):
    return OrthoModulated(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, **kwargs)


def test_auto_turns_the_bound_and_the_modulation_on_for_plain_chains_only(caplog):
    with caplog.at_level(logging.INFO, logger="timm_ortho"):
        plain = _wrap(timm.create_model("plain_cnn20", num_classes=3))
        residual = _wrap(timm.create_model("cifar_resnet20", num_classes=3))
    assert plain.defaults["max_grad_ratio"] == max_grad_ratio_for(len(plain.targets)) == 1 / 20
    assert plain.modulation is not None and plain.modulation.reference == "top"
    assert residual.defaults["max_grad_ratio"] is None
    assert all(g["max_grad_ratio"] is None for g in residual.param_groups)
    assert residual.modulation is None
    lines = [r.getMessage() for r in caplog.records if r.name == "timm_ortho"]
    assert len(lines) == 2  # one INFO line per wrapper
    assert "PlainCnn: " in lines[0] and "a plain chain" in lines[0] and "max_grad_ratio=0.05" in lines[0]
    assert "not a plain chain" in lines[1] and "no step bound, no error modulation" in lines[1]


def test_explicit_settings_skip_the_check(monkeypatch):
    import timm_ortho.optim as optim

    monkeypatch.setattr(optim, "check_plain_chain", lambda model: pytest.fail("the model was traced"))
    model = timm.create_model("cifar_resnet20", num_classes=3)
    opt = _wrap(model, max_grad_ratio=0.02, modulation=True)
    assert opt.defaults["max_grad_ratio"] == 0.02 and opt.modulation is not None and opt.chain is None


def test_modulation_presets():
    model = timm.create_model("plain_cnn20", num_classes=3)
    paper = _wrap(model, modulation="paper")
    assert (paper.modulation.reference, paper.modulation.mode) == ("previous", "match")
    paper.remove_hooks()
    top = _wrap(timm.create_model("cifar_resnet20", num_classes=3), modulation="top")
    assert (top.modulation.reference, top.modulation.mode) == ("top", "match")
    off = _wrap(timm.create_model("plain_cnn20", num_classes=3), modulation=False)
    assert off.modulation is None
    with pytest.raises(ValueError, match="modulation must be 'auto', 'top', 'paper'"):
        _wrap(timm.create_model("plain_cnn20", num_classes=3), modulation="papre")
