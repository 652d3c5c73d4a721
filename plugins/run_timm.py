"""Run one of timm's scripts with the registered models and the ``ortho_*`` optimizer names.

timm has no plug-in discovery, so a name like ``plain_cnn20`` is unknown to its ``validate.py`` and
``inference.py``, and timm's optimizer factory cannot build the wrapped optimizer: it reads only the
last word of an optimizer name and hands the optimizer class parameter groups, not the model
(docs/timm.md). This runner imports :mod:`timm_ortho` and runs the script as ``python SCRIPT ARGS...``
would (same ``sys.argv``, ``sys.path[0]``, ``__main__`` code); for a script that builds its optimizer
with ``create_optimizer_v2`` and has a ``main()`` (timm's ``train.py``), it binds, in the *script's*
namespace, a ``create_optimizer_v2`` that builds ``--opt ortho_<name>`` with
:func:`timm_ortho.create_optimizer` and every other name with timm's. timm itself is not changed::

    python -m timm_ortho.plugins.run_timm train.py /data --model plain_cnn20 --opt ortho_momentum \\
        --opt-kwargs ortho_decay=1e-4 modulation=True ...
    python -m timm_ortho.plugins.run_timm validate.py /data --model plain_cnn20 --checkpoint ckpt.pth.tar
"""

import logging
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

import timm_ortho  # noqa: F401  (registers the models with timm)
from timm_ortho.factory import routed

__all__ = ["main"]

USAGE = "usage: python -m timm_ortho.plugins.run_timm SCRIPT.py [ARGS...]"

_log = logging.getLogger("timm_ortho")


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
    source = script.read_text()
    if "create_optimizer_v2" not in source or "def main(" not in source:
        runpy.run_path(str(script), run_name="__main__")
        return
    # Define the script's functions without running it, bind the routing factory in its namespace,
    # then run its main() as its `if __name__ == "__main__"` block would.
    namespace = runpy.run_path(str(script), run_name="__timm_ortho_run__")
    entry = namespace["main"]
    factory = entry.__globals__.get("create_optimizer_v2")
    if factory is not None:
        entry.__globals__["create_optimizer_v2"] = routed(factory)
        _log.info("run_timm: --opt ortho_<name> is built by timm_ortho.create_optimizer in %s", script.name)
    entry()


if __name__ == "__main__":
    main()
