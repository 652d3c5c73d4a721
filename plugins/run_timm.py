"""Run one of timm's scripts with the registered models and optimizers.

timm's ``train.py`` can import this package itself (``--device-modules timm_ortho``); its
``validate.py`` and ``inference.py`` have no such flag, and timm has no plug-in discovery, so a name
like ``plain_cnn20`` is unknown there. This runner imports :mod:`timm_ortho` and then runs the script
as ``python SCRIPT ARGS...`` would (same ``sys.argv``, ``sys.path[0]`` and ``__main__``)::

    python -m timm_ortho.plugins.run_timm validate.py /data --model plain_cnn20 --checkpoint ckpt.pth.tar
"""

import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

import timm_ortho  # noqa: F401  (registers the models and the ortho_* optimizers with timm)

__all__ = ["main"]

USAGE = "usage: python -m timm_ortho.plugins.run_timm SCRIPT.py [ARGS...]"


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``argv[0]`` (a path to one of timm's scripts) with ``argv[1:]`` as its arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        raise SystemExit(2 if not argv else 0)
    script = Path(argv[0])
    if not script.is_file():
        print(f"{USAGE}\nerror: no such script: {script}", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.resolve().parent))  # what `python SCRIPT` puts first
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
