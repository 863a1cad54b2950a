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

FAULT_ENV = "MESHLM_FAULT"  # fault injection for tests: kill_after_step:N | term_at_step:N | nan_at_step:N
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


def _fault() -> tuple[str, int] | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    kind, _, step = spec.partition(":")
    return kind, int(step)


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step."""

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


def _progress(config: TrainConfig, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not config.log.progress,
                dynamic_ncols=True, file=sys.stderr)


def train(config: TrainConfig, log=print) -> TrainResult:
    """Train (or resume) the run in `config.run_dir`; returns when done or preempted."""
    os.makedirs(config.run_dir, exist_ok=True)
    with open(os.path.join(config.run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
    mesh = make_mesh(config.mesh.shape())
    store = open_store(config.data.store)
    _check_data(config, store)
    steps = build_steps(config.model, config.optim, config.schedule, config.train.steps, mesh,
                        config.train.batch_size, config.train.microbatches, execution=config.model_execution)
    # every step records its tokenizer: the token store's (data.tokenizer.load_tokenizer reads a store's path)
    store_path = config.data.store if "://" in config.data.store else os.path.abspath(config.data.store)
    layout = layout_metadata(config.model, steps.abstract_state.params, steps.logical_axes, tokenizer=store_path)
    checkpointer = Checkpointer(os.path.join(config.run_dir, "checkpoints"), keep=config.checkpoint.keep,
                                every=config.checkpoint.every, async_save=config.checkpoint.async_save)
    restored = checkpointer.restore_latest(steps.abstract_state, layout)
    if restored is None:
        state, loader_state = steps.init(config.train.seed), None
        if config.train.init_from:  # a checkpoint, a GGUF file, a Hugging Face directory or a packaged model
            source = config.train.init_from
            state = state.replace(params=load_params(source, steps.abstract_state.params, layout))
            log(f"run {config.run_dir}: parameters from {source}")
        log(f"run {config.run_dir}: new, {config.train.steps} steps on mesh {dict(mesh.shape)}")
    else:
        state, loader_state = restored.state, restored.loader_state
        log(f"run {config.run_dir}: resumed from step {restored.step} of {config.train.steps}")

    peak, peak_source = peak_flops(list(mesh.devices.flat))
    log(f"MFU peak: {peak_source}")
    bubble = bubble_fraction(mesh.shape["stage"], config.pipeline.microbatches, config.pipeline.virtual_stages)
    if mesh.shape["stage"] > 1:
        log(f"pipeline: {mesh.shape['stage']} stages, {config.pipeline.microbatches} microbatches, "
            f"{config.pipeline.virtual_stages} virtual stages per device: bubble {bubble:.1%}")
    seq_len = store.seq_len
    tokens_per_step = config.train.batch_size * seq_len
    model_flops_per_step = flops_per_token(config.model, seq_len) * tokens_per_step
    metrics_path = os.path.join(config.run_dir, "metrics.jsonl")
    metrics = MetricsLog(metrics_path)
    fault = _fault()
    rollbacks = 0
    val_loss = None
    train_loss = float("nan")
    preempted = False
    loader = Loader(store, config.train.batch_size, seed=config.train.seed, split="train",
                    val_fraction=config.data.val_fraction, sharding=steps.batch_shardings["tokens"],
                    prefetch=config.data.prefetch, state=loader_state)
    step = int(state.step)
    compiled = False
    bar = _progress(config, config.train.steps, step)
    try:
        with _Preemption() as preemption:
            window_start, window_steps = time.perf_counter(), 0
            while step < config.train.steps:
                batch = next(loader)
                if fault and fault[0] == "nan_at_step" and step + 1 == fault[1]:
                    batch = dict(batch, weights=batch["weights"] * float("nan"))
                    fault = None  # once: a bad batch, not a bad model
                state, step_metrics = steps.train_step(state, batch)
                step += 1
                window_steps += 1
                if not compiled:  # the first step of a process includes compilation: keep it out of step times
                    jax.block_until_ready(state)
                    compiled, window_start, window_steps = True, time.perf_counter(), 0
                if config.train.nonfinite != "skip" and not bool(step_metrics["finite"]):
                    state, rollbacks = _handle_nonfinite(config, step, steps, checkpointer, layout, state,
                                                         rollbacks, log)
                    step = int(state.step)
                    bar.n = step
                    continue
                last = step == config.train.steps
                if step % config.log.every == 0 or last:
                    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    seconds = (time.perf_counter() - window_start) / max(window_steps, 1)
                    train_loss = values["loss"]
                    record = {
                        "kind": "train", "step": step, "loss": values["loss"], "grad_norm": values["grad_norm"],
                        "lr": values["lr"], "tokens_per_s": tokens_per_step / seconds, "step_time": seconds,
                        "mfu": model_flops_per_step / seconds / peak, "skipped": int(state.skipped),
                        "pipeline_bubble": bubble,
                    }
                    metrics.write(record)
                    bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                                    mfu=f"{record['mfu']:.0%}")
                    window_start, window_steps = time.perf_counter(), 0
                bar.update(1)
                if step % config.checkpoint.every == 0 or last:
                    checkpointer.save(step, state, loader.state(), config.to_dict(), layout, force=last)
                if step % config.log.eval_every == 0 or last:
                    val_loss, val_tokens = evaluate(steps, state.params, store, config)
                    metrics.write({"kind": "eval", "step": step, "val_loss": val_loss,
                                   "val_perplexity": math.exp(min(val_loss, 50.0)), "val_tokens": val_tokens})
                    window_start, window_steps = time.perf_counter(), 0
                if fault and fault[0] == "term_at_step" and step == fault[1]:
                    os.kill(os.getpid(), signal.SIGTERM)
                if fault and fault[0] == "kill_after_step" and step == fault[1]:
                    checkpointer.wait()
                    os.kill(os.getpid(), signal.SIGKILL)
                if preemption.requested and not last:
                    checkpointer.save(step, state, loader.state(), config.to_dict(), layout, force=True)
                    checkpointer.wait()
                    preempted = True
                    log(f"\nSIGTERM: stopped after step {step}; saved checkpoint {step} in "
                        f"{checkpointer.directory}. Run the same command again to resume.")
                    break
    finally:
        bar.close()
        loader.close()
        checkpointer.wait()
        checkpointer.close()
        metrics.close()
    if val_loss is None and not preempted:  # nothing left to train (a finished run started again): report it
        val_loss, _ = evaluate(steps, state.params, store, config)
        logged = [r["loss"] for r in read_metrics(metrics_path) if r.get("kind") == "train"]
        train_loss = logged[-1] if logged else train_loss
    plot_path = None
    if config.log.plot and not preempted:
        plot_path = plot_losses(metrics_path, os.path.join(config.run_dir, "loss.png"))
    return TrainResult(run_dir=config.run_dir, step=step, train_loss=train_loss, val_loss=val_loss,
                       skipped=int(state.skipped), preempted=preempted, metrics_path=metrics_path,
                       plot_path=plot_path)


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
