"""The clip stage trains and saves an open_clip model that embed (and every later stage) loads back."""

import importlib.util
import io
import json
import shutil
import threading
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from dextra.filter import clip
from dextra.filter.clip_training import augment, train_contrastive
from dextra.filter.embed import embed_images
from dextra.pipeline.errors import InputError, ParamsError
from dextra.pipeline.params import parse_params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import read_embeddings, sha256_hex, write_table
from dextra.pipeline.stages import clip as clip_stage
from dextra.pipeline.stages import embed

TINY = "dextra-digits-tiny"  # the stage's mechanics on a model that learns in a few steps (no batch norm to warm up)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def seed_shard(path, png, n, split, prefix="s"):
    names = list(COLOURS)
    images = [png(COLOURS[names[i % 4]], 32) for i in range(n)]
    write_table(
        pa.table(
            {
                "id": [f"{prefix}{i}" for i in range(n)],
                "image": images,
                "width": pa.array([32] * n, pa.int32()),
                "height": pa.array([32] * n, pa.int32()),
                "captions": [[f"a {names[i % 4]} square", f"{names[i % 4]} colour"] for i in range(n)],
                "split": [split] * n,
                "class": [names[i % 4] for i in range(n)],
                "source": ["test"] * n,
                "url": pa.array([None] * n, pa.string()),
                "sha256": [sha256_hex(b) for b in images],
            }
        ),
        path,
    )


@pytest.fixture
def seeded(tmp_path, png, make_params):
    paths = Paths(tmp_path)
    seed_shard(paths.seed_split("train"), png, 32, "train")
    seed_shard(paths.seed_split("test"), png, 8, "test", prefix="t")
    params = make_params(
        clip={"model": TINY, "train_epochs": 12, "batch_size": 16, "lr": 0.002}, embed={"batch_size": 8}
    )
    return paths, params


def test_clip_trains_saves_and_loads_back(seeded):
    paths, params = seeded
    summary = clip_stage.run(params, paths)
    epochs = json.loads((paths.clip / clip.MODEL_INFO).read_text())["epochs"]
    assert 1 <= len(epochs) <= 12 and epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    best = min(epochs, key=lambda e: e["heldout_loss"])
    assert summary["best_epoch"] == best["epoch"]
    recall = json.loads((paths.metrics / "clip.json").read_text())
    assert recall["test_images"] == 8 and recall["image_to_text_r5"] >= 0.5
    assert all(0 <= recall[k] <= 1 for k in ("image_to_text_r1", "text_to_image_r1", "text_to_image_r5"))

    bundle = clip.load_clip(paths.clip)
    texts = bundle.encode_texts([f"a {c} square" for c in COLOURS])
    pixels = (
        torch.tensor(np.array([COLOURS[c] for c in COLOURS], np.float32) / 255).view(4, 3, 1, 1).expand(4, 3, 32, 32)
    )
    images = bundle.encode_pixels(pixels).numpy()
    assert np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    # After training, each colour's image is closest to its own caption.
    assert (images @ texts.T).argmax(axis=1).tolist() == [0, 1, 2, 3]


def test_clip_stops_early_and_keeps_the_best_epoch(seeded):
    paths, params = seeded
    diverging = params.model_copy(
        update={"clip": params.clip.model_copy(update={"train_epochs": 30, "lr": 5.0, "patience": 2})}
    )
    clip_stage.run(diverging, paths)
    epochs = json.loads((paths.clip / clip.MODEL_INFO).read_text())["epochs"]
    assert len(epochs) < 30  # stopped: the held-out loss stopped improving
    best = min(
        range(len(epochs)),
        key=lambda e: (
            epochs[e]["heldout_loss"] if epochs[e]["heldout_loss"] == epochs[e]["heldout_loss"] else float("inf")
        ),
    )
    assert len(epochs) - 1 - best == 2


def test_augment_is_seeded_and_changes_no_colour():
    rng = np.random.default_rng(0)
    digits = torch.tensor(rng.random((6, 3, 32, 32)), dtype=torch.float32)
    first = augment(digits, torch.Generator().manual_seed(1))
    assert first.shape == digits.shape and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, augment(digits, torch.Generator().manual_seed(1)))
    assert not torch.allclose(first, augment(digits, torch.Generator().manual_seed(2)))
    # A plain image keeps its colour whatever the draw (up to the light pixel noise): the caption's colour words stay
    # true.
    plain = torch.tensor(list(COLOURS.values()), dtype=torch.float32).div(255).view(4, 3, 1, 1).expand(4, 3, 32, 32)
    out = augment(plain.contiguous(), torch.Generator().manual_seed(3))
    assert torch.allclose(out.mean((2, 3)), plain.mean((2, 3)), atol=0.03) and (out - plain).abs().max() < 0.25


