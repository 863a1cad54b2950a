"""meshlm.data: sources, cleaning, dedup, tokenizers, packing, token store and loader.
Imports none of model/, train/, infer/ (see DESIGN.md). Lands with the data issue."""
