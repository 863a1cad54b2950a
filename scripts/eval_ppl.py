"""Perplexity of an imported model on held-out text: Python's pydoc help texts (pydoc_data.topics, present
wherever Python is), which no model was tuned on here.

    python scripts/eval_ppl.py                          # the packaged SmolLM2-135M-Instruct (Q4_1 GGUF)
    python scripts/eval_ppl.py --gguf model.gguf --max-tokens 100000
    python scripts/eval_ppl.py --checkpoint runs/x --window 512

The topics are sorted by name, each encoded on its own (no special tokens) and joined with the
tokenizer's end-of-text id; the stream is cut into non-overlapping windows of --window tokens, and every
token after a window's first is scored (so each has at least one token of context). Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
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

    @jax.jit
    def nll(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0].sum(axis=1)

    start = time.perf_counter()
    sums = np.concatenate([np.asarray(nll(params, rows[i:i + args.batch])) for i in range(0, len(rows), args.batch)])
    seconds = time.perf_counter() - start
    scored = n_windows * (window - 1)
    mean = float(sums[:n_windows].sum() / scored)
    result = {"model": loaded.source, "text": "pydoc_data.topics (sorted, joined with end-of-text)",
              "tokens_scored": scored, "window": window, "nll_nats_per_token": mean, "perplexity": float(np.exp(mean)),
              "seconds": seconds, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "command": " ".join(["python", *sys.argv])}
    print(f"{'model':<40} {'tokens':>8} {'window':>6} {'nll/token':>9} {'perplexity':>10} {'seconds':>7}")
    print(f"{os.path.basename(loaded.source):<40} {scored:>8} {window:>6} {mean:>9.4f} {np.exp(mean):>10.3f} "
          f"{seconds:>7.1f}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