def test_class_loss_teaches_what_captions_do_not_say(tmp_path, png, make_params):
    """Captions that never name the colour give plain CLIP no reason to separate colours; the class term does."""
    paths = Paths(tmp_path)
    seed_shard(paths.seed_split("train"), png, 32, "train")
    seed_shard(paths.seed_split("test"), png, 8, "test", prefix="t")
    table = pq.read_table(paths.seed_split("train"))
    images, classes = table.column("image").to_pylist(), table.column("class").to_pylist()
    captions = [["a square", "one shape"]] * len(images)

    def spread(weight, with_classes=True):
        params = make_params(
            clip={
                "model": TINY,
                "train_epochs": 8,
                "batch_size": 16,
                "lr": 0.002,
                "augment": True,
                "class_loss_weight": weight,
            }
        )
        torch.manual_seed(0)
        bundle = clip.create(params.clip.model, None, torch.device("cpu"))
        labels = classes if with_classes else [None] * len(images)
        history = train_contrastive(bundle, images, captions, params.clip, params.seed, labels)
        vectors = torch.from_numpy(embed_images(bundle, images, params.embed.batch_size)[0])
        same = torch.tensor([[a == b for b in classes] for a in classes])
        similarity = vectors @ vectors.T
        return history, float(similarity[same].mean() - similarity[~same].mean())

    history, separated = spread(1.0)
    plain = spread(0.0)
    assert len(history) >= 1 and all(np.isfinite(e["heldout_loss"]) for e in history)
    assert separated > plain[1] + 0.3
    # Without classes (a COCO-like seed) the weight is ignored: the run equals plain CLIP's.
    assert spread(1.0, with_classes=False) == plain


def test_clip_bad_inputs(tmp_path, make_params):
    with pytest.raises(ParamsError, match="clip.model"):
        clip.create("no-such-model", None, torch.device("cpu"))
    with pytest.raises(InputError, match="train.parquet: file not found"):
        clip_stage.run(make_params(clip={"train_epochs": 1}), Paths(tmp_path))
    assert not (tmp_path / "models").exists()
    with pytest.raises(InputError, match="run `dextra clip` first"):
        clip.load_clip(tmp_path / "models" / "clip")


def encoded(image, fmt, **options):
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def test_batched_decoding_and_preprocessing_match_pil_image_by_image(seeded):
    paths, params = seeded
    bundle = clip.create(TINY, None, torch.device("cpu"))
    cells = np.random.default_rng(1).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    picture = Image.fromarray(cells).resize((32, 48), Image.Resampling.NEAREST)
    files = [
        encoded(picture, "JPEG", quality=85),
        encoded(picture, "PNG"),
        encoded(picture.convert("P"), "PNG"),
        encoded(picture.convert("L"), "JPEG"),
        encoded(picture.convert("RGBA"), "PNG"),
        encoded(picture, "WEBP", lossless=True),
        encoded(picture, "BMP"),
        encoded(picture.convert("I;16"), "PNG"),
        encoded(picture.convert("CMYK"), "JPEG"),
        encoded(picture.resize((40, 40)), "PNG"),
    ]  # BMP and 16-bit PNG: PIL's decoding, as torchvision has none or another
    pixels = [clip.decode_pixels(data) for data in files]
    for data, decoded in zip(files, pixels):
        assert torch.equal(decoded, torch.from_numpy(np.array(clip.decode(data))).permute(2, 0, 1))
    batched = clip.preprocess_pixels(bundle.preprocess, pixels)
    one_by_one = torch.stack([bundle.preprocess(clip.decode(data)) for data in files])
    assert batched.shape == (len(files), 3, 32, 32)
    assert (
        batched - one_by_one
    ).abs().mean() < 0.01  # torch's and PIL's bicubic differ a little where an image is resized
    same_size = [i for i, data in enumerate(files) if min(Image.open(io.BytesIO(data)).size) == 32]
    assert torch.allclose(batched[same_size], one_by_one[same_size], atol=1e-5)  # only cropped: the same pixels
    with pytest.raises(UnidentifiedImageError):
        clip.decode_pixels(b"<html>not an image</html>")


