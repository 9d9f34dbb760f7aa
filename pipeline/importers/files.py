"""Reading a dataset's small text files, so every missing or broken one is the same kind of error."""

from __future__ import annotations

from pathlib import Path

from dextra.pipeline.errors import InputError


def read_text(path: Path, expected: str) -> str:
    """The file's UTF-8 text; `expected` says what the file should be, for the error a person reads."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found (expected {expected})") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder (expected {expected})") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}; expected {expected})") from None


def read_captions(path: Path) -> list[str]:
    """A Reed et al. caption file: one caption a line (ten in CUB and Oxford); blank lines are skipped."""
    expected = "a text file with one caption a line"
    captions = [line.strip() for line in read_text(path, expected).splitlines() if line.strip()]
    if not captions:
        raise InputError(f"{path}: no captions (expected {expected})")
    return captions
