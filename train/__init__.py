"""meshlm.train: run config, optimiser and sharded train step, the training loop, Orbax checkpoints
and metrics. Imports model/ and data/, never infer/ (README: Architecture)."""
