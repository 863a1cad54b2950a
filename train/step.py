"""The train state and the jitted train and eval steps on a mesh.

One step: split the global batch into microbatches, accumulate gradients of
the summed token losses over them (a scan), divide by the number of target
tokens, clip, AdamW. A non-finite loss or gradient leaves the state unchanged
and counts the step as skipped. Parameters and optimiser state are float32 and
sharded by the rules table (`embed -> fsdp` makes it ZeRO-3); the batch is
split over `data` and `fsdp`; compute runs in the model's compute dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.config import Execution, ModelConfig
from model.loss import token_losses
from model.pipeline import check_pipeline
from model.placement import new_model, param_layout
from model.sharding import DEFAULT_RULES, Rules, activation_sharding, check_divisible, named_sharding
from train.config import OptimSection, ScheduleSection

BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "weights")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 [], steps taken (applied or skipped)
    params: dict  # nested dict of float32 arrays, the model's parameters
    opt_state: Any  # optax state
    skipped: jax.Array  # int32 [], steps whose loss or gradient was not finite


def lr_schedule(optim: OptimSection, schedule: ScheduleSection, total_steps: int) -> optax.Schedule:
    """Linear warmup to optim.lr, then cosine or linear decay to lr * min_lr_ratio (or constant)."""
    warmup = min(schedule.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = optim.lr * schedule.min_lr_ratio
    if schedule.kind == "cosine":
        decay = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=schedule.min_lr_ratio)
    elif schedule.kind == "linear":
        decay = optax.linear_schedule(optim.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(optim.lr)
    if warmup == 0:
        return decay
    # warmup from lr / (warmup + 1): the first step already learns
    warmup_schedule = optax.linear_schedule(optim.lr / (warmup + 1), optim.lr, warmup)
    return optax.join_schedules([warmup_schedule, decay], [warmup])


def decay_mask(logical_axes: dict, decay_norms_and_embeddings: bool) -> dict:
    """True for parameters that get weight decay: all, or all but norm scales and the embedding table."""

    def decays(path, axes) -> bool:
        if decay_norms_and_embeddings:
            return True
        return "norm" not in axes and jax.tree_util.keystr(path[:1]) != "['embedding']"

    return jax.tree_util.tree_map_with_path(decays, logical_axes, is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(optim: OptimSection, schedule: optax.Schedule, logical_axes: dict) -> optax.GradientTransformation:
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                        mask=decay_mask(logical_axes, optim.decay_norms_and_embeddings))
    return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw) if optim.clip_norm > 0 else adamw


def _param_path(path) -> tuple[str, ...]:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def opt_state_shardings(abstract_opt_state: Any, param_shardings: dict, abstract_params: dict, mesh: Mesh) -> Any:
    """Each optimiser leaf shaped like a parameter (the moments) takes that parameter's sharding; the rest
    (step counts) is replicated."""
    by_path = {_param_path(p): (s, a.shape) for (p, s), (_, a) in zip(
        jax.tree_util.tree_flatten_with_path(param_shardings)[0],
        jax.tree_util.tree_flatten_with_path(abstract_params)[0], strict=True)}
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        sharding, shape = by_path.get(_param_path(path), (None, None))
        return sharding if sharding is not None and shape == leaf.shape else replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


@dataclasses.dataclass
class Steps:
    """Everything compiled for one (model, optimiser, mesh): build with `build_steps`."""

    graphdef: Any
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: TrainState
    batch_shardings: dict[str, NamedSharding]
    abstract_state: TrainState  # ShapeDtypeStructs carrying the shardings: the target of a restore
    logical_axes: dict
    init: Callable[[int], TrainState]
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    eval_step: Callable[[dict, dict], tuple[jax.Array, jax.Array]]
    mesh: Mesh


def build_steps(model: ModelConfig, optim: OptimSection, schedule: ScheduleSection, total_steps: int,
                mesh: Mesh, batch_size: int, microbatches: int = 1, rules: Rules = DEFAULT_RULES,
                execution: Execution | None = None) -> Steps:
    """Derive every sharding from the abstract model, then jit init, train and eval steps on `mesh`; the model
    runs with `execution` (default Execution())."""
    execution = Execution() if execution is None else execution
    layout = param_layout(model, mesh, rules, execution)  # checks divisibility
    graphdef, abstract_params, logical_axes = layout.graphdef, layout.abstract, layout.logical_axes
    param_shardings = layout.shardings
    check_divisible("global batch", (batch_size // microbatches, 1), ("batch", "length"), mesh, rules)
    stages = mesh.shape["stage"]
    if stages > 1:  # each pipeline microbatch is split over the batch axes too
        check_pipeline(model.n_layers, stages, execution.pipeline_microbatches, execution.pipeline_virtual_stages,
                       batch_size // microbatches)
        check_divisible("pipeline microbatch", (batch_size // microbatches // execution.pipeline_microbatches, 1),
                        ("batch", "length"), mesh, rules)
    sched = lr_schedule(optim, schedule, total_steps)
    optimizer = make_optimizer(optim, sched, logical_axes)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(
        step=replicated, params=param_shardings, skipped=replicated,
        opt_state=opt_state_shardings(jax.eval_shape(optimizer.init, abstract_params), param_shardings,
                                      abstract_params, mesh),
    )
    row = named_sharding(mesh, ("batch", "length"), rules)
    batch_shardings = {key: row for key in BATCH_KEYS}

    def init(seed):
        params = nnx.to_pure_dict(nnx.state(new_model(model, seed)))
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=params, opt_state=optimizer.init(params), skipped=zero)

    def summed_losses(params, batch):
        """(objective, (sum of nll, number of target tokens)) over one microbatch."""
        with activation_sharding(mesh, rules):
            logits = nnx.merge(graphdef, params)(batch["tokens"], batch["positions"], batch["segment_ids"])
        nll, log_z = token_losses(logits, batch["targets"])
        weights = batch["weights"].astype(jnp.float32)
        nll_sum = jnp.sum(nll * weights)
        return nll_sum + optim.z_loss * jnp.sum(jnp.square(log_z) * weights), (nll_sum, jnp.sum(weights))

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # microbatch m holds rows m, m + M, m + 2M, ...: each device keeps its own rows, no data moves
        micro = jax.tree.map(lambda x: x.reshape(-1, microbatches, x.shape[-1]).swapaxes(0, 1), batch)

        def accumulate(carry, microbatch):
            grads, nll, tokens = carry
            (_, (mb_nll, mb_tokens)), mb_grads = jax.value_and_grad(summed_losses, has_aux=True)(
                state.params, microbatch)
            return (jax.tree.map(jnp.add, grads, mb_grads), nll + mb_nll, tokens + mb_tokens), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, nll, tokens), _ = jax.lax.scan(accumulate, (zeros, jnp.float32(0), jnp.float32(0)), micro)
        scale = 1.0 / jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g * scale, grads)
        loss = nll * scale
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            params=jax.tree.map(keep, params, state.params),
            opt_state=jax.tree.map(keep, opt_state, state.opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": sched(state.step - state.skipped),
                   "finite": finite, "tokens": tokens}
        return new_state, metrics

    def eval_step(params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
        _, (nll, tokens) = summed_losses(params, batch)
        return nll, tokens

    abstract_state = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        jax.eval_shape(lambda: init(0)), shardings,
    )
    return Steps(
        graphdef=graphdef, optimizer=optimizer, schedule=sched, state_shardings=shardings,
        batch_shardings=batch_shardings, abstract_state=abstract_state, logical_axes=logical_axes,
        init=jax.jit(init, static_argnums=0, out_shardings=shardings),
        train_step=jax.jit(train_step, in_shardings=(shardings, batch_shardings),
                           out_shardings=(shardings, replicated), donate_argnums=0),
        eval_step=jax.jit(eval_step, in_shardings=(shardings.params, batch_shardings),
                          out_shardings=(replicated, replicated)),
        mesh=mesh,
    )
