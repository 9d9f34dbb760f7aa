"""A plain folder: <path>/captions.csv with filename, caption[, class][, split], several rows per image allowed."""

from __future__ import annotations

import csv
from pathlib import Path

from dextra.pipeline.errors import InputError
from dextra.pipeline.importers.records import Record
from dextra.pipeline.manifest import FolderSeed

CSV_NAME = "captions.csv"


def read_captions_csv(csv_path: Path) -> dict[str, dict]:
    """filename -> captions (in file order), class and split; several rows for one file add captions."""
    expected = "expected columns filename, caption[, class][, split]"
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: file not found ({expected})")
    entries: dict[str, dict] = {}
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        missing = [c for c in ("filename", "caption") if c not in reader.fieldnames]
        if missing:
            raise InputError(f"{csv_path}: missing column(s) {', '.join(missing)} ({expected})")
        for line, record in enumerate(reader, start=2):
            name, caption = (record["filename"] or "").strip(), (record["caption"] or "").strip()
            cls = (record.get("class") or "").strip() or None
            split = (record.get("split") or "").strip() or None
            if not name or not caption:
                raise InputError(f"{csv_path}: line {line}: empty filename or caption")
            if split not in (None, "train", "test"):
                raise InputError(f"{csv_path}: line {line}: split {split!r}, expected train or test")
            entry = entries.setdefault(name, {"captions": [], "class": cls, "split": split, "line": line})
            if (entry["class"], entry["split"]) != (cls, split):
                raise InputError(
                    f"{csv_path}: line {line}: {name} has another class or split than on line {entry['line']}"
                )
            entry["captions"].append(caption)
    if not entries:
        raise InputError(f"{csv_path}: no rows ({expected})")
    return entries


def read(seed: FolderSeed, folder: Path) -> tuple[list[Record], dict]:
    csv_path = folder / CSV_NAME
    entries = read_captions_csv(csv_path)
    records = [
        Record(Path(name).as_posix(), folder / name, e["split"], e["class"], tuple(e["captions"]), listed_in=csv_path)
        for name, e in sorted(entries.items())
    ]
    return records, {}
