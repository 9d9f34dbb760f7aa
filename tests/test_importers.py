"""The seed importers on small fixtures in each dataset's real layout and file formats: CUB-200-2011 with Reed et al.
captions and pickled split lists, Oxford-102 with .mat files, COCO captions JSON, and a plain folder."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import yaml
from PIL import Image

from dextra.pipeline.errors import InputError, ParamsError
from dextra.pipeline.importers.safe_pickle import read_string_list
from dextra.pipeline.manifest import load_manifest
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import file_sha256, read_table
from dextra.pipeline.stages import seed
from tests.helpers import REPO

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
CUB_TRAIN = [
    f"{CUB_CLASSES[0]}/Black_Footed_Albatross_0046_18",
    f"{CUB_CLASSES[0]}/Black_Footed_Albatross_0009_34",
    f"{CUB_CLASSES[1]}/Laysan_Albatross_0002_1027",
]
CUB_TEST = [f"{CUB_CLASSES[1]}/Laysan_Albatross_0033_658"]


def save_jpeg(path: Path, rgb, size=(24, 16), mode="RGB", **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = rgb if mode != "L" else rgb[0]
    Image.new(mode, size, color).save(path, format="JPEG", **kwargs)
    return path


def ten_captions(stem: str) -> str:
    return "".join(f"caption {i} of {stem}\n" for i in range(10))


def write_manifest(root: Path, name: str, seed_block: dict) -> Paths:
    (root / "manifests").mkdir(exist_ok=True)
    (root / "manifests" / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, "seed": seed_block}))
    return Paths(root)


def rows(paths: Paths) -> dict[str, dict]:
    tables = [read_table(paths.seed_split(s)).to_pylist() for s in ("train", "test")]
    return {r["id"]: r for table in tables for r in table}


def pickle_list(path: Path, names: list, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(names, protocol=protocol))  # protocol 2: the Python 2 era files of AttnGAN


def make_cub(root: Path, images="images", text="text") -> Path:
    """CUB-200-2011 with Reed et al. captions, pickled split lists and the dataset's own index files."""
    keys = sorted(CUB_TRAIN + CUB_TEST)
    for i, key in enumerate(keys):
        save_jpeg(root / images / f"{key}.jpg", (40 * i, 200, 90))
        caption = root / text / f"{key}.txt"
        caption.parent.mkdir(parents=True, exist_ok=True)
        caption.write_text(ten_captions(key.split("/")[1]))
    pickle_list(root / "train" / "filenames.pickle", CUB_TRAIN)
    pickle_list(root / "test" / "filenames.pickle", CUB_TEST)
    index = (root / images).parent
    # The official split differs from the lists: the first two images are test there.
    (index / "images.txt").write_text("".join(f"{i} {k}.jpg\n" for i, k in enumerate(keys, 1)))
    (index / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(CUB_CLASSES, 1)))
    (index / "image_class_labels.txt").write_text(
        "".join(f"{i} {CUB_CLASSES.index(k.split('/')[0]) + 1}\n" for i, k in enumerate(keys, 1))
    )
    (index / "train_test_split.txt").write_text("".join(f"{i} {int(i > 2)}\n" for i in range(1, len(keys) + 1)))
    return root


@pytest.fixture
def cub(tmp_path, make_params):
    folder = make_cub(tmp_path / "CUB-200")
    paths = write_manifest(tmp_path, "birds", {"importer": "cub", "path": str(folder)})
    return paths, folder, make_params(dataset="birds")


def test_cub_follows_the_pickled_lists_and_keeps_the_jpeg_bytes(cub):
    paths, folder, params = cub
    summary = seed.run(params, paths)
    got = rows(paths)
    assert sorted(got) == sorted(f"birds-{k}" for k in CUB_TRAIN + CUB_TEST)
    assert {k for k in CUB_TRAIN} == {i.removeprefix("birds-") for i, r in got.items() if r["split"] == "train"}
    assert (summary["train"], summary["test"], summary["classes"]) == (3, 1, 2)
    row = got[f"birds-{CUB_TRAIN[0]}"]
    assert row["class"] == "001.Black_footed_Albatross" and row["source"] == "birds" and row["url"] is None
    assert row["captions"] == [f"caption {i} of Black_Footed_Albatross_0046_18" for i in range(10)]
    source = folder / "images" / f"{CUB_TRAIN[0]}.jpg"
    assert row["image"] == source.read_bytes() and row["sha256"] == file_sha256(source)
    assert (row["width"], row["height"]) == (24, 16)


