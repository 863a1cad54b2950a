"""The comparison our benchmarks run: Hugging Face transformers' LlamaForCausalLM with a meshlm
config's shapes (float32, random weights, torch on all cores), or why it cannot run here."""

from __future__ import annotations

import os

SKIPPED = "torch/transformers not installed (pip install torch==2.13.0 transformers)"


def llama_for_causal_lm(config, **extra):
    """(torch, transformers, model) for `config` (a meshlm ModelConfig), or SKIPPED when either package is
    missing. `extra`: more LlamaConfig fields (e.g. attn_implementation)."""
    try:
        import torch
        import transformers
    except ImportError:
        return SKIPPED
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, rope_theta=config.rope_theta,
        rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
        max_position_embeddings=config.max_seq_len, **extra,
    )).float()
    return torch, transformers, model
