"""Run train.py's main loop unchanged, saving each parameter's gradient as the optimizer sees it
(the last step's, so run it with --max_iters=1) to OUT/grads_rank{RANK}.pt. Used by
tests/test_train.py, in its own process and under torchrun:

    python tests/grad_worker.py OUT [train.py arguments]
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402


def recording(configure_optimizers, out_dir: str):
    """train.configure_optimizers, with a hook that saves the gradients before every optimizer step."""

    def configure_and_record(model, *args, **kwargs):
        optimizers = configure_optimizers(model, *args, **kwargs)
        path = os.path.join(out_dir, f"grads_rank{os.environ.get('RANK', '0')}.pt")

        def record(optimizer, step_args, step_kwargs):
            torch.save({name: p.grad.clone() for name, p in model.named_parameters()}, path)

        optimizers["adamw"].register_step_pre_hook(record)  # every run has an AdamW
        return optimizers

    return configure_and_record


if __name__ == "__main__":
    train.configure_optimizers = recording(train.configure_optimizers, sys.argv[1])
    train.main(sys.argv[2:])
