"""The one base class of model/'s errors: bad input (a config, mesh, checkpoint or weights file the model
cannot use). The `meshlm` command line prints such an error as one line; anything else is a bug and keeps
its traceback. Imports nothing, so the command line can catch it without importing JAX."""


class ModelError(ValueError):
    """A model config, mesh, checkpoint, weights file or pipeline setting that cannot work; the message says
    what and why. ConfigError, ShardingError, CheckpointError, WeightsError and PipelineError derive from it."""


class ClusterError(ModelError):
    """A multi-process setup that cannot work: ids that do not cover 0..N-1, a coordinator that cannot be
    reached, missing settings."""
