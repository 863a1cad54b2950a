"""The one base class of model/'s errors: bad input (a config, mesh, checkpoint or weights file the model
cannot use). The `meshlm` command line prints such an error as one line; anything else is a bug and keeps
its traceback. Imports nothing, so the command line can catch it without importing JAX."""


class ModelError(ValueError):
    """A model config, mesh, checkpoint, weights file or pipeline setting that cannot work; the message says
    what and why. ConfigError, ShardingError, CheckpointError, WeightsError and PipelineError derive from it."""
