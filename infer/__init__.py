"""meshlm.infer: KV cache, sampling, decode loop, speculative sampling, engine and server.
Imports model/ and data/'s tokenizers, never train/ (see DESIGN.md). Lands with the inference issue."""