def test_cub_official_split_and_attngan_layout(tmp_path, make_params):
    folder = make_cub(tmp_path / "birds", images="CUB_200_2011/images", text="text")
    block = {"importer": "cub", "path": str(folder), "images": "CUB_200_2011/images", "split": "official"}
    paths = write_manifest(tmp_path, "cubofficial", block)
    seed.run(make_params(dataset="cubofficial"), paths)
    got = rows(paths)
    keys = sorted(CUB_TRAIN + CUB_TEST)
    assert [got[f"cubofficial-{k}"]["split"] for k in keys] == ["test", "test", "train", "train"]
    assert {r["class"] for r in got.values()} == set(CUB_CLASSES)
    assert got[f"cubofficial-{CUB_TEST[0]}"]["class"] == "002.Laysan_Albatross"


def test_a_pickle_that_would_run_code_is_refused_without_running_it(cub, tmp_path):
    paths, folder, params = cub
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    evil = pickle.dumps([CUB_TRAIN[0], Payload()], protocol=2)
    (folder / "train" / "filenames.pickle").write_bytes(evil)
    with pytest.raises(InputError, match=r"train/filenames\.pickle: refused.*could run code"):
        seed.run(params, paths)
    assert not marker.exists() and not paths.seed.exists()
    # the payload is live: a plain pickle.loads does create the file
    pickle.loads(evil)[1].close()
    assert marker.exists()


@pytest.mark.parametrize(
    "content, protocol, message",
    [
        ({"train": CUB_TRAIN}, 2, "holds dict"),
        ([CUB_TRAIN[0], 7], 2, "holds a list holding int"),
        ([b"001.x/y"], 4, "holds a list holding bytes"),
        ([b"001.x/y"], 2, "refers to _codecs.encode"),  # protocol 2 builds bytes by calling a function
        (["../../etc/passwd"], 2, 'is not "<class>/<image>"'),
        ([CUB_TRAIN[0], CUB_TRAIN[0]], 2, "listed twice"),
    ],
)
def test_cub_rejects_split_lists_that_are_not_class_image_names(cub, content, protocol, message):
    paths, folder, params = cub
    pickle_list(folder / "train" / "filenames.pickle", content, protocol)
    with pytest.raises(InputError, match=message):
        seed.run(params, paths)
    assert not paths.seed.exists()


def test_unpickler_names_truncated_and_missing_files(tmp_path):
    path = tmp_path / "filenames.pickle"
    path.write_bytes(pickle.dumps(CUB_TRAIN)[:-5])
    with pytest.raises(InputError, match=r"filenames\.pickle: refused: not a plain pickled list"):
        read_string_list(path, "a list")
    with pytest.raises(InputError, match=r"absent\.pickle: file not found \(expected a list\)"):
        read_string_list(tmp_path / "absent.pickle", "a list")
    path.write_bytes(pickle.dumps(CUB_TRAIN, protocol=5))
    assert read_string_list(path, "a list") == CUB_TRAIN


def test_a_missing_caption_file_is_one_error_and_the_previous_seed_set_stays(cub):
    paths, folder, params = cub
    seed.run(params, paths)
    before = {p.name: p.read_bytes() for p in paths.seed.iterdir()}
    caption = folder / "text" / f"{CUB_TEST[0]}.txt"
    caption.unlink()
    with pytest.raises(InputError) as error:
        seed.run(params, paths)
    assert str(error.value) == f"{caption}: file not found (expected a text file with one caption a line)"
    assert {p.name: p.read_bytes() for p in paths.seed.iterdir()} == before
    assert not list(paths.seed.parent.glob(".seed*"))
    caption.write_text("\n  \n")
    with pytest.raises(InputError, match=f"{caption}: no captions"):
        seed.run(params, paths)
    caption.write_bytes(b"a bird\xff\n")
    with pytest.raises(InputError, match=f"{caption}: not UTF-8 text"):
        seed.run(params, paths)


def test_cub_missing_image_and_split_list_name_the_file(cub):
    paths, folder, params = cub
    image = folder / "images" / f"{CUB_TRAIN[1]}.jpg"
    image.unlink()
    with pytest.raises(
        InputError, match=f"{image}: image not found \\(listed in {folder / 'train' / 'filenames.pickle'}\\)"
    ):
        seed.run(params, paths)
    (folder / "test" / "filenames.pickle").unlink()
    with pytest.raises(InputError, match=r"test/filenames\.pickle: file not found \(expected a pickled list"):
        seed.run(params, paths)


