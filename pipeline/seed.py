"""The `seed` stage: import the manifest's seed set into data/seed/{train,test}.parquet.

All of data/seed (both splits, and for the demo its synthetic web) is built in a temporary folder and swapped
in at the end, so a failed import leaves the previous set, or nothing, never part of one.
"""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from . import demo
from .atomic import atomic_path
from .errors import InputError, ParamsError
from .manifest import Manifest, load_manifest
from .params import Params
from .paths import Paths
from .shards import IMAGE_SCHEMA, sha256_hex, write_table

# Folder datasets without a `split` column: this share goes to test, stratified by class, seeded by params.seed.
FOLDER_TEST_FRACTION = 0.2


def stratified_split(keys: list[str], classes: list[str | None], fraction: float, seed: int) -> dict[str, str]:
    """train/test per key: round(fraction * n) test keys (at least one, and one train key), shared out among
    classes by largest remainder so every class keeps its share, picked at random within each class."""
    groups: dict[str | None, list[str]] = defaultdict(list)
    for key, cls in zip(keys, classes):
        groups[cls].append(key)
    order = sorted(groups, key=lambda c: (c is None, c or ""))
    n = len(keys)
    n_test = min(max(round(n * fraction), 1), n - 1) if n > 1 else 0
    ideal = {c: len(groups[c]) * n_test / max(n, 1) for c in order}
    quota = {c: int(ideal[c]) for c in order}
    for c in sorted(order, key=lambda c: quota[c] - ideal[c])[: n_test - sum(quota.values())]:
        quota[c] += 1
    rng = np.random.default_rng([seed, 4])
    test = set()
    for c in order:
        members = sorted(groups[c])
        test.update(members[j] for j in rng.permutation(len(members))[: quota[c]])
    return {key: "test" if key in test else "train" for key in keys}


def _table(rows: list[dict]) -> pa.Table:
    rows = sorted(rows, key=lambda r: r["id"])
    return pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)


def _row(id_: str, png: bytes, size: tuple[int, int], captions: list[str], split: str, cls: str | None, source: str) -> dict:
    return {
        "id": id_,
        "image": png,
        "width": size[0],
        "height": size[1],
        "captions": captions,
        "split": split,
        "class": cls,
        "source": source,
        "url": None,
        "sha256": sha256_hex(png),
    }


def _import_demo(params: Params, paths: Paths, folder: Path) -> tuple[list[dict], dict]:
    images = demo.seed_images(params)
    split = stratified_split([s.id for s in images], [s.digit for s in images], params.demo.test_fraction, params.seed)
    rows = [_row(s.id, s.png, s.pixels.shape[1::-1], s.captions, split[s.id], s.digit, "demo") for s in images]
    test_ids = {key for key, value in split.items() if value == "test"}
    web = folder / paths.demo_web.relative_to(paths.seed)
    kinds = demo.write_web(params, images, test_ids, web, paths.demo_web.resolve())
    return rows, {"web_urls": sum(kinds.values()), "web_kinds": kinds}


def _read_captions(csv_path: Path) -> dict[str, dict]:
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
                raise InputError(f"{csv_path}: line {line}: {name} has another class or split than on line {entry['line']}")
            entry["captions"].append(caption)
    if not entries:
        raise InputError(f"{csv_path}: no rows ({expected})")
    return entries


def _import_folder(manifest: Manifest, params: Params, paths: Paths) -> tuple[list[dict], dict]:
    if manifest.seed.path is None:
        raise ParamsError(f"{paths.manifest(params.dataset)}: seed.path: the folder importer needs the dataset's folder")
    folder = Path(manifest.seed.path)
    folder = folder if folder.is_absolute() else paths.root / folder
    csv_path = folder / "captions.csv"
    entries = _read_captions(csv_path)
    unsplit = sorted(name for name, e in entries.items() if e["split"] is None)
    default = stratified_split(unsplit, [entries[n]["class"] for n in unsplit], FOLDER_TEST_FRACTION, params.seed)
    rows = []
    for name in sorted(entries):
        path = folder / name
        if not path.is_file():
            raise InputError(f"{path}: image listed in {csv_path} not found")
        try:
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image).convert("RGB")
        except (OSError, Image.DecompressionBombError) as exc:
            raise InputError(f"{path}: not a readable image ({exc})") from None
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        entry = entries[name]
        split = entry["split"] or default[name]
        rows.append(_row(f"{manifest.name}-{Path(name).as_posix()}", buffer.getvalue(), image.size,
                         entry["captions"], split, entry["class"], manifest.name))
    return rows, {}


def run(params: Params, paths: Paths) -> dict:
    manifest = load_manifest(params.dataset, paths)
    with atomic_path(paths.seed) as tmp:
        tmp.mkdir()
        if manifest.seed.importer == "demo":
            rows, summary = _import_demo(params, paths, tmp)
        else:
            rows, summary = _import_folder(manifest, params, paths)
        counts = {}
        for split in ("train", "test"):
            chosen = [r for r in rows if r["split"] == split]
            write_table(_table(chosen), tmp / paths.seed_split(split).relative_to(paths.seed))
            counts[split] = len(chosen)
    classes = {r["class"] for r in rows if r["class"] is not None}
    return {"importer": manifest.seed.importer, **counts, "classes": len(classes), **summary}
