"""meshlm.infer: generation and serving. Imports model/ and data/'s tokenizers, never train/ (README:
Architecture).

    sampling.py      request options, the one request check, the one draw, the one row-done rule
    step.py          the one decode step (a batch of rows over a KV cache), prefill, what decoders share
    decode.py        Decoder: prefill + the on-device decode loop, streaming
    speculative.py   SpeculativeDecoder: draft + target, exact rejection sampling
    generate.py      text in, text out: stop strings, streaming text, chat templates
    engine.py        Engine: prefill / insert / generate over the slots of one batched KV cache
    scheduler.py     continuous (or static) batching over an Engine, the request queue, the prefix cache
    prefix_cache.py  KV of earlier prompts and turns, by token blocks
    server.py        the OpenAI-compatible HTTP server; metrics.py its Prometheus metrics
"""
