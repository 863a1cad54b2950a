"""meshlm.train: optimiser, sharded train step, loop, checkpoints and metrics.
Imports model/ and data/, never infer/ (see DESIGN.md). Lands with the training issue."""
