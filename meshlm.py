"""The `meshlm` command line. Thin: parse arguments, compose the packages.

    meshlm demo [--preset small] [--mesh data=2,fsdp=2,tensor=2]
    meshlm plan --preset llama3-70b --mesh fsdp=-1,tensor=8 --devices 256
    meshlm data prepare --out runs/data/stdlib [--tokenizer bpe:8192] [--seq-len 256]
    meshlm data show runs/data/stdlib
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time


def _set_host_devices(count: int) -> None:
    """Simulate `count` CPU devices. Must run before JAX is imported; it only
    affects the CPU platform, so it is harmless where a GPU or TPU is used."""
    if "jax" in sys.modules:
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _print_layout(rows: list[dict], mesh_shape: dict[str, int]) -> None:
    width = max(len(r["path"]) for r in rows)
    print(f"\n{'parameter':<{width}}  {'shape':<22} {'logical axes':<38} {'sharding':<34} per-device shard")
    for r in rows:
        axes = "(" + ", ".join(str(a) for a in r["logical_axes"]) + ")"
        spec = "P(" + ", ".join(repr(e) for e in r["spec"]) + ")"
        print(f"{r['path']:<{width}}  {str(r['shape']):<22} {axes:<38} {spec:<34} {r['shard_shape']}")
    print(f"mesh: {', '.join(f'{k}={v}' for k, v in mesh_shape.items())}")


def _summary(config, seq_len: int) -> None:
    from model import flops_per_token, param_count

    print(f"parameters: {param_count(config):,} ({_human(param_count(config))})")
    print(f"FLOPs per token at seq_len {seq_len}: {_human(flops_per_token(config, seq_len))} "
          f"(training: 6N + 12*L*H*d*T; forward alone is a third)")


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a preset on a mesh, run a sharded forward pass and check it against one device."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from model import cross_entropy, get_preset, init_on_mesh, make_mesh, parse_mesh, sharded_forward
    from model.placement import abstract_model, init_model
    from model.sharding import DEFAULT_RULES, describe_layout

    config = get_preset(args.preset)
    seq_len = min(args.seq_len, config.max_seq_len)
    mesh = make_mesh(parse_mesh(args.mesh))
    print(f"meshlm demo: preset {args.preset!r} on {mesh.devices.size} {jax.devices()[0].platform} devices")
    _summary(config, seq_len)
    _print_layout(describe_layout(nnx.state(abstract_model(config)), mesh, DEFAULT_RULES), dict(mesh.shape))

    model = init_on_mesh(config, mesh, seed=args.seed)
    forward = sharded_forward(model, mesh)
    batch = args.batch
    rng = np.random.default_rng(args.seed)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, seq_len + 1)), jnp.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    state = nnx.state(model)
    logits = forward(state, inputs)
    jax.block_until_ready(logits)
    start = time.perf_counter()
    for _ in range(args.repeats):
        logits = forward(state, inputs)
    jax.block_until_ready(logits)
    seconds = (time.perf_counter() - start) / args.repeats
    loss = float(cross_entropy(logits, targets))
    print(f"\nsharded forward: tokens {tuple(inputs.shape)} -> logits {tuple(logits.shape)} "
          f"laid out as {logits.sharding.spec}")
    print(f"loss {loss:.4f} (ln vocab = {math.log(config.vocab_size):.4f} for an untrained model), "
          f"{batch * seq_len / seconds:,.0f} tokens/s")

    single = init_model(config, seed=args.seed)(inputs)
    print(f"max |logits - single-device logits| = {float(jnp.max(jnp.abs(logits - single))):.2e}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Lay out a preset on a mesh of any size without allocating it: shapes, shardings, memory."""
    from flax import nnx

    from model import get_preset, parse_mesh
    from model.placement import abstract_model
    from model.sharding import DEFAULT_RULES, describe_layout, make_abstract_mesh

    config = get_preset(args.preset)
    mesh = make_abstract_mesh(parse_mesh(args.mesh), args.devices)
    print(f"meshlm plan: preset {args.preset!r} on {args.devices} devices")
    _summary(config, args.seq_len or config.max_seq_len)
    rows = describe_layout(nnx.state(abstract_model(config)), mesh, DEFAULT_RULES)
    _print_layout(rows, dict(mesh.shape))
    import numpy as np

    elements = sum(math.prod(r["shard_shape"]) for r in rows)
    param_bytes = sum(math.prod(r["shard_shape"]) * np.dtype(r["dtype"]).itemsize for r in rows)
    print(f"parameter memory per device: {param_bytes / 2**30:.2f} GiB; "
          f"with AdamW's two float32 moments: {(param_bytes + 8 * elements) / 2**30:.2f} GiB")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """Raw documents -> token store, with a stage report."""
    import datasets

    from data.clean import FilterConfig
    from data.pipeline import PrepareConfig, prepare

    if not args.progress:
        datasets.disable_progress_bars()
    config = PrepareConfig(
        out=args.out, source=args.source, text_field=args.text_field, limit=args.limit, tokenizer=args.tokenizer,
        bpe_train_bytes=int(args.bpe_train_mb * 1e6), seq_len=args.seq_len, drop_tail=args.drop_tail,
        filter=FilterConfig(min_chars=args.min_chars, max_chars=args.max_chars, min_alnum_share=args.min_alnum_share,
                            max_repeated_line_share=args.max_repeated_line_share, max_line_chars=args.max_line_chars),
        near_dedup=not args.no_near_dedup, dedup_threshold=args.dedup_threshold, num_proc=args.num_proc,
        overwrite=args.overwrite, seed=args.seed,
    )
    prepare(config)
    return 0