@pytest.mark.parametrize(
    "file, text, message",
    [
        ("train_test_split.txt", "1 0\n2 0\n3 1\n", r"train_test_split\.txt: no line for image 4"),
        ("train_test_split.txt", "1 0\n2 0\n3 1\n4 2\n", r"image 4: '2', expected 1 \(train\) or 0 \(test\)"),
        ("image_class_labels.txt", "1 1\n2 1\n3 9\n4 2\n", r"classes\.txt: no line for class id 9"),
        ("images.txt", "1 a.jpg\n1 b.jpg\n", r"images\.txt: line 2: id 1 appears twice"),
        ("classes.txt", "1\n", r"classes\.txt: line 1: '1' is not '<class id> <class name>'"),
        ("classes.txt", "", r"classes\.txt: empty"),
    ],
)
def test_cub_official_index_files_are_checked(tmp_path, make_params, file, text, message):
    folder = make_cub(tmp_path / "cub")
    (folder / file).write_text(text)
    paths = write_manifest(tmp_path, "c", {"importer": "cub", "path": str(folder), "split": "official"})
    with pytest.raises(InputError, match=message):
        seed.run(make_params(dataset="c"), paths)


OXFORD_LABELS = [77, 77, 1, 1, 102, 102]


def make_oxford(root: Path) -> Path:
    """Oxford-102: jpg/, imagelabels.mat, setid.mat (saved by scipy as MATLAB 5 files, like the release) and
    text_c10/."""
    for number, label in enumerate(OXFORD_LABELS, 1):
        name = f"image_{number:05d}"
        mode = "L" if number == 4 else "RGB"  # the release has a few greyscale images
        save_jpeg(root / "jpg" / f"{name}.jpg", (30 * number, 80, 200), mode=mode)
        text = root / "text_c10" / f"class_{label:05d}" / f"{name}.txt"
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_text(ten_captions(name))
    scipy.io.savemat(root / "imagelabels.mat", {"labels": np.array([OXFORD_LABELS], np.uint8)})
    scipy.io.savemat(
        root / "setid.mat",
        {
            "trnid": np.array([[1, 3]], np.uint16),
            "valid": np.array([[5]], np.uint16),
            "tstid": np.array([[2, 4, 6]], np.uint16),
        },
    )
    return root


@pytest.fixture
def oxford(tmp_path, make_params):
    folder = make_oxford(tmp_path / "flowers")
    paths = write_manifest(tmp_path, "flowers", {"importer": "oxford", "path": str(folder)})
    return paths, folder, make_params(dataset="flowers")


def test_oxford_reads_the_mat_files_and_reed_captions(oxford):
    paths, folder, params = oxford
    summary = seed.run(params, paths)
    got = rows(paths)
    assert sorted(got) == [f"flowers-image_{n:05d}" for n in range(1, 7)]
    assert [got[f"flowers-image_{n:05d}"]["split"] for n in range(1, 7)] == [
        "train",
        "test",
        "train",
        "test",
        "train",
        "test",
    ]
    assert [got[f"flowers-image_{n:05d}"]["class"] for n in range(1, 7)] == [f"class_{c:05d}" for c in OXFORD_LABELS]
    assert (summary["train"], summary["test"], summary["classes"]) == (3, 3, 3)
    assert got["flowers-image_00002"]["captions"][9] == "caption 9 of image_00002"
    assert got["flowers-image_00001"]["image"] == (folder / "jpg" / "image_00001.jpg").read_bytes()
    grey = Image.open(io.BytesIO(got["flowers-image_00004"]["image"]))
    assert (grey.format, grey.mode, grey.size) == ("PNG", "RGB", (24, 16))


