"""Errors meant for a person: the CLI prints the message as one line and exits with `exit_code`."""

from __future__ import annotations

from pydantic import ValidationError


class DextraError(Exception):
    exit_code = 1


class ParamsError(DextraError, ValueError):
    """params.yaml or a manifest cannot be used."""

    exit_code = 2


class InputError(DextraError, ValueError):
    """An input file is missing or malformed; the message names the file and what was expected."""


def validation_message(source: str, exc: ValidationError, schema: str) -> str:
    """One line naming every field of `source` that the schema (defined in the file `schema`) refuses, and why."""
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            problems.append(f"{field}: unknown key (check the spelling; allowed keys are in {schema})")
        elif error["type"] == "missing":
            problems.append(f"{field}: required but missing")
        else:
            message = error["msg"][0].lower() + error["msg"][1:]
            problems.append(f"{field}: {message} (got {error.get('input')!r})")
    return f"{source}: {'; '.join(problems)}"
