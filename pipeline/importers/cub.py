"""CUB-200-2011 birds with the Reed et al. captions, in the layout of VQ-Diffusion and the paper's code:

    <path>/images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg
    <path>/text/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.txt   ten captions, one a line
    <path>/train/filenames.pickle, <path>/test/filenames.pickle   "<class>/<image>" names   (split: lists)
    images.txt, image_class_labels.txt, classes.txt, train_test_split.txt beside images/    (split: official)

`images` and `text` can be moved by the manifest (AttnGAN keeps the images in CUB_200_2011/images). The class is
the species name of classes.txt, which is also the image's folder, e.g. "001.Black_footed_Albatross".
"""

from __future__ import annotations

from pathlib import Path

from dextra.pipeline.errors import InputError
from dextra.pipeline.importers.files import read_text
from dextra.pipeline.importers.records import Record
from dextra.pipeline.importers.safe_pickle import read_string_list
from dextra.pipeline.manifest import CubSeed

SPLIT_LISTS = {"train": "train/filenames.pickle", "test": "test/filenames.pickle"}
_KEY = '"<class>/<image>"'


def _check_key(key: str, where: str) -> str:
    """A name from a list becomes a path: exactly a class folder and a file, nothing that climbs out."""
    parts = key.split("/")
    if len(parts) != 2 or any(p in ("", ".", "..") for p in parts):
        raise InputError(f"{where}: {key!r} is not {_KEY}")
    return key


def _from_lists(folder: Path) -> dict[str, tuple[str, Path]]:
    """key -> (split, list file) from the pickled train and test lists."""
    out: dict[str, tuple[str, Path]] = {}
    for split, name in SPLIT_LISTS.items():
        path = folder / name
        for i, key in enumerate(read_string_list(path, f"a pickled list of {_KEY} names without extension")):
            _check_key(key, f"{path}: entry {i}")
            if key in out:
                raise InputError(f"{path}: entry {i}: {key!r} is listed twice (also in {out[key][1]})")
            out[key] = (split, path)
    return out


def _index(path: Path, expected: str) -> dict[str, str]:
    """One of CUB's index files: '<id> <value>' a line."""
    out: dict[str, str] = {}
    for n, line in enumerate(read_text(path, f"'{expected}' a line").splitlines(), start=1):
        parts = line.split(maxsplit=1)
        if not parts:
            continue
        if len(parts) != 2:
            raise InputError(f"{path}: line {n}: {line.strip()!r} is not '{expected}'")
        if parts[0] in out:
            raise InputError(f"{path}: line {n}: id {parts[0]} appears twice")
        out[parts[0]] = parts[1].strip()
    if not out:
        raise InputError(f"{path}: empty (expected '{expected}' a line)")
    return out


def _lookup(table: dict[str, str], key: str, path: Path, what: str) -> str:
    if key not in table:
        raise InputError(f"{path}: no line for {what} {key}")
    return table[key]


def _official(images: Path) -> list[tuple[str, str, str, str]]:
    """(key, file name under images/, split, class) from the dataset's own index files."""
    base = images.parent
    paths = {name: base / f"{name}.txt" for name in ("images", "image_class_labels", "classes", "train_test_split")}
    names = _index(paths["images"], "<image id> <class>/<image>.jpg")
    labels = _index(paths["image_class_labels"], "<image id> <class id>")
    classes = _index(paths["classes"], "<class id> <class name>")
    is_train = _index(paths["train_test_split"], "<image id> <1 for train, 0 for test>")
    out = []
    for image_id, name in names.items():
        key = _check_key(name.rsplit(".", 1)[0], f"{paths['images']}: image {image_id}")
        label = _lookup(labels, image_id, paths["image_class_labels"], "image")
        cls = _lookup(classes, label, paths["classes"], "class id")
        flag = _lookup(is_train, image_id, paths["train_test_split"], "image")
        if flag not in ("0", "1"):
            raise InputError(f"{paths['train_test_split']}: image {image_id}: {flag!r}, expected 1 (train) or 0 (test)")
        out.append((key, name, "train" if flag == "1" else "test", cls))
    return out


def read(seed: CubSeed, folder: Path) -> tuple[list[Record], dict]:
    images, captions = folder / seed.images, folder / seed.captions
    if seed.split == "lists":
        listed = _from_lists(folder)
        entries = [(key, f"{key}.jpg", split, key.split("/")[0], path) for key, (split, path) in listed.items()]
    else:
        entries = [(key, name, split, cls, images.parent / "images.txt") for key, name, split, cls in _official(images)]
    records = [
        Record(key, images / name, split, cls, caption_file=captions / f"{key}.txt", listed_in=listed_in)
        for key, name, split, cls, listed_in in sorted(entries)
    ]
    return records, {}
