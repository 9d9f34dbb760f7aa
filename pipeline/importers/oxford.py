"""Oxford-102 flowers with the Reed et al. captions, in the layout of the two releases:

    <path>/jpg/image_00001.jpg ... image_08189.jpg
    <path>/imagelabels.mat    'labels': the class (1..102) of image i at position i-1
    <path>/setid.mat          'trnid', 'valid', 'tstid': 1-based image numbers; trnid and valid become train
    <path>/text_c10/class_00077/image_00001.txt   ten captions, one a line

The release has no class names file, so the class is Reed et al.'s folder name, e.g. "class_00077".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from dextra.pipeline.errors import InputError
from dextra.pipeline.importers.records import Record
from dextra.pipeline.manifest import OxfordSeed

SPLITS = {"trnid": "train", "valid": "train", "tstid": "test"}


def _load_mat(path: Path, keys: tuple[str, ...], expected: str) -> dict[str, np.ndarray]:
    """The named arrays of a MATLAB file, each flattened to positive whole numbers."""
    if not path.is_file():
        raise InputError(f"{path}: file not found (expected {expected})")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises anything from IndexError to MatReadError on a broken file
        raise InputError(f"{path}: not a readable MATLAB file ({exc}; expected {expected})") from None
    out = {}
    for key in keys:
        if key not in mat:
            raise InputError(f"{path}: no variable {key!r} (expected {expected})")
        values = np.asarray(mat[key])
        if (
            values.dtype.kind not in "iuf"
            or values.size == 0
            or not np.all(values == np.round(values))
            or values.min() < 1
        ):
            raise InputError(f"{path}: {key!r} is not a list of positive whole numbers (expected {expected})")
        out[key] = values.astype(np.int64).ravel()
    return out


def read(seed: OxfordSeed, folder: Path) -> tuple[list[Record], dict]:
    labels_path, setid_path = folder / "imagelabels.mat", folder / "setid.mat"
    labels = _load_mat(labels_path, ("labels",), "'labels', the class 1..102 of each image")["labels"]
    sets = _load_mat(setid_path, tuple(SPLITS), "'trnid', 'valid', 'tstid', 1-based image numbers")
    split_of: dict[int, str] = {}
    for key, split in SPLITS.items():
        for number in sets[key].tolist():
            if number > len(labels):
                raise InputError(
                    f"{setid_path}: {key!r} names image {number}, but {labels_path} labels only {len(labels)}"
                )
            if number in split_of:
                raise InputError(f"{setid_path}: image {number} is in more than one of trnid, valid, tstid")
            split_of[number] = split
    records = []
    for number in sorted(split_of):
        name, cls = f"image_{number:05d}", f"class_{labels[number - 1]:05d}"
        records.append(
            Record(
                name,
                folder / "jpg" / f"{name}.jpg",
                split_of[number],
                cls,
                caption_file=folder / seed.captions / cls / f"{name}.txt",
                listed_in=setid_path,
            )
        )
    return records, {}