def test_device_decoding_takes_the_cpu_path_image_by_image_where_the_jpeg_decoder_fails(monkeypatch):
    cells = np.random.default_rng(2).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    picture = Image.fromarray(cells).resize((36, 24), Image.Resampling.NEAREST)
    rejected = encoded(picture.rotate(90, expand=True), "JPEG", quality=90)  # stands for one nvJPEG cannot read
    files = [
        encoded(picture, "JPEG", quality=85),
        encoded(picture, "PNG"),  # not a JPEG: never offered to the device decoder
        rejected,
        encoded(picture.convert("L"), "JPEG"),
        encoded(picture.convert("CMYK"), "JPEG"),
    ]
    device_decode, cpu_decode, offered, cpu_decoded = clip.decode_jpeg, clip.decode_pixels, [], []

    def failing_decode(data, **options):
        batch = data if isinstance(data, list) else [data]
        offered.append(len(batch))
        if any(bytes(t.numpy()) == rejected for t in batch):
            raise RuntimeError("nvJPEG: unsupported")
        return device_decode(data, **options)

    def counted_decode_pixels(data):
        cpu_decoded.append(data)
        return cpu_decode(data)

    monkeypatch.setattr(clip, "decode_jpeg", failing_decode)
    monkeypatch.setattr(clip, "decode_pixels", counted_decode_pixels)
    out = clip.decode_on("cpu", files)
    assert offered == [4, 1, 1, 1, 1]  # the batch of JPEGs, then one by one once it failed
    assert cpu_decoded == [files[1], rejected]
    for data, pixels in zip(files, out):
        assert torch.equal(pixels, torch.from_numpy(np.array(clip.decode(data))).permute(2, 0, 1))
    with pytest.raises(UnidentifiedImageError):  # corrupt everywhere: the CPU decoder's error, as on the CPU path
        clip.decode_on("cpu", [files[0], files[0][:3] + b"not a jpeg"])


def test_embedding_with_device_decoding_matches_the_cpu_path(seeded):
    """The CUDA path (decode_on, the model's transforms on device tensors, pHashes of a reduced decode) run on the
    CPU: the same pixels, so the same embeddings; hashes within a few bits where the decode was reduced."""
    bundle = clip.create(TINY, None, torch.device("cpu"))
    bundle.model.eval()
    rng = np.random.default_rng(3)
    smooth = np.cumsum(np.cumsum(rng.normal(size=(300, 450, 3)), axis=0), axis=1)
    smooth = ((smooth - smooth.min()) / np.ptp(smooth) * 255).astype(np.uint8)
    large = Image.fromarray(smooth)
    files = [
        encoded(large, "JPEG", quality=90),  # reduced 2x for its hash
        encoded(large.resize((45, 30)), "JPEG", quality=90),
        encoded(large.resize((40, 56)), "PNG"),
        encoded(large.convert("CMYK").resize((64, 64)), "JPEG"),
    ]
    cpu_vectors, cpu_hashes = embed_images(bundle, files, batch_size=3)
    device_vectors, device_hashes = embed_images(bundle, files, batch_size=3, decode_on_device=True)
    np.testing.assert_allclose(device_vectors, cpu_vectors, atol=1e-6)
    assert device_hashes[1:] == cpu_hashes[1:]  # small enough to be decoded in full
    distance = np.unpackbits(np.bitwise_xor(*(np.frombuffer(h[0], np.uint8) for h in (device_hashes, cpu_hashes))))
    assert distance.sum() <= 6


