"""The one base class of train/'s errors that are not bugs: a run config that cannot work, or a run
stopped on purpose. The `meshlm` command line prints such an error as one line. Imports nothing, so the
command line can catch it without importing JAX."""


class TrainError(Exception):
    """A run that cannot start or was stopped on purpose; the message says what and why.
    TrainConfigError and TrainingStopped derive from it."""
