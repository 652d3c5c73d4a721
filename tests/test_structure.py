"""The shape of the package: the plug-in never loads the training application or its dependencies.

``import timm_ortho`` is what a user of timm types to get the models and the optimizer; it must not
pull in Accelerate, matplotlib or the trainer (``timm_ortho.train``), which only the training
application needs. One test imports the package in a fresh interpreter and reads ``sys.modules``;
the other reads the source, so that a module-level import that a test run happens not to reach
(a plug-in, a module nothing imports yet) is caught too.
"""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import timm_ortho
from timm_ortho import defaults

ROOT = Path(__file__).resolve().parents[1]
APPLICATION = "timm_ortho.train"
# Top-level packages the plug-in must not load: the application's dependencies.
FORBIDDEN = ("accelerate", "matplotlib", "sklearn")
# Source folders of the plug-in and the package name each is installed as (pyproject.toml).
LIBRARY = {ROOT / "timm_ortho": "timm_ortho", ROOT / "plugins": "timm_ortho.plugins"}


def _is_forbidden(module: str) -> bool:
    return module.split(".")[0] in FORBIDDEN or module == APPLICATION or module.startswith(APPLICATION + ".")


def test_importing_the_plugin_loads_no_application_module():
    code = (
        "import json, sys\n"
        "import timm, timm_ortho\n"
        "timm.create_model('plain_cnn20')\n"  # the models register and build without the trainer
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=300
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "timm_ortho" in loaded and "timm_ortho.models.plain_cnn" in loaded
    assert [m for m in loaded if _is_forbidden(m)] == []


def _library_modules() -> Iterator[tuple[Path, str]]:
    """Every source file of the plug-in with its dotted module name, the application left out."""
    for folder, package in LIBRARY.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            if name == APPLICATION or name.startswith(APPLICATION + "."):
                continue
            yield path, name


def _module_level_imports(tree: ast.Module, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """``(line, absolute module name)`` of every import that runs when the module is imported.

    Imports inside a function body run only when it is called (the lazy imports the plug-in uses on
    purpose); everything else, class bodies and ``if``/``try`` blocks included, runs on import.
    """
    package = module if is_package else module.rpartition(".")[0]
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from . import train` imports the submodule: name it so.
            yield from ((node.lineno, f"{base}.{alias.name}") for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))


def test_no_library_module_imports_the_application_at_module_level():
    modules = {name: path for path, name in _library_modules()}
    assert {
        "timm_ortho",
        "timm_ortho.ortho",
        "timm_ortho.models.plain_cnn",
        "timm_ortho.plugins.run_timm",
    } <= set(modules)
    assert not any(name.startswith(APPLICATION) for name in modules)
    offenders = []
    for path, module in _library_modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, imported in _module_level_imports(tree, module, path.name == "__init__.py"):
            if _is_forbidden(imported):
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert offenders == []


@pytest.mark.parametrize(
    ("source", "imported"),
    [
        ("from .train import loop", "timm_ortho.train.loop"),
        ("from . import train", "timm_ortho.train"),
        ("if True:\n    import accelerate", "accelerate"),
        ("class A:\n    from matplotlib import pyplot", "matplotlib.pyplot"),
    ],
)
def test_the_scan_sees_relative_and_nested_imports(source, imported):
    assert [name for _, name in _module_level_imports(ast.parse(source), "timm_ortho", True)] == [imported]


def test_lazy_imports_inside_functions_are_allowed():
    source = "def f():\n    import accelerate\n    from .train import loop\n"
    assert list(_module_level_imports(ast.parse(source), "timm_ortho", True)) == []


def test_the_method_defaults_live_in_one_module():
    from timm_ortho import factory, optim

    assert optim.DEFAULT_ORTHO_DECAY is defaults.DEFAULT_ORTHO_DECAY
    assert optim.DEFAULT_MAX_GRAD_RATIO is defaults.DEFAULT_MAX_GRAD_RATIO
    assert optim.DEFAULT_MODULATION is defaults.DEFAULT_MODULATION
    assert factory.create_optimizer.__kwdefaults__["ortho_decay"] == defaults.DEFAULT_ORTHO_DECAY
    assert timm_ortho.OrthoModulated.__init__.__kwdefaults__["max_grad_ratio"] == (
        defaults.DEFAULT_MAX_GRAD_RATIO
    )
    # The modulation's own signature must agree with the defaults stated here.
    from timm_ortho.modulation import ErrorModulation

    options = inspect.signature(ErrorModulation).parameters
    assert options["band"].default == defaults.DEFAULT_MODULATION_BAND
    assert options["mode"].default == defaults.DEFAULT_MODULATION_MODE
    assert options["reference"].default == defaults.DEFAULT_MODULATION_REFERENCE


# Size limits that keep each module one concept and each function readable on one screen.
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def _package_sources() -> Iterator[Path]:
    for folder in (ROOT / "timm_ortho", ROOT / "plugins"):
        yield from sorted(folder.rglob("*.py"))


def test_no_module_and_no_function_is_over_its_size_limit():
    too_long = []
    for path in _package_sources():
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(source, filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []
