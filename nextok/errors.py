"""Errors nextok raises for problems a user can fix (bad files, bad values)."""


class ModelLoadError(ValueError):
    """A checkpoint cannot be loaded: the message names the file and the problem, in one line."""
