"""meshlm.infer: generation. sampling.py (request options, logits -> distribution), decode.py (prefill
into a KV cache, the on-device decode loop, streaming), speculative.py (draft + target, exact rejection
sampling), generate.py (checkpoints, text, stop strings). Imports model/ and data/'s tokenizers, never
train/ (README: Architecture)."""
