"""The one error type of the data pipeline: bad input, named clearly."""


class DataError(ValueError):
    """A source, setting or store that the pipeline cannot use; the message says what and why."""