@pytest.mark.parametrize(
    "file, content, message",
    [
        (
            "setid.mat",
            {"trnid": [[1, 9]], "valid": [[5]], "tstid": [[2]]},
            r"setid\.mat: 'trnid' names image 9, but .*labels only 6",
        ),
        (
            "setid.mat",
            {"trnid": [[1, 2]], "valid": [[2]], "tstid": [[3]]},
            r"image 2 is in more than one of trnid, valid, tstid",
        ),
        ("setid.mat", {"trnid": [[1]], "tstid": [[2]]}, r"setid\.mat: no variable 'valid'"),
        ("imagelabels.mat", {"labels": [[1.5, 2]]}, r"'labels' is not a list of positive whole numbers"),
        ("imagelabels.mat", {"labels": [[0, 2]]}, r"'labels' is not a list of positive whole numbers"),
        ("imagelabels.mat", b"MATLAB garbage", r"imagelabels\.mat: not a readable MATLAB file"),
        ("imagelabels.mat", None, r"imagelabels\.mat: file not found \(expected 'labels'"),
    ],
)
def test_oxford_mat_files_are_checked(oxford, file, content, message):
    paths, folder, params = oxford
    if content is None:
        (folder / file).unlink()
    elif isinstance(content, bytes):
        (folder / file).write_bytes(content)
    else:
        scipy.io.savemat(folder / file, {k: np.array(v) for k, v in content.items()})
    with pytest.raises(InputError, match=message):
        seed.run(params, paths)
    assert not paths.seed.exists()


def test_oxford_missing_caption_names_the_reed_file(oxford):
    paths, folder, params = oxford
    caption = folder / "text_c10" / "class_00102" / "image_00006.txt"
    caption.unlink()
    with pytest.raises(InputError, match=f"^{caption}: file not found"):
        seed.run(params, paths)


def make_coco(root: Path) -> Path:
    """COCO 2014 captions: two JSON files in the release's shape and the two image folders."""
    splits = {"train2014": [9, 25, 30, 34], "val2014": [42, 73]}
    for split, ids in splits.items():
        images = [
            {"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg", "width": 24, "height": 16, "license": 1} for i in ids
        ]
        notes, n = [], 0
        for i in ids[:-1] if split == "train2014" else ids:  # the last train image has no caption
            for k in range(2):
                n += 1
                notes.append({"id": 1000 * i + n, "image_id": i, "caption": f"A photo  of thing {i},\nnumber {k} "})
        for image in images:
            save_jpeg(root / split / image["file_name"], (image["id"] * 3, 50, 50))
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        data = {"info": {}, "licenses": [], "images": images, "annotations": notes}
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(data))
    return root


@pytest.fixture
def coco(tmp_path, make_params):
    folder = make_coco(tmp_path / "coco")
    paths = write_manifest(tmp_path, "coco", {"importer": "coco", "path": str(folder)})
    return paths, folder, make_params(dataset="coco")


def test_coco_train2014_is_train_val2014_is_test(coco):
    paths, folder, params = coco
    summary = seed.run(params, paths)
    got = rows(paths)
    assert sorted(got) == sorted(
        [f"coco-COCO_train2014_{i:012d}" for i in (9, 25, 30)] + [f"coco-COCO_val2014_{i:012d}" for i in (42, 73)]
    )
    assert summary == {"importer": "coco", "train": 3, "test": 2, "corpus": 0, "classes": 0, "uncaptioned": 1}
    row = got["coco-COCO_val2014_000000000042"]
    assert row["split"] == "test" and row["class"] is None
    assert row["captions"] == ["A photo of thing 42, number 0", "A photo of thing 42, number 1"]


def test_coco_subset_is_fixed_by_its_own_seed_and_nested(coco, make_params, tmp_path):
    paths, folder, params = coco

    def subset(size, subset_seed=0, params_seed=0):
        block = {"importer": "coco", "path": str(folder), "subset": {"train": size, "seed": subset_seed}}
        write_manifest(tmp_path, "coco", block)
        seed.run(make_params(dataset="coco", seed=params_seed), paths)
        return {i for i, r in rows(paths).items() if r["split"] == "train"}, len(rows(paths))

    one, total = subset(1)
    two, _ = subset(2)
    assert len(one) == 1 and len(two) == 2 and one < two and total == 3  # test keeps both images: no test size
    assert subset(2, params_seed=5)[0] == two
    draws = {frozenset(subset(1, subset_seed=s)[0]) for s in range(6)}
    assert len(draws) > 1


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda d: d["annotations"].append({"image_id": 999, "caption": "x"}),
            r"annotations\[\d+\]: image_id 999 is not in 'images'",
        ),
        (lambda d: d["images"].append({"id": 9, "file_name": "again.jpg"}), r"images\[4\]: id 9 appears twice"),
        (lambda d: d["images"].append({"file_name": "x.jpg"}), r"images\[4\] has no integer 'id'"),
        (lambda d: d["annotations"].append({"image_id": 9, "caption": " \n"}), r"annotations\[6\]: empty caption"),
        (lambda d: d.pop("annotations"), r"no 'images' and 'annotations' lists"),
    ],
)
def test_coco_json_is_checked(coco, mutate, message):
    paths, folder, params = coco
    path = folder / "annotations" / "captions_train2014.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=f"{path}: {message}"):
        seed.run(params, paths)


