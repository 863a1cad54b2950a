"""Training checkpoints: the whole TrainState, the loader position and the run config, restorable onto any mesh.

model/checkpoint.py owns the parameters and the layout metadata; a training step adds these Orbax items:

    opt_state/    the optimiser state (an Orbax PyTree, sharded like the parameters)
    train_meta/   JSON {"step": ..., "skipped": ...}: the TrainState's counters
    loader/       JSON: Loader.state(), the next batch to read ({} when there is none)
    config/       JSON: TrainConfig.to_dict() of the run that wrote it
    checksums/    JSON fingerprints of params and opt_state

    with Checkpointer("runs/x/checkpoints", keep=3, every=100) as checkpointer:
        restored = checkpointer.restore_latest(steps.abstract_state, layout)   # None: start afresh
        ...
        checkpointer.save(step, state, loader.state(), config.to_dict(), layout, force=step == last)

Saves are asynchronous by default: `save` returns once the arrays are copied off the devices, and the files are
written in the background (`wait` blocks until they are). A step that does not read back whole is passed over
for the one before it, with a warning; the next save moves it aside to `<step>.unreadable-<time>`.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from model.checkpoint import (
    CHECKSUMS,
    LAYOUT,
    PARAMS,
    CheckpointError,
    CheckpointWarning,
    absolute,
    check_layout,
    checksums,
    read_layout,
    restore_newest,
    step_path,
    verify_checksums,
)
from train.step import TrainState

OPT_STATE, TRAIN_META, LOADER, CONFIG = "opt_state", "train_meta", "loader", "config"


@dataclasses.dataclass
class Restored:
    step: int  # the checkpoint step restored
    state: TrainState  # arrays with the target shardings
    loader_state: dict | None  # None: the run had no loader position
    config: dict  # TrainConfig.to_dict() of the run that saved it


class Checkpointer:
    """Orbax CheckpointManager for a run: a save every `every` steps (or forced), the last `keep` kept."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, every: int = 100, async_save: bool = True):
        self.directory = str(absolute(directory))
        self._unreadable: list[int] = []
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every),
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # folders of saves that never finished
        )
        self._manager = ocp.CheckpointManager(absolute(self.directory), options=options)

    # -- saving

    def save(self, step: int, state: TrainState, loader_state: dict | None, config_dict: dict, layout: dict,
             force: bool = False) -> bool:
        """Save if `step` is a multiple of `every` (or `force`) and not saved yet; True if a save started."""
        self._set_aside_unreadable()
        if step in self._manager.all_steps() or not (force or self._manager.should_save(step)):
            return False
        items = {
            PARAMS: ocp.args.StandardSave(state.params),
            OPT_STATE: ocp.args.StandardSave(state.opt_state),
            TRAIN_META: ocp.args.JsonSave({"step": int(state.step), "skipped": int(state.skipped)}),
            LOADER: ocp.args.JsonSave(loader_state or {}),
            CONFIG: ocp.args.JsonSave(config_dict),
            LAYOUT: ocp.args.JsonSave(layout),
            CHECKSUMS: ocp.args.JsonSave({PARAMS: checksums(state.params), OPT_STATE: checksums(state.opt_state)}),
        }
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def _set_aside_unreadable(self) -> None:
        """Move steps that did not read back out of Orbax's way (they would block saving those steps again)."""
        if not self._unreadable:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if jax.process_index() == 0:
            for step in self._unreadable:
                path = step_path(self.directory, step)
                if path.exists():
                    path.rename(path.parent / f"{step}.unreadable-{stamp}")
                    warnings.warn(f"checkpoint {path} could not be read; moved it to {path.name}.unreadable-{stamp}",
                                  CheckpointWarning, stacklevel=3)
        ocp.multihost.sync_global_processes("meshlm_checkpoint_set_aside")
        self._unreadable = []
        self._manager.reload()

    # -- restoring

    def restore_latest(self, abstract_state: TrainState, layout: dict) -> Restored | None:
        """The newest readable step onto `abstract_state`'s shardings (Steps.abstract_state); None if there is
        no checkpoint. A checkpoint of another model raises CheckpointError before any array is read."""
        self.wait()
        self._manager.reload()
        found = restore_newest(self._manager, lambda step: self._restore(step, abstract_state, layout))
        if found is None:
            return None
        _, restored, self._unreadable = found
        return restored

    def _restore(self, step: int, abstract_state: TrainState, layout: dict) -> Restored:
        where = str(step_path(self.directory, step))
        check_layout(read_layout(self._manager, step), layout, where)
        if not (step_path(self.directory, step) / OPT_STATE).exists():
            raise CheckpointError(f"checkpoint {where} holds parameters only (no optimiser state) and cannot "
                                  "resume a run; load it with model.checkpoint.restore_params")
        items = {PARAMS: ocp.args.StandardRestore(abstract_state.params),
                 OPT_STATE: ocp.args.StandardRestore(abstract_state.opt_state),
                 **{name: ocp.args.JsonRestore() for name in (TRAIN_META, LOADER, CONFIG, CHECKSUMS)}}
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        for item in (PARAMS, OPT_STATE):
            verify_checksums(restored[item], restored[CHECKSUMS][item], item)
        meta = restored[TRAIN_META]
        state = TrainState(step=_scalar(meta["step"], abstract_state.step), params=restored[PARAMS],
                           opt_state=restored[OPT_STATE], skipped=_scalar(meta["skipped"], abstract_state.skipped))
        return Restored(step=step, state=state, loader_state=restored[LOADER] or None, config=restored[CONFIG])

    # -- bookkeeping

    def steps(self) -> list[int]:
        """The steps on disk (or being written), oldest first."""
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Block until every save started so far is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release Orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _scalar(value: int, abstract: jax.ShapeDtypeStruct) -> jax.Array:
    return jax.device_put(np.asarray(value, abstract.dtype), abstract.sharding)
