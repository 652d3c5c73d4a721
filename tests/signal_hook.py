"""A stop signal at a chosen training step, for the signal tests (in-process through the conftest
fixture ``signal_at``, and in the processes that tests/ddp_helper.py runs)."""

import os


def send_signal_at(build_model, signum: int, forward: int):
    """``build_model`` whose model sends ``signum`` to this process in its ``forward``-th training pass."""

    def with_signal(*args, **kwargs):
        model, ema, init = build_model(*args, **kwargs)
        seen = [0]

        def hook(module, inputs, output):
            if module.training:
                seen[0] += 1
                if seen[0] == forward:
                    os.kill(os.getpid(), signum)

        model.register_forward_hook(hook)
        return model, ema, init

    return with_signal
