"""The coupled / decoupled form follows the optimizer's kind (docs/optimizer.md has the table)."""

import re
import warnings
from pathlib import Path

import pytest
import timm
import torch
from timm.optim import get_optimizer_info, list_optimizers
from torch import nn

from timm_ortho import OrthoModulated, create_optimizer
from timm_ortho.forms import known_form, optimizer_form

DOC = Path(__file__).resolve().parents[1] / "docs" / "optimizer.md"

# Families as docs/optimizer.md names them, with the form each must get.
SGD_LIKE = ["sgd", "momentum", "nesterov", "sgdp", "sgdw", "nesterovw", "lars", "larc", "nlars", "nlarc"]
ADAPTIVE = [
    "adam",
    "adamw",
    "nadam",
    "nadamw",
    "radam",
    "adamax",
    "adamp",
    "adopt",
    "rmsprop",
    "rmsproptf",
    "adagrad",
    "adadelta",
    "adafactor",
    "adafactorbv",
    "madgrad",
    "lion",
    "lamb",
    "lambc",
    "adabelief",
    "adan",
    "novograd",
    "laprop",
    "mars",
    "kron",
    "muon",
    "adahessian",
]


def test_every_timm_optimizer_has_a_known_form():
    unknown = [n for n in list_optimizers() if known_form(get_optimizer_info(n).opt_class) is None]
    assert unknown == []


@pytest.mark.parametrize(
    ("name", "form"), [(n, "coupled") for n in SGD_LIKE] + [(n, "decoupled") for n in ADAPTIVE]
)
def test_family_form_in_timms_registry(name, form):
    assert known_form(get_optimizer_info(name).opt_class) == form


def test_adaptive_optimizers_without_betas_are_decoupled():
    """The old rule keyed on `betas` got these wrong."""
    for name in ("rmsprop", "adagrad", "adadelta", "madgrad"):
        info = get_optimizer_info(name)
        assert not info.has_betas and known_form(info.opt_class) == "decoupled", name


TORCH = {
    "SGD": "coupled",
    "ASGD": "coupled",
    "LBFGS": "coupled",
    "Adam": "decoupled",
    "AdamW": "decoupled",
    "NAdam": "decoupled",
    "RAdam": "decoupled",
    "Adamax": "decoupled",
    "Adagrad": "decoupled",
    "Adadelta": "decoupled",
    "RMSprop": "decoupled",
    "Rprop": "decoupled",
    "SparseAdam": "decoupled",
    "Adafactor": "decoupled",
    "Muon": "decoupled",
}


def test_every_torch_optimizer_has_its_form():
    classes = {n: getattr(torch.optim, n) for n in dir(torch.optim) if n[0].isupper() and n != "Optimizer"}
    classes = {
        n: c for n, c in classes.items() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
    }
    assert {n: known_form(c) for n, c in classes.items()} == {n: TORCH[n] for n in classes}


@pytest.fixture
def model() -> nn.Module:
    return timm.create_model("plain_cnn20", num_classes=3)


@pytest.mark.parametrize(
    ("name", "form"),
    [
        ("ortho_sgd", "coupled"),
        ("ortho_lars", "coupled"),
        ("ortho_sgdw", "coupled"),
        ("ortho_adamw", "decoupled"),
        ("ortho_rmsprop", "decoupled"),
        ("ortho_adagrad", "decoupled"),
        ("ortho_adadelta", "decoupled"),
        ("ortho_adafactor", "decoupled"),
        ("ortho_madgrad", "decoupled"),
        ("ortho_lion", "decoupled"),
        ("ortho_lamb", "decoupled"),
        ("ortho_lookahead_rmsprop", "decoupled"),
    ],
)
def test_built_optimizers_get_their_form_and_step(model, name, form):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known optimizer: no guessing, no warning
        opt = create_optimizer(model, name, lr=1e-3, weight_decay=1e-4, ortho_decay=1e-3)
    assert opt.form == form
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert opt.ortho_step == 1


