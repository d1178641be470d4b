"""Exceptions raised by the dataset readers in :mod:`bilevel.data`."""


class DataError(Exception):
    """Base class for every dataset loading problem."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The dataset files are missing; the message lists the paths tried and how to fix it."""


class DataFormatError(DataError, ValueError):
    """A dataset file exists but is corrupt, truncated or not in the expected format."""
