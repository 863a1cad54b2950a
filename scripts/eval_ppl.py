"""Perplexity of an imported model on held-out text: Python's pydoc help texts (pydoc_data.topics, present
wherever Python is), which no model was tuned on here.

    python scripts/eval_ppl.py                          # the packaged SmolLM2-135M-Instruct (Q4_1 GGUF)
    python scripts/eval_ppl.py --gguf model.gguf --max-tokens 100000
    python scripts/eval_ppl.py --checkpoint runs/x --window 512
    python scripts/eval_ppl.py --quantize int8 int4:32 int4:64   # each against the float weights: perplexity,
                                                                  # mean KL(float || quantised), top-1 agreement
    python scripts/eval_ppl.py --kv-cache int8                    # through the KV-cache path, against a float32
                                                                  # cache through the same path

The topics are sorted by name, each encoded on its own (no special tokens) and joined with the
tokenizer's end-of-text id; the stream is cut into non-overlapping windows of --window tokens, and every
token after a window's first is scored (so each has at least one token of context). Prints a table and
writes JSON.

--kv-cache scores the float weights through the path decoding takes (`Transformer.with_cache`): each window's
keys and values are written into a KV cache of that format, and the attention reads them back from it; its
reference is a float32 cache through the same path (a row of its own), which differs from the plain forward
pass only by float rounding.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.runtime import preload_allocator, set_xla_flags  # noqa: E402


def held_out_ids(tokenizer, max_tokens: int) -> list[int]:
    import pydoc_data.topics

    ids: list[int] = []
    for topic in sorted(pydoc_data.topics.topics):
        ids += tokenizer.encode(pydoc_data.topics.topics[topic]) + [tokenizer.eos_id]
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a packaged model (default smollm2-135m)")
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--hf", default=None)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--max-tokens", type=int, default=32768, help="tokens of held-out text to score")
    parser.add_argument("--quantize", nargs="*", default=[], metavar="FORMAT",
                        help="also score the model with its matmul weights quantised (model/quant.py; or bfloat16: "
                             "every weight stored in bfloat16), each format against the float weights: KL and top-1 "
                             "agreement over the same tokens")
    parser.add_argument("--activations", nargs="*", default=["int8"], choices=["int8", "float"],
                        help="what the quantised matmuls do with activations (model/quant.py): each --quantize format "
                             "is scored with each of these")
    parser.add_argument("--kv-cache", nargs="*", default=[], metavar="FORMAT", choices=["int8"],
                        help="also score the float weights through a KV cache of each format (model/cache.py), "
                             "against a float32 cache through the same path")
    parser.add_argument("--out", default="eval_ppl.json")
    args = parser.parse_args()
    if not (args.gguf or args.hf or args.checkpoint or args.model):
        args.model = "smollm2-135m"
    preload_allocator()
    set_xla_flags(None)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from data.tokenizer import load_tokenizer
    from model.load import load_model

    loaded = load_model(checkpoint=args.checkpoint, gguf=args.gguf, hf=args.hf, model=args.model,
                        tokenizer=args.tokenizer)
    if loaded.tokenizer is None:
        parser.error(f"{loaded.source} has no tokenizer meshlm reads: pass --tokenizer")
    ids = held_out_ids(load_tokenizer(loaded.tokenizer), args.max_tokens)
    window = min(args.window, loaded.config.max_seq_len)
    n_windows = len(ids) // window
    if n_windows == 0:
        parser.error(f"only {len(ids)} tokens: fewer than one window of {window}")
    rows = np.asarray(ids[:n_windows * window], np.int32).reshape(n_windows, window)
    pad = -n_windows % args.batch
    rows = np.concatenate([rows, np.zeros((pad, window), np.int32)])  # padded rows are not counted
    graphdef, params = loaded.graphdef, jax.tree.map(jnp.asarray, loaded.params)

    from model.cache import init_cache, kv_cache_dtype

    def forward(params, tokens, kv):
        """Logits [batch, length, vocab]: the plain forward pass (kv None), or through a KV cache of format `kv`
        ("auto": the compute dtype, "int8"): every token's keys and values written into it, then read back."""
        model = nnx.merge(graphdef, params)
        if kv is None:
            return model(tokens)
        cache = init_cache(model.config, tokens.shape[0], tokens.shape[1],
                           kv_cache_dtype(kv, model.execution.compute_jnp_dtype))
        hidden, _ = model.with_cache(tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape), cache)
        return model.logits(hidden)

    @functools.partial(jax.jit, static_argnames=("kv", "reference_kv"))
    def scores(params, reference, tokens, kv, reference_kv):
        """Per row: summed nll under `params` (through cache `kv`); summed KL(reference || params) and top-1
        agreements per token."""
        logprobs = jax.nn.log_softmax(forward(params, tokens[:, :-1], kv), axis=-1)
        ref = jax.nn.log_softmax(forward(reference, tokens[:, :-1], reference_kv), axis=-1)
        nll = -jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0].sum(axis=1)
        kl = (jnp.exp(ref) * (ref - logprobs)).sum(axis=-1).sum(axis=1)
        agree = (jnp.argmax(ref, -1) == jnp.argmax(logprobs, -1)).sum(axis=1)
        return nll, kl, agree

    from model.quant import parse_format, quantize_params

    scored = n_windows * (window - 1)
    # (weights, their parameters, KV cache or None for the plain forward pass, the reference's KV cache)
    variants = [("float32", params, None, None)]
    def weights(f: str, activations: str):
        if f == "bfloat16":  # every weight stored in bfloat16 (computed in float32)
            return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                params)
        return quantize_params(params, *parse_format(f), activations=activations)

    for f in args.quantize:
        for a in (["int8"] if f == "bfloat16" else args.activations):
            variants.append((f if f == "bfloat16" else f"{f}, x {a}", weights(f, a), None, None))
    if args.kv_cache:
        variants += [("float32", params, kv, "auto") for kv in ["auto", *args.kv_cache]]
    results = []
    print(f"{'model':<34} {'weights':<16} {'KV cache':<8} {'tokens':>7} {'window':>6} {'nll/token':>9} "
          f"{'perplexity':>10} {'KL to f32':>9} {'top-1 =':>7} {'seconds':>7}")
    compute_dtype = nnx.merge(graphdef, params).execution.compute_jnp_dtype
    for name, variant, kv, reference_kv in variants:
        cache = "-" if kv is None else jnp.dtype(kv_cache_dtype(kv, compute_dtype)).name
        start = time.perf_counter()
        parts = [jax.device_get(scores(variant, params, rows[i:i + args.batch], kv=kv, reference_kv=reference_kv))
                 for i in range(0, len(rows), args.batch)]
        seconds = time.perf_counter() - start
        nll, kl, agree = (np.concatenate([p[j] for p in parts])[:n_windows] for j in range(3))
        mean = float(nll.sum() / scored)
        result = {"model": loaded.source, "weights": name, "kv_cache": cache,
                  "reference": "plain forward, float32" if reference_kv is None else "through a float32 KV cache",
                  "text": "pydoc_data.topics (sorted, joined with "
                  "end-of-text)", "tokens_scored": scored, "window": window, "nll_nats_per_token": mean,
                  "perplexity": float(np.exp(mean)), "kl_to_float32": float(kl.sum() / scored),
                  "top1_agreement": float(agree.sum() / scored), "seconds": seconds,
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                  "command": " ".join(["python", *sys.argv])}
        results.append(result)
        print(f"{os.path.basename(loaded.source)[:34]:<34} {name:<16} {cache:<8} {scored:>7} {window:>6} {mean:>9.4f} "
              f"{np.exp(mean):>10.3f} {result['kl_to_float32']:>9.5f} {result['top1_agreement']:>7.2%} "
              f"{seconds:>7.1f}")
    with open(args.out, "w") as f:
        json.dump(results if len(results) > 1 else results[0], f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