def cmd_data_show(args: argparse.Namespace) -> int:
    """What a token store holds: its metadata, stage counts and the first rows decoded."""
    from data.pipeline import store_tokenizer
    from data.report import StageStats, format_table
    from data.store import open_store

    store = open_store(args.store)
    meta = store.metadata
    tokenizer = store_tokenizer(store)
    print(f"token store {store.path}: {store.num_rows:,} rows x {store.seq_len + 1} tokens, "
          f"tokenizer {meta['tokenizer']['name']} (vocab {tokenizer.vocab_size:,}, eos {tokenizer.eos_id}), "
          f"created {meta.get('created')}")
    if meta.get("stages"):
        print(format_table([StageStats(**stage) for stage in meta["stages"]]))
    tokens, segments = store.read_rows(list(range(min(args.rows, store.num_rows))))
    for i, (row, seg) in enumerate(zip(tokens, segments, strict=True)):
        print(f"\n--- row {i} ({int(seg.max())} segments) ---")
        print(tokenizer.decode(row[seg > 0].tolist())[: args.chars])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshlm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job: build a preset on a mesh and run a sharded forward pass")
    demo.add_argument("--preset", default="small")
    demo.add_argument("--mesh", default="data=2,fsdp=2,tensor=2", help="AXIS=SIZE,... over data/stage/fsdp/tensor")
    demo.add_argument("--cpu-devices", type=int, default=8, help="simulated CPU devices (CPU platform only)")
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--seq-len", type=int, default=256)
    demo.add_argument("--repeats", type=int, default=3)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    plan = sub.add_parser("plan", help="lay out a preset on any mesh without allocating it")
    plan.add_argument("--preset", required=True)
    plan.add_argument("--mesh", required=True, help="AXIS=SIZE,... over data/stage/fsdp/tensor; one may be -1")
    plan.add_argument("--devices", type=int, required=True, help="number of devices in the planned mesh")
    plan.add_argument("--seq-len", type=int, default=None)
    plan.set_defaults(func=cmd_plan)

    data = sub.add_parser("data", help="the data pipeline").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="documents -> clean -> filter -> dedup -> tokenize -> pack -> token store")
    prep.add_argument("--out", required=True, help="where to write the token store (a directory or kvstore URL)")
    prep.add_argument("--source", default="stdlib",
                      help="stdlib (the embedded corpus), a .txt/.jsonl/.parquet file, directory or glob, "
                      "or hf:NAME[:SPLIT]")
    prep.add_argument("--text-field", default="text", help="field of .jsonl/.parquet/hub records holding the text")
    prep.add_argument("--limit", type=int, default=None, help="use only the first N documents")
    prep.add_argument("--tokenizer", default="cl100k_base",
                      help="cl100k_base, o200k_base, bpe:VOCAB (train on the corpus) or a .tiktoken file")
    prep.add_argument("--bpe-train-mb", type=float, default=20.0, help="text used to train bpe:VOCAB")
    prep.add_argument("--seq-len", type=int, default=256)
    prep.add_argument("--drop-tail", action="store_true", help="drop the last, padded row")
    prep.add_argument("--min-chars", type=int, default=64)
    prep.add_argument("--max-chars", type=int, default=2_000_000)
    prep.add_argument("--min-alnum-share", type=float, default=0.25)
    prep.add_argument("--max-repeated-line-share", type=float, default=0.5)
    prep.add_argument("--max-line-chars", type=int, default=5_000)
    prep.add_argument("--no-near-dedup", action="store_true", help="skip MinHash near-duplicate removal")
    prep.add_argument("--dedup-threshold", type=float, default=0.8, help="Jaccard similarity of near-duplicates")
    prep.add_argument("--num-proc", type=int, default=max(1, min(os.cpu_count() or 1, 8)))
    prep.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    prep.set_defaults(func=cmd_data_prepare)
    show = data.add_parser("show", help="a token store's metadata, stage counts and first rows")
    show.add_argument("store")
    show.add_argument("--rows", type=int, default=2)
    show.add_argument("--chars", type=int, default=400, help="characters of each row to print")
    show.set_defaults(func=cmd_data_show)

    args = parser.parse_args(argv)
    if getattr(args, "cpu_devices", None):
        _set_host_devices(args.cpu_devices)
    try:
        return args.func(args)
    except Exception as error:
        if not _is_user_error(error):
            raise
        print(f"meshlm {args.command}: error: {error}", file=sys.stderr)
        return 2


USER_ERRORS = {"model.config.ConfigError", "model.sharding.ShardingError", "data.errors.DataError"}


def _is_user_error(error: Exception) -> bool:
    """Bad input (a config, mesh or data problem) gets a one-line message; a bug keeps its traceback.
    Checked by name so the data commands need not import JAX (data workers are forked)."""
    return any(f"{cls.__module__}.{cls.__qualname__}" in USER_ERRORS for cls in type(error).__mro__)


if __name__ == "__main__":
    sys.exit(main())
