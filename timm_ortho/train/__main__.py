"""``python -m timm_ortho.train``: the trainer, as ``timm-ortho-train`` and ``scripts/train_imagenet.py``.

Absolute imports: ``accelerate launch`` runs this file as a script in the resume command it is
given (``guards.resume_command`` rebuilds the command line from ``sys.argv``).
"""

import sys

from timm_ortho.train.loop import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m timm_ortho.train"))
