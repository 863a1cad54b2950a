"""Sampling by recomputing the full forward pass for every new token.

A stop-gap until the KV-cache decode loop lands (see the inference issue): one
compiled forward over a fixed-length buffer, so each token costs a whole
forward pass but nothing recompiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_full_forward(graphdef, params: dict, prompt: Sequence[int], max_new_tokens: int, max_len: int,
                        temperature: float = 0.0, seed: int = 0, stop_id: int | None = None) -> list[int]:
    """Continue `prompt` by up to `max_new_tokens` ids: greedy at temperature 0, else sampled."""
    length = min(max_len, len(prompt) + max_new_tokens)
    if len(prompt) >= length:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {max_len}")
    buffer = np.zeros((1, length), np.int32)
    buffer[0, : len(prompt)] = prompt

    @jax.jit
    def next_logits(params, tokens, position):
        logits = nnx.merge(graphdef, params)(tokens)  # causal: padding after `position` is never seen
        return jax.lax.dynamic_index_in_dim(logits[0], position, keepdims=False)

    key = jax.random.key(seed)
    out = []
    for position in range(len(prompt) - 1, length - 1):
        logits = next_logits(params, jnp.asarray(buffer), position)
        if temperature > 0:
            key, sub = jax.random.split(key)
            token = int(jax.random.categorical(sub, logits / temperature))
        else:
            token = int(jnp.argmax(logits))
        if token == stop_id:
            break
        buffer[0, position + 1] = token
        out.append(token)
    return out
