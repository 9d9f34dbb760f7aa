"""Split lists that come as pickles (CUB's train/filenames.pickle, test/filenames.pickle), read without running them.

Loading a pickle can call any importable function, and these files come from the internet. The lists only ever hold
strings, so this unpickler resolves no global at all: an opcode that needs a class or function (GLOBAL, STACK_GLOBAL,
INST, OBJ, EXT*) is refused when it is read, before anything it names could be called, and what comes out must be a
list of strings.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from dextra.pipeline.errors import InputError


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which could run code")


def read_string_list(path: Path, expected: str) -> list[str]:
    """The list of strings pickled in `path`; anything else is an InputError naming the file and `expected`."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found (expected {expected})") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder (expected {expected})") from None
    try:
        value = _NoGlobals(io.BytesIO(data), encoding="utf-8").load()
    except Exception as exc:  # any failure of an untrusted byte stream is a malformed file
        raise InputError(
            f"{path}: refused: not a plain pickled list of strings ({type(exc).__name__}: {exc}; expected {expected})"
        ) from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        got = (
            type(value).__name__
            if not isinstance(value, list)
            else "a list holding "
            + ", ".join(sorted({type(item).__name__ for item in value if not isinstance(item, str)}))
        )
        raise InputError(f"{path}: holds {got} (expected {expected})")
    return value
