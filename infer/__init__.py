"""meshlm.infer: generation. For now `naive.py` samples by recomputing the full forward per token;
the KV cache, decode loop, speculative sampling, engine and server land with the inference issues.
Imports model/ and data/'s tokenizers, never train/ (see DESIGN.md)."""