def test_every_ortho_name_builds_with_its_form(model):
    """Each name of timm's registry, as ``ortho_<name>`` (apex / bitsandbytes need CUDA), builds and
    has its form."""
    built = 0
    for base in list_optimizers():
        name = "ortho_" + base
        if base.startswith(("fused", "bnb")):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. Kron's advice to install opt_einsum
            warnings.filterwarnings("error", message="OrthoModulated")  # no form guessed
            opt = create_optimizer(model, name, lr=1e-3, weight_decay=1e-4)
        assert opt.form == known_form(get_optimizer_info(base).opt_class), name
        opt.remove_hooks()
        built += 1
    assert built > 80


@pytest.mark.parametrize("form", ["coupled", "decoupled"])
def test_form_override_is_kept(model, form):
    opt = OrthoModulated(torch.optim.RMSprop(model.parameters(), lr=1e-3), model, form=form)
    assert opt.form == form


def test_decoupled_term_on_rmsprop_is_lr_times_the_gradient(model):
    """Decoupled: W <- W - lr * 2λ (W Wᵀ - I) W, then RMSprop's own step on the unchanged gradient."""
    torch.manual_seed(0)
    lr, lam = 1e-2, 1e-2
    x = torch.randn(2, 3, 8, 8)
    model(x).sum().backward()
    ref = timm.create_model("plain_cnn20", num_classes=3)
    ref.load_state_dict(model.state_dict())
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        q.grad = p.grad.clone()
    opt = OrthoModulated(
        torch.optim.RMSprop(model.parameters(), lr=lr), model, ortho_decay=lam, max_grad_ratio=None
    )
    with torch.no_grad():
        for t in opt.targets:
            q = ref.get_parameter(t.name)
            w = q.reshape(q.shape[0], -1).double()
            residual = w @ w.T - torch.eye(w.shape[0], dtype=w.dtype)
            q -= (lr * 2 * lam * residual @ w).reshape(q.shape).float()
    opt.step()
    torch.optim.RMSprop(ref.parameters(), lr=lr).step()
    for (n, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=n)


def test_unknown_optimizer_warns_and_falls_back(model):
    class Custom(torch.optim.Optimizer):
        def __init__(self, params, lr=0.1, betas=(0.9, 0.99)):
            super().__init__(params, dict(lr=lr, betas=betas))

        def step(self, closure=None):
            return None

    with pytest.warns(UserWarning, match="does not know the optimizer .*Custom.*decoupled"):
        opt = OrthoModulated(Custom(model.parameters()), model)
    assert opt.form == "decoupled"

    class SgdLike(torch.optim.SGD):  # subclasses inherit their parent's form, silently
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert optimizer_form(SgdLike(model.parameters(), lr=0.1)) == "coupled"


def test_decoupled_without_an_lr_is_a_clear_error(model):
    """timm's Adafactor with lr=None sizes its own steps: there is no lr to scale the term by."""
    from timm.optim import Adafactor

    with pytest.raises(ValueError, match=r"lr=None.*form='coupled'"):
        OrthoModulated(Adafactor(model.parameters(), lr=None), model)
    assert OrthoModulated(Adafactor(model.parameters(), lr=None), model, form="coupled").form == "coupled"


def test_documented_table_matches_the_code():
    """Each row `| name | form | ... |` of the table in docs/optimizer.md agrees with the registry."""
    rows = re.findall(r"^\| `([A-Za-z0-9_., `]+)` \| (coupled|decoupled) \|", DOC.read_text(), flags=re.M)
    documented = {n.strip(" `"): form for names, form in rows for n in names.split(",")}
    registry = {n: known_form(get_optimizer_info(n).opt_class) for n in list_optimizers() if "ortho" not in n}
    torch_rows = {n: f for n, f in documented.items() if n.startswith("torch.optim.")}
    timm_rows = {n: f for n, f in documented.items() if not n.startswith("torch.optim.")}
    # Rows for names an older timm lacks are fine; every name of the installed timm needs its row.
    assert sorted(set(registry) - set(timm_rows)) == []
    assert {n: timm_rows[n] for n in registry} == registry
    assert torch_rows == {f"torch.optim.{n}": f for n, f in TORCH.items() if hasattr(torch.optim, n)}
