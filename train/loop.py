"""The training loop: data -> jitted step -> metrics, checkpoints, evaluation, failure handling.

    from train.config import load_config
    from train.loop import train
    result = train(load_config("configs/small.yaml", ["train.steps=200"]))

A run lives in `run_dir`: config.yaml, metrics.jsonl (one line per logged step
and per evaluation), checkpoints/ (Orbax) and loss.png. Starting a run whose
directory has a checkpoint resumes it exactly: same parameters, optimiser
state, step and loader position, so the losses continue bit for bit.

SIGTERM (preemption) finishes the current step, saves and returns normally.
A non-finite loss or gradient is skipped by the step itself (the default
policy, counted in `skipped`), or stops the run, or rolls back to the last
checkpoint and goes on with the next batches.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
import yaml

from data.loader import Loader
from data.store import open_store
from model.checkpoint import layout_metadata
from model.config import flops_per_token
from model.load import load_params
from model.pipeline import bubble_fraction
from model.sharding import make_mesh
from train.checkpoint import Checkpointer
from train.config import TrainConfig, TrainConfigError
from train.errors import TrainError
from train.metrics import MetricsLog, peak_flops, plot_losses, read_metrics
from train.step import Steps, TrainState, build_steps

MAX_ROLLBACKS = 3


class TrainingStopped(TrainError, RuntimeError):
    """The run stopped on purpose (non-finite values under the stop policy, or too many rollbacks)."""


@dataclasses.dataclass
class TrainResult:
    run_dir: str
    step: int  # the last step completed
    train_loss: float
    val_loss: float | None
    skipped: int
    preempted: bool
    metrics_path: str
    plot_path: str | None


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (with every process of a multi-process run)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling there
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        """Whether any process of the run got a SIGTERM: every process asks after every step, so all of them
        stop after the same step (one process's flag, gathered; alone, its own)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def evaluate(steps: Steps, params: dict, store, config: TrainConfig) -> tuple[float, int]:
    """(mean validation loss per target token, tokens scored) over up to log.eval_batches batches."""
    nll = tokens = 0.0
    with Loader(store, config.train.batch_size, seed=config.train.seed, split="val",
                val_fraction=config.data.val_fraction, sharding=steps.batch_shardings["tokens"],
                prefetch=config.data.prefetch) as loader:
        for _, batch in zip(range(config.log.eval_batches), loader, strict=False):
            batch_nll, batch_tokens = steps.eval_step(params, batch)
            nll += float(batch_nll)
            tokens += float(batch_tokens)
    return nll / max(tokens, 1.0), int(tokens)


def _check_data(config: TrainConfig, store) -> None:
    tokenizer = store.metadata.get("tokenizer", {})
    vocab = tokenizer.get("vocab_size")
    if vocab is not None and vocab > config.model.vocab_size:
        raise TrainConfigError(
            f"the token store {config.data.store} uses tokenizer {tokenizer.get('name')} with {vocab} ids but "
            f"model.vocab_size is {config.model.vocab_size}; set model.vocab_size={vocab} or prepare the data "
            "with a smaller tokenizer"
        )
    if store.seq_len > config.model.max_seq_len:
        raise TrainConfigError(
            f"the token store {config.data.store} has rows of seq_len {store.seq_len} but model.max_seq_len is "
            f"{config.model.max_seq_len}; raise model.max_seq_len or prepare shorter rows"
        )


def _progress(config: TrainConfig, total: int, initial: int, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step",
                disable=not (config.log.progress and enabled), dynamic_ncols=True, file=sys.stderr)


def _quiet(*args, **kwargs) -> None:
    """The log of a process other than 0 in a multi-process run."""


class StepHook:
    """Something run around every training step, installed with `train(config, hooks=[...])` (the tests' fault
    injection is one). Override either method; both run on every step, so keep them cheap."""

    def before_step(self, step: int, batch: dict) -> dict:
        """The batch step number `step` (1-based) will train on; return it, or a changed copy."""
        return batch

    def after_step(self, step: int, run: Run) -> None:
        """After step `step` was logged, checkpointed and evaluated, before a SIGTERM is acted on."""


class Run:
    """One training run in progress: set up and restored when made, then `loop`, then `result`.

    Each part of a step is a method of its own: `_train_step` (with the non-finite policy), `_log_step`,
    `_checkpoint`, `_evaluate`, `_stop_for_preemption`."""

    def __init__(self, config: TrainConfig, log=print):
        # in a multi-process run every process trains; process 0 alone logs, writes metrics, the plot and the
        # progress bar (errors are raised, and so reported, by every process)
        self.lead = jax.process_index() == 0
        self.config, self.log = config, (log if self.lead else _quiet)
        os.makedirs(config.run_dir, exist_ok=True)
        if self.lead:
            with open(os.path.join(config.run_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(config.to_dict(), f, sort_keys=False)
        self.mesh = make_mesh(config.mesh.shape())
        if config.train.batch_size % jax.process_count():
            raise TrainConfigError(f"train.batch_size {config.train.batch_size} does not divide over "
                                   f"{jax.process_count()} processes: each process reads an equal part of every "
                                   f"global batch; pick a multiple of {jax.process_count()}")
        self.store = open_store(config.data.store)
        _check_data(config, self.store)
        self.steps = build_steps(config.model, config.optim, config.schedule, config.train.steps, self.mesh,
                                 config.train.batch_size, config.train.microbatches,
                                 execution=config.model_execution)
        # every step records its tokenizer: the token store's (data.tokenizer.load_tokenizer reads a store's path)
        store_path = config.data.store if "://" in config.data.store else os.path.abspath(config.data.store)
        self.layout = layout_metadata(config.model, self.steps.abstract_state.params, self.steps.logical_axes,
                                      tokenizer=store_path)
        self.checkpointer = Checkpointer(os.path.join(config.run_dir, "checkpoints"), keep=config.checkpoint.keep,
                                         every=config.checkpoint.every, async_save=config.checkpoint.async_save)
        self.state, loader_state = self._restore()
        self._plan_throughput()
        self.metrics_path = os.path.join(config.run_dir, "metrics.jsonl")
        self.metrics = MetricsLog(self.metrics_path, enabled=self.lead)
        self.loader = Loader(self.store, config.train.batch_size, seed=config.train.seed, split="train",
                             val_fraction=config.data.val_fraction, sharding=self.steps.batch_shardings["tokens"],
                             prefetch=config.data.prefetch, state=loader_state)
        self.step = int(self.state.step)
        self.rollbacks = 0
        self.val_loss: float | None = None
        self.train_loss = float("nan")
        self.preempted = False
        self._window_start, self._window_steps = time.perf_counter(), 0
        self._bar = None

    def _restore(self) -> tuple[TrainState, dict | None]:
        """(state, loader state): the run's own newest checkpoint, or a new state (parameters from
        train.init_from when it names a source)."""
        config, steps = self.config, self.steps
        restored = self.checkpointer.restore_latest(steps.abstract_state, self.layout)
        if restored is None:
            state = steps.init(config.train.seed)
            if config.train.init_from:  # a checkpoint, a GGUF file, a Hugging Face directory or a packaged model
                source = config.train.init_from
                state = state.replace(params=load_params(source, steps.abstract_state.params, self.layout))
                self.log(f"run {config.run_dir}: parameters from {source}")
            self.log(f"run {config.run_dir}: new, {config.train.steps} steps on mesh {dict(self.mesh.shape)}")
            return state, None
        self.log(f"run {config.run_dir}: resumed from step {restored.step} of {config.train.steps}")
        return restored.state, restored.loader_state

    def _plan_throughput(self) -> None:
        """The numbers each logged step's tokens/s, MFU and pipeline bubble are computed from."""
        config, stages = self.config, self.mesh.shape["stage"]
        self.peak, peak_source = peak_flops(list(self.mesh.devices.flat))
        self.log(f"MFU peak: {peak_source}")
        self.bubble = bubble_fraction(stages, config.pipeline.microbatches, config.pipeline.virtual_stages)
        if stages > 1:
            self.log(f"pipeline: {stages} stages, {config.pipeline.microbatches} microbatches, "
                     f"{config.pipeline.virtual_stages} virtual stages per device: bubble {self.bubble:.1%}")
        self.tokens_per_step = config.train.batch_size * self.store.seq_len
        self.model_flops_per_step = flops_per_token(config.model, self.store.seq_len) * self.tokens_per_step

    # -- the loop

    def loop(self, hooks: Sequence[StepHook] = ()) -> None:
        """Train until train.steps or a SIGTERM; closes the loader, checkpointer and metrics log."""
        config = self.config
        self._bar = _progress(config, config.train.steps, self.step, enabled=self.lead)
        compiled = False
        try:
            with _Preemption() as preemption:
                self._restart_window()
                while self.step < config.train.steps:
                    step_metrics = self._train_step(hooks)
                    if not compiled:  # the first step of a process includes compilation: keep it out of step times
                        jax.block_until_ready(self.state)
                        compiled = True
                        self._restart_window()
                    if not self._finite_or_rolled_back(step_metrics):
                        continue
                    last = self.step == config.train.steps
                    if self.step % config.log.every == 0 or last:
                        self._log_step(step_metrics)
                    self._bar.update(1)
                    if self.step % config.checkpoint.every == 0 or last:
                        self._checkpoint(force=last)
                    if self.step % config.log.eval_every == 0 or last:
                        self._evaluate()
                    for hook in hooks:
                        hook.after_step(self.step, self)
                    if preemption.agreed() and not last:
                        self._stop_for_preemption()
                        break
        finally:
            self._bar.close()
            self.loader.close()
            self.checkpointer.wait()
            self.checkpointer.close()
            self.metrics.close()

    def _train_step(self, hooks: Sequence[StepHook]) -> dict:
        """One step on the next batch (dispatched, not waited for): its metrics."""
        batch = next(self.loader)
        for hook in hooks:
            batch = hook.before_step(self.step + 1, batch)
        self.state, step_metrics = self.steps.train_step(self.state, batch)
        self.step += 1
        self._window_steps += 1
        return step_metrics

    def _finite_or_rolled_back(self, step_metrics: dict) -> bool:
        """The non-finite policy: True if the run goes on with this step. `skip` is done inside the step;
        `stop` raises TrainingStopped; `rollback` restores the last checkpoint (False: the step is undone)."""
        if self.config.train.nonfinite == "skip" or bool(step_metrics["finite"]):
            return True
        self.state, self.rollbacks = _handle_nonfinite(self.config, self.step, self.steps, self.checkpointer,
                                                       self.layout, self.state, self.rollbacks, self.log)
        self.step = int(self.state.step)
        self._bar.n = self.step
        return False

    def _restart_window(self) -> None:
        """Step times average over the steps since the last logged step (evaluation kept out)."""
        self._window_start, self._window_steps = time.perf_counter(), 0

    def _log_step(self, step_metrics: dict) -> None:
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        seconds = (time.perf_counter() - self._window_start) / max(self._window_steps, 1)
        self.train_loss = values["loss"]
        record = {
            "kind": "train", "step": self.step, "loss": values["loss"], "grad_norm": values["grad_norm"],
            "lr": values["lr"], "tokens_per_s": self.tokens_per_step / seconds, "step_time": seconds,
            "mfu": self.model_flops_per_step / seconds / self.peak, "skipped": int(self.state.skipped),
            "pipeline_bubble": self.bubble,
        }
        self.metrics.write(record)
        self._bar.set_postfix(loss=f"{self.train_loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                              mfu=f"{record['mfu']:.0%}")
        self._restart_window()

    def _checkpoint(self, force: bool = False) -> None:
        self.checkpointer.save(self.step, self.state, self.loader.state(), self.config.to_dict(), self.layout,
                               force=force)

    def _evaluate(self) -> None:
        self.val_loss, val_tokens = evaluate(self.steps, self.state.params, self.store, self.config)
        self.metrics.write({"kind": "eval", "step": self.step, "val_loss": self.val_loss,
                            "val_perplexity": math.exp(min(self.val_loss, 50.0)), "val_tokens": val_tokens})
        self._restart_window()

    def _stop_for_preemption(self) -> None:
        """SIGTERM: save this step, wait until it is on disk, and say how to resume."""
        self._checkpoint(force=True)
        self.checkpointer.wait()
        self.preempted = True
        self.log(f"\nSIGTERM: stopped after step {self.step}; saved checkpoint {self.step} in "
                 f"{self.checkpointer.directory}. Run the same command again to resume.")

    # -- the end

    def result(self) -> TrainResult:
        """The run's outcome (after `loop`); a finished run started again is evaluated here."""
        config = self.config
        if self.val_loss is None and not self.preempted:  # nothing left to train: report the finished run
            self.val_loss, _ = evaluate(self.steps, self.state.params, self.store, config)
            if self.lead:
                logged = [r["loss"] for r in read_metrics(self.metrics_path) if r.get("kind") == "train"]
                self.train_loss = logged[-1] if logged else self.train_loss
        plot_path = None
        if config.log.plot and not self.preempted and self.lead:
            plot_path = plot_losses(self.metrics_path, os.path.join(config.run_dir, "loss.png"))
        return TrainResult(run_dir=config.run_dir, step=self.step, train_loss=self.train_loss,
                           val_loss=self.val_loss, skipped=int(self.state.skipped), preempted=self.preempted,
                           metrics_path=self.metrics_path, plot_path=plot_path)


def train(config: TrainConfig, log=print, hooks: Sequence[StepHook] = ()) -> TrainResult:
    """Train (or resume) the run in `config.run_dir`; returns when done or preempted. hooks: StepHooks run
    around every step."""
    run = Run(config, log)
    run.loop(hooks)
    return run.result()


def _handle_nonfinite(config: TrainConfig, step: int, steps: Steps, checkpointer: Checkpointer, layout: dict,
                      state: TrainState, rollbacks: int, log) -> tuple[TrainState, int]:
    """Policy `stop` raises; `rollback` restores the last checkpoint's parameters and optimiser state (the
    loader goes on, so the batches that led to the failure are not repeated)."""
    if config.train.nonfinite == "stop":
        checkpointer.wait()
        raise TrainingStopped(f"step {step}: the loss or gradient is not finite (train.nonfinite=stop); the last "
                              f"checkpoint is in {checkpointer.directory}")
    if rollbacks >= MAX_ROLLBACKS:
        raise TrainingStopped(f"step {step}: non-finite again after {rollbacks} rollbacks; stopping")
    checkpointer.wait()
    restored = checkpointer.restore_latest(steps.abstract_state, layout)
    if restored is None:
        log(f"step {step}: non-finite loss or gradient and no checkpoint yet: starting again from step 0")
        return steps.init(config.train.seed), rollbacks + 1
    log(f"step {step}: non-finite loss or gradient: rolled back to checkpoint {restored.step}")
    return restored.state, rollbacks + 1


def unigram_entropy(store, split_rows: np.ndarray, max_rows: int = 4096) -> float:
    """Entropy (nats / token) of the empirical token distribution of the given rows' real tokens: the loss of
    the best model that ignores context, on those very tokens."""
    rows = np.sort(split_rows[:max_rows])
    tokens, segments = store.read_rows(rows)
    counts = np.bincount(tokens[:, 1:][segments[:, 1:] > 0])
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
