"""The plug-ins ship inside the installed package (``timm_ortho.plugins``) and work from there."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env_without_source_tree() -> dict[str, str]:
    """The environment of a user's process: the repository is not on the import path."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def test_plugins_import_as_part_of_the_package():
    from timm_ortho.plugins import run_timm, timm_optim

    from timm_ortho import create_ortho_optimizer

    assert timm_optim.create_ortho_optimizer is create_ortho_optimizer
    assert callable(run_timm.main)


def test_runner_runs_a_script_like_python_would(tmp_path):
    """timm's validate.py / inference.py via the runner: models registered, argv is the script's."""
    script = tmp_path / "script.py"
    script.write_text(
        "import sys, timm\n"
        "assert __name__ == '__main__'\n"
        f"assert sys.path[0] == {str(tmp_path)!r}\n"
        "print('argv', sys.argv[1:])\n"
        "print('layers', timm.create_model(sys.argv[1]).num_layers)\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "timm_ortho.plugins.run_timm", str(script), "plain_cnn20", "--flag"],
        cwd=tmp_path,
        env=_env_without_source_tree(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "argv ['plain_cnn20', '--flag']" in out.stdout
    assert "layers 20" in out.stdout


def test_runner_routes_ortho_names_in_a_train_script_and_leaves_timm_alone(tmp_path):
    """A script shaped like timm's train.py (a main() that calls create_optimizer_v2): under the runner
    --opt ortho_<name> builds the wrapper, other names timm's optimizer, and timm's own
    create_optimizer_v2 is not changed."""
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, timm, timm.optim\n"
        "import timm_ortho  # what train.py --device-modules timm_ortho does\n"
        "from timm.optim import create_optimizer_v2\n"
        "def main():\n"
        "    model = timm.create_model('plain_cnn20', num_classes=2)\n"
        "    extra = {'ortho_decay': 1e-3} if sys.argv[1].startswith('ortho_') else {}\n"
        "    opt = create_optimizer_v2(model, sys.argv[1], lr=0.1, weight_decay=1e-4, **extra)\n"
        "    print('built', type(opt).__name__, type(getattr(opt, 'base_optimizer', opt)).__name__)\n"
        "    print('timm untouched', timm.optim.create_optimizer_v2.__module__.startswith('timm'))\n"
        "if __name__ == '__main__':\n"
        "    main()\n"
    )
    for name, built in (("ortho_momentum", "built OrthoModulated SGD"), ("adamw", "built AdamW AdamW")):
        out = subprocess.run(
            [sys.executable, "-m", "timm_ortho.plugins.run_timm", str(script), name],
            cwd=tmp_path,
            env=_env_without_source_tree(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        assert built in out.stdout and "timm untouched True" in out.stdout
    # Without the runner timm would build plain SGD for the name: the package says so on import.
    out = subprocess.run(
        [sys.executable, str(script), "momentum", "--opt", "ortho_momentum"],
        cwd=tmp_path,
        env={**_env_without_source_tree(), "PYTHONWARNINGS": "default"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "built SGD SGD" in out.stdout and "run_timm" in out.stderr


def test_runner_says_how_to_call_it(tmp_path):
    from timm_ortho.plugins.run_timm import main

    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "missing.py")])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main([])


def _sources() -> set[str]:
    """Every module of the package as the wheel must hold it (plugins/ mapped to timm_ortho/plugins/)."""
    found = {str(p.relative_to(ROOT)) for p in (ROOT / "timm_ortho").rglob("*.py")}
    found |= {"timm_ortho/plugins/" + p.name for p in (ROOT / "plugins").glob("*.py")}
    return found


def test_wheel_ships_the_plugins_and_they_import_when_installed(tmp_path):
    """``pip wheel .`` + a non-editable install into a folder; then import from there only.

    Offline: the build uses the environment's setuptools (a dev dependency), nothing is downloaded.
    """
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("timm_ortho", "plugins"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    offline = ["--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run(
        [*pip, "wheel", *offline, "-q", "-w", str(tmp_path / "dist"), str(src)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = (tmp_path / "dist").glob("timm_ortho-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_sources() - names)
    assert not missing, f"modules missing from the wheel: {missing}"
    assert not any(n.startswith("plugins/") for n in names)  # no stray top-level package

    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", *offline, "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    # The console command comes with the wheel and runs the trainer.
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert (
        "timm-ortho-train = timm_ortho.train.loop:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    )
    env = {**_env_without_source_tree(), "PYTHONPATH": str(site)}
    out = subprocess.run(
        [str(site / "bin" / "timm-ortho-train"), "--help"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.startswith("usage: timm-ortho-train "), out.stderr

    code = (
        "import timm_ortho, timm_ortho.plugins.timm_optim as t, timm_ortho.plugins.run_timm as r\n"
        "print(timm_ortho.__file__)\n"
        "print(t.create_ortho_optimizer is timm_ortho.create_ortho_optimizer)\n"
    )
    env = _env_without_source_tree()
    env["PYTHONPATH"] = str(site)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    location, same = out.stdout.split()
    assert Path(location).is_relative_to(site) and same == "True"