def test_coco_broken_or_missing_json_is_one_error(coco):
    paths, folder, params = coco
    path = folder / "annotations" / "captions_val2014.json"
    path.write_text('{"images": [')
    with pytest.raises(InputError, match=f"{path}: not valid JSON"):
        seed.run(params, paths)
    path.unlink()
    with pytest.raises(InputError, match=f"{path}: file not found \\(expected COCO captions JSON"):
        seed.run(params, paths)
    assert not paths.seed.exists()


def test_folder_images_are_kept_or_reencoded_upright(tmp_path, make_params):
    photos = tmp_path / "photos"
    kept = save_jpeg(photos / "kept.jpg", (200, 10, 10), size=(30, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    save_jpeg(photos / "rotated.jpg", (10, 200, 10), size=(30, 20), exif=exif.tobytes())
    save_jpeg(photos / "cmyk.jpg", (0, 0, 0, 255), size=(8, 8), mode="CMYK")
    (photos / "cut.jpg").write_bytes(kept.read_bytes()[:200])
    (photos / "captions.csv").write_text(
        "filename,caption,split\nkept.jpg,red,train\nrotated.jpg,green,test\ncmyk.jpg,black,train\n"
    )
    paths = write_manifest(tmp_path, "mine", {"importer": "folder", "path": "photos"})
    seed.run(make_params(dataset="mine"), paths)
    got = rows(paths)
    assert got["mine-kept.jpg"]["image"] == kept.read_bytes()
    rotated = Image.open(io.BytesIO(got["mine-rotated.jpg"]["image"]))
    assert (rotated.format, rotated.size) == ("PNG", (20, 30))
    assert (got["mine-rotated.jpg"]["width"], got["mine-rotated.jpg"]["height"]) == (20, 30)
    cmyk = Image.open(io.BytesIO(got["mine-cmyk.jpg"]["image"]))
    assert (cmyk.format, cmyk.mode) == ("PNG", "RGB")
    with (photos / "captions.csv").open("a") as f:
        f.write("cut.jpg,truncated,train\n")
    with pytest.raises(InputError, match=f"{photos / 'cut.jpg'}: not a readable image"):
        seed.run(make_params(dataset="mine"), paths)


def test_a_missing_dataset_folder_names_it_and_the_manifest(tmp_path, make_params):
    paths = write_manifest(tmp_path, "gone", {"importer": "oxford", "path": "nowhere/flowers"})
    with pytest.raises(InputError, match=r"nowhere/flowers: dataset folder not found \(seed\.path of .*gone\.yaml\)"):
        seed.run(make_params(dataset="gone"), paths)


@pytest.mark.parametrize(
    "block, message",
    [
        ({"importer": "imagenet", "path": "x"}, r"seed: input tag 'imagenet' .* does not match"),
        ({"importer": "cub"}, r"seed\.cub\.path: required but missing"),
        ({"importer": "cub", "path": "x", "split": "random"}, r"seed\.cub\.split"),
        ({"importer": "demo", "subset": {"train": 5}}, r"seed\.demo\.subset: unknown key"),
        ({"importer": "coco", "path": "x", "subset": {"train": 0}}, r"seed\.coco\.subset\.train"),
        ({"importer": "oxford", "path": "x", "captions_dir": "t"}, r"seed\.oxford\.captions_dir: unknown key"),
    ],
)
def test_manifest_seed_blocks_are_validated(tmp_path, block, message):
    paths = write_manifest(tmp_path, "bad", block)
    with pytest.raises(ParamsError, match=message):
        load_manifest("bad", paths)


def test_committed_manifests_are_valid_and_point_at_no_downloads():
    paths = Paths(REPO)
    for name, importer in (("cub", "cub"), ("oxford", "oxford"), ("coco", "coco")):
        manifest = load_manifest(name, paths)
        assert manifest.seed.importer == importer and manifest.allowed_schemes == ["http", "https"]
        assert all(source.url is None and source.path for source in manifest.sources)
