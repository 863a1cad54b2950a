"""`meshlm train` with a fault injected, for tests/test_train_loop.py:

    python -m tests.fault_train kill_after_step:10 [meshlm train arguments ...]

kill_after_step:N  SIGKILL once step N's checkpoint is on disk (a crash);
term_at_step:N     SIGTERM after step N (a preemption: the run saves and exits cleanly);
nan_at_step:N      step N's batch weighs its tokens by NaN (once: a bad batch, not a bad model); in a
                   multi-process run only this process's rows, so every process must learn of it from the step.

The fault is a train.loop.StepHook given to `train`; the loop itself knows nothing of faults.
"""

from __future__ import annotations

import functools
import os
import signal
import sys

FAULTS = ("kill_after_step", "term_at_step", "nan_at_step")


class Fault:
    """A train.loop.StepHook (duck-typed: importing train.loop here would import JAX before the CLI sets
    its flags)."""

    def __init__(self, spec: str):
        kind, _, step = spec.partition(":")
        if kind not in FAULTS or not step.isdigit():
            raise SystemExit(f"fault {spec!r}: expected one of {', '.join(FAULTS)} with ':STEP'")
        self.kind, self.step = kind, int(step)
        self.poisoned = False

    def before_step(self, step: int, batch: dict) -> dict:
        if self.kind == "nan_at_step" and step == self.step and not self.poisoned:  # not again after a rollback
            self.poisoned = True
            return dict(batch, weights=_poison(batch["weights"]))
        return batch

    def after_step(self, step: int, run) -> None:
        if step != self.step:
            return
        if self.kind == "term_at_step":
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.kind == "kill_after_step":
            run.checkpointer.wait()
            os.kill(os.getpid(), signal.SIGKILL)


def _poison(weights):
    """NaN in this process's shards of a global array (no computation with the other processes)."""
    import jax

    shards = [shard.data * float("nan") for shard in weights.addressable_shards]
    return jax.make_array_from_single_device_arrays(weights.shape, weights.sharding, shards)


def main(argv: list[str]) -> int:
    import meshlm

    fault = Fault(argv[0])
    parser, cmd_train = meshlm.COMMANDS["train"]

    def train_with_fault(args):
        import train.loop

        train.loop.train = functools.partial(train.loop.train, hooks=[fault])  # what cmd_train imports
        return cmd_train(args)

    meshlm.COMMANDS["train"] = (parser, train_with_fault)
    return meshlm.main(["train", *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
