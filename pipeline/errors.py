"""Errors meant for a person: the CLI prints the message as one line and exits with `exit_code`."""


class DextraError(Exception):
    exit_code = 1


class ParamsError(DextraError, ValueError):
    """params.yaml or a manifest cannot be used."""

    exit_code = 2


class InputError(DextraError, ValueError):
    """An input file is missing or malformed; the message names the file and what was expected."""
