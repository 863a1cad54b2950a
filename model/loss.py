"""Next-token cross-entropy (and the z-loss term), computed in float32; used by training and evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per token: (-log p(target), log Z), both float32 [batch, length].

    logits [batch, length, vocab]; targets [batch, length].
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logits, log_z


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean of -log p(target) over tokens with weight > 0 (all tokens when weights is None)."""
    nll, _ = token_losses(logits, targets)
    if weights is None:
        return jnp.mean(nll)
    weights = weights.astype(jnp.float32)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
