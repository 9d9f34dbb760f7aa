"""COCO captions 2014, in the layout of the release:

    <path>/annotations/captions_train2014.json, captions_val2014.json
        {"images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg", ...}, ...],
         "annotations": [{"image_id": 9, "caption": "...", ...}, ...]}
    <path>/train2014/COCO_train2014_000000000009.jpg, <path>/val2014/COCO_val2014_000000000042.jpg

train2014 is the train split and val2014 the test split, as in text-to-image COCO results. COCO captions name no
class. The manifest's `subset:` keeps a fixed random part (the full set is 82,783 + 40,504 images).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path, PurePosixPath

from dextra.pipeline.errors import InputError
from dextra.pipeline.importers.files import read_text
from dextra.pipeline.importers.records import Record
from dextra.pipeline.manifest import CocoSeed

SPLITS = {"train": "train2014", "test": "val2014"}
_EXPECTED = 'COCO captions JSON: {"images": [{"id", "file_name"}, ...], "annotations": [{"image_id", "caption"}, ...]}'


def _load(path: Path) -> dict:
    try:
        data = json.loads(read_text(path, _EXPECTED))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc}; expected {_EXPECTED})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise InputError(f"{path}: no 'images' and 'annotations' lists (expected {_EXPECTED})")
    return data


def _records(path: Path, image_dir: Path, split: str) -> tuple[list[Record], int]:
    """The split's captioned images, and how many images it lists without a caption."""
    data = _load(path)
    files: dict[int, str] = {}
    for i, image in enumerate(data["images"]):
        if not (
            isinstance(image, dict) and isinstance(image.get("id"), int) and isinstance(image.get("file_name"), str)
        ):
            raise InputError(f"{path}: images[{i}] has no integer 'id' and string 'file_name'")
        if image["id"] in files:
            raise InputError(f"{path}: images[{i}]: id {image['id']} appears twice")
        files[image["id"]] = image["file_name"]
    captions: dict[int, list[str]] = defaultdict(list)
    for i, note in enumerate(data["annotations"]):
        if not (
            isinstance(note, dict) and isinstance(note.get("image_id"), int) and isinstance(note.get("caption"), str)
        ):
            raise InputError(f"{path}: annotations[{i}] has no integer 'image_id' and string 'caption'")
        if note["image_id"] not in files:
            raise InputError(f"{path}: annotations[{i}]: image_id {note['image_id']} is not in 'images'")
        caption = " ".join(note["caption"].split())  # COCO captions carry stray newlines and double spaces
        if not caption:
            raise InputError(f"{path}: annotations[{i}]: empty caption")
        captions[note["image_id"]].append(caption)
    records = [
        Record(
            PurePosixPath(name).with_suffix("").as_posix(),
            image_dir / name,
            split,
            None,
            tuple(captions[id_]),
            listed_in=path,
        )
        for id_, name in files.items()
        if captions[id_]
    ]
    return records, len(files) - len(records)


def read(seed: CocoSeed, folder: Path) -> tuple[list[Record], dict]:
    records, uncaptioned = [], 0
    for split, name in SPLITS.items():
        found, missing = _records(folder / "annotations" / f"captions_{name}.json", folder / name, split)
        records += found
        uncaptioned += missing
    seen: set[str] = set()
    for record in records:
        if record.key in seen:
            raise InputError(
                f"{record.listed_in}: {record.key!r} is listed as two images (keys must be unique across train and val)"
            )
        seen.add(record.key)
    return records, {"uncaptioned": uncaptioned}