def test_embed_is_incremental(seeded, png):
    paths, params = seeded
    clip_stage.run(params.model_copy(update={"clip": params.clip.model_copy(update={"train_epochs": 1})}), paths)
    first = embed.run(params, paths)
    assert first["embedded"] == {"seed_images": 40, "seed_captions": 80, "crawl_images": 0}

    table, vectors = read_embeddings([paths.embedding_file("seed_images", "train")])
    assert vectors.shape == (32, 128) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=2e-3)
    bundle = clip.load_clip(paths.clip)
    expected = bundle.model.encode_image(bundle.preprocess(clip.decode(png(COLOURS["red"], 32))).unsqueeze(0))
    expected = torch.nn.functional.normalize(expected, dim=-1).detach().numpy()[0]
    assert np.allclose(vectors[table.column("id").to_pylist().index("s0")], expected, atol=2e-3)
    captions, _ = read_embeddings([paths.embedding_file("seed_captions", "train")])
    assert captions.column("caption").to_pylist()[:2] == ["a red square", "red colour"]

    mtime = paths.embedding_file("seed_images", "train").stat().st_mtime_ns
    assert embed.run(params, paths)["shards_skipped"] == 4
    assert paths.embedding_file("seed_images", "train").stat().st_mtime_ns == mtime

    seed_shard(paths.crawl_shards / "run1-00000.parquet", png, 5, "extra", prefix="c")
    again = embed.run(params, paths)
    assert again["embedded"]["crawl_images"] == 5 and again["shards_skipped"] == 4

    # A damaged output (truncated as a disk error would) and a lost one are embedded again, and nothing else.
    crawl_file, caption_file = (
        paths.embedding_file("crawl_images", "run1-00000"),
        paths.embedding_file("seed_captions", "test"),
    )
    good = crawl_file.read_bytes()
    crawl_file.write_bytes(good[: len(good) // 2])
    caption_file.unlink()
    mended = embed.run(params, paths)
    assert mended["repaired"] == 2 and mended["shards_skipped"] == 3
    assert mended["embedded"] == {"seed_images": 0, "seed_captions": 16, "crawl_images": 5}
    assert crawl_file.read_bytes() == good and read_embeddings([caption_file])[1].shape == (16, 128)
    assert embed.run(params, paths)["repaired"] == 0

    clip_stage.run(
        params.model_copy(update={"seed": 7, "clip": params.clip.model_copy(update={"train_epochs": 1})}), paths
    )
    assert embed.run(params, paths)["shards_skipped"] == 0  # a new model re-embeds everything


def _embedding_tables(paths):
    return {
        str(f.relative_to(paths.embeddings)): pq.read_table(f)
        for kind in ("seed_images", "seed_captions", "crawl_images")
        for f in sorted(paths.embedding_folder(kind).glob("*.parquet"))
    }


@pytest.fixture
def crawl_project(seeded, png, tmp_path_factory):
    """A project with a trained CLIP and six crawl shards, not yet embedded; `copy()` gives another in its state."""
    paths, params = seeded
    clip_stage.run(params.model_copy(update={"clip": params.clip.model_copy(update={"train_epochs": 1})}), paths)
    for shard in range(6):
        seed_shard(paths.crawl_shards / f"run1-{shard:05d}.parquet", png, 7, "extra", prefix=f"c{shard}-")

    def copy(workers, distributor="multiprocessing"):
        root = tmp_path_factory.mktemp("copy")
        shutil.copytree(paths.root, root, dirs_exist_ok=True)
        embed_params = params.embed.model_copy(update={"num_processes": workers, "distributor": distributor})
        return Paths(root), params.model_copy(update={"embed": embed_params})

    return paths, params, copy


def test_two_embedding_processes_write_what_one_does_and_skip_what_is_done(crawl_project):
    paths, params, copy = crawl_project
    two_paths, two_params = copy(2)
    one = embed.run(params, paths)
    assert one["workers"] == 1
    two = embed.run(two_params, two_paths)
    assert two["embedded"] == one["embedded"] == {"seed_images": 40, "seed_captions": 80, "crawl_images": 42}
    assert _embedding_tables(two_paths) == _embedding_tables(paths)
    assert embed.run(two_params, two_paths)["shards_skipped"] == 10


def test_a_killed_embedding_process_loses_only_its_unfinished_shards(crawl_project, capsys):
    paths, params, copy = crawl_project
    two_paths, two_params = copy(2)
    embed.run(params, paths)
    result, worker = {}, threading.Thread(target=lambda: result.update(embed.run(two_params, two_paths)))
    worker.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        spawned = [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]
        if len(spawned) == 2:
            spawned[0].kill()
            break
        time.sleep(0.05)
    else:
        pytest.fail("the two embedding processes never started")
    worker.join(300)
    assert "a worker died" in capsys.readouterr().out
    assert result["embedded"]["crawl_images"] == 42
    assert _embedding_tables(two_paths) == _embedding_tables(paths)
    assert embed.run(two_params, two_paths)["shards_skipped"] == 10


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install -e '.[ray]')")
def test_ray_actors_embed_what_one_process_does(crawl_project):
    import ray

    paths, params, copy = crawl_project
    ray_paths, ray_params = copy(2, "ray")
    embed.run(params, paths)
    try:
        assert embed.run(ray_params, ray_paths)["embedded"]["crawl_images"] == 42
    finally:
        ray.shutdown()
    assert _embedding_tables(ray_paths) == _embedding_tables(paths)


def test_embed_refuses_an_unknown_or_missing_distributor(crawl_project, monkeypatch):
    paths, params, copy = crawl_project
    with pytest.raises(ParamsError, match="embed.distributor"):
        parse_params({**params.model_dump(), "embed": {"distributor": "dask"}})
    ray_paths, ray_params = copy(2, "ray")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real_find_spec(name))
    with pytest.raises(ParamsError, match=r"embed.distributor: ray is not installed \(pip install -e '.\[ray\]'\)"):
        embed.run(ray_params, ray_paths)
    assert not list(ray_paths.embedding_folder("crawl_images").glob("*.parquet"))
