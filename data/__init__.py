"""meshlm.data: sources, cleaning, dedup, tokenizers, packing, the token store and the loader;
`pipeline.prepare` runs them all. Imports none of model/, train/, infer/ (README: Architecture)."""
