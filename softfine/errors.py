"""Errors that the CLI turns into one clear line and a non-zero exit."""


class SoftFiNEError(Exception):
    """Base class: a problem the user can fix (bad input, bad flag, missing device)."""


class DataError(SoftFiNEError):
    """A data file is missing, empty or malformed; the message names the file and line."""


class ConfigError(SoftFiNEError, ValueError):
    """An impossible hyperparameter or option; the message names the flag."""


class DeviceError(SoftFiNEError):
    """The requested device cannot be used (e.g. CUDA asked for, none visible to torch)."""


class StorageError(SoftFiNEError):
    """A file cannot be written (a full disk, no permission); the message names it."""


def first_line(err: BaseException) -> str:
    """An exception's first line, with its type: what a one-line error can quote of it."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__
