"""pretrain / finetune / evaluate on tiny fixtures: real diffusers models and real (short) training runs."""
from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from diffusers import DDIMScheduler
from PIL import Image

from dextra.filter import clip as clip_stage
from dextra.pipeline.errors import InputError, ParamsError
from dextra.pipeline.params import parse_params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import IMAGE_SCHEMA, sha256_hex, write_embeddings, write_table
from dextra.train import evaluate, finetune, pretrain
from dextra.train.data import load_seed
from dextra.train.evaluate import ClipFeatures, clip_fd
from dextra.train.model import Denoiser, build_denoiser
from dextra.train.sampling import null_guidance, sample

REPO = Path(__file__).resolve().parents[1]
DIM = 16  # condition (caption embedding) dimension of the fixtures
COLOURS = np.array([[230, 40, 40], [40, 40, 230]], np.uint8)


def make_params(**sections):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["clip"].update(train_epochs=0)
    raw["train"].update(
        resolution=16,
        batch_size=8,
        unet=dict(block_out_channels=[32, 32], layers_per_block=1, attention_head_dim=8, cross_attention_dim=32, condition_tokens=2),
        log_every=5,
    )
    raw["pretrain"] = dict(steps=10, lr=2e-3, warmup_steps=2)
    raw["finetune"] = dict(steps=10, lr=1e-3, warmup_steps=0)
    raw["evaluate"] = dict(num_samples=12, guidance_scale=2.0, sampling_steps=3, batch_size=8)
    for name, values in sections.items():
        raw[name].update(values)
    return parse_params(raw)


def png(colour, size: int, rng) -> bytes:
    """A flat colour square with a little noise, at a size other than the training resolution."""
    array = np.clip(colour + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def unit(rng, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def image_table(ids, blobs, captions, split) -> pa.Table:
    return pa.table(
        {
            "id": ids,
            "image": blobs,
            "width": [24] * len(ids),
            "height": [24] * len(ids),
            "captions": captions,
            "split": [split] * len(ids),
            "class": [None] * len(ids),
            "source": ["test"] * len(ids),
            "url": [None] * len(ids),
            "sha256": [sha256_hex(b) for b in blobs],
        },
        schema=IMAGE_SCHEMA,
    )


def write_curated(paths: Paths, n: int = 32) -> np.ndarray:
    """Red or blue squares; the condition says which (one fixed vector per colour, returned): trivially learnable."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, n)
    directions = unit(rng, 2)
    blobs = [png(COLOURS[k], 24, rng) for k in labels]
    table = image_table([f"web{i}" for i in range(n)], blobs, [["x"]] * n, "extra")
    embedding = pa.array([directions[k].astype(np.float16) for k in labels], pa.list_(pa.float16()))
    write_table(table.append_column("text_embedding", embedding), paths.curated_shards / "part-0.parquet")
    return directions.astype(np.float16).astype(np.float32)


def write_seed(paths: Paths, split: str, n: int, captions_per_image: int = 2) -> None:
    rng = np.random.default_rng({"train": 2, "test": 3}[split])
    ids = [f"{split}{i}" for i in range(n)]
    labels = rng.integers(0, 2, n)
    captions = [[f"a {['red', 'blue'][k]} square number {j}" for j in range(captions_per_image)] for k in labels]
    write_table(image_table(ids, [png(COLOURS[k], 20, rng) for k in labels], captions, split), paths.seed_split(split))
    rows = [(image_id, c) for image_id, cs in zip(ids, captions) for c in cs]
    write_embeddings(
        paths.embedding_file("seed_captions", split),
        [r[0] for r in rows],
        unit(rng, len(rows)),
        extra={"caption": pa.array([r[1] for r in rows], pa.string())},
    )


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_tsv(path: Path, column: str) -> list[float]:
    lines = path.read_text().splitlines()
    index = lines[0].split("\t").index(column)
    return [float(line.split("\t")[index]) for line in lines[1:]]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One tiny run of pretrain -> finetune -> evaluate, shared by the tests that inspect its outputs."""
    paths = Paths(tmp_path_factory.mktemp("root"))
    params = make_params()
    write_curated(paths)
    write_seed(paths, "train", 12)
    write_seed(paths, "test", 6)
    clip_stage.run(params, paths)
    summaries = {stage.__name__.rsplit(".", 1)[1]: stage.run(params, paths) for stage in (pretrain, finetune, evaluate)}
    return paths, params, summaries


def test_pretrain_learns_the_condition(tmp_path):
    paths = Paths(tmp_path)
    red, blue = write_curated(paths)
    params = make_params(pretrain=dict(steps=60))
    torch.manual_seed(params.seed)
    initial = state(build_denoiser(params.train, DIM))
    summary = pretrain.run(params, paths)

    curve = paths.live("pretrain") / "plots" / "metrics" / "loss.tsv"
    losses = read_tsv(curve, "loss")
    assert read_tsv(curve, "step") == list(range(5, 65, 5))
    assert all(math.isfinite(v) for v in losses) and np.mean(losses[-2:]) < 0.7 * losses[0], losses
    assert summary["steps"] == 60 and summary["final_loss"] == pytest.approx(losses[-1], abs=1e-4)
    trained = state(Denoiser.load(paths.model("pretrain")))
    assert trained.keys() == initial.keys() and any(not torch.allclose(trained[k], initial[k]) for k in trained)

    # Sampled from noise, the red condition gives red squares and the blue one blue squares.
    model = Denoiser.load(paths.model("pretrain")).eval()
    scheduler = DDIMScheduler.from_pretrained(paths.model("pretrain") / "scheduler")
    images = sample(model, scheduler, torch.from_numpy(np.stack([red, blue])), 10, 2.0, torch.Generator().manual_seed(0))
    red_minus_blue = (images[:, 0] - images[:, 2]).mean(dim=(1, 2))
    assert red_minus_blue[0] > 0.2 and red_minus_blue[1] < -0.2, red_minus_blue


def test_epsilon_prediction_is_trained_and_saved(tmp_path):
    paths = Paths(tmp_path)
    write_curated(paths)
    pretrain.run(make_params(pretrain=dict(steps=2), train=dict(prediction_type="epsilon", log_every=1)), paths)
    assert DDIMScheduler.from_pretrained(paths.model("pretrain") / "scheduler").config.prediction_type == "epsilon"
    assert all(math.isfinite(v) for v in read_tsv(paths.live("pretrain") / "plots" / "metrics" / "loss.tsv", "loss"))


def test_unknown_prediction_type_names_the_field():
    with pytest.raises(ParamsError, match="train.prediction_type"):
        make_params(train=dict(prediction_type="x0"))


def test_finetune_starts_from_pretrain_ema(chain, tmp_path):
    paths, params, _ = chain
    # A one-step finetune with a negligible learning rate must hand back pretrain's EMA weights unchanged.
    warm = Paths(tmp_path)
    for source, target in ((paths.model("pretrain"), warm.model("pretrain")), (paths.seed, warm.seed), (paths.embeddings, warm.embeddings)):
        shutil.copytree(source, target)
    finetune.run(make_params(finetune=dict(steps=1, lr=1e-12, warmup_steps=0)), warm)
    pretrained, finetuned = state(Denoiser.load(warm.model("pretrain"))), state(Denoiser.load(warm.model("finetune")))
    assert all(torch.allclose(pretrained[k], finetuned[k], atol=1e-6) for k in pretrained)
    torch.manual_seed(params.seed)
    fresh = state(build_denoiser(params.train, DIM))
    assert any(not torch.allclose(pretrained[k], fresh[k]) for k in pretrained)


def test_guidance_endpoints():
    params = make_params()
    torch.manual_seed(0)
    model = build_denoiser(params.train, DIM).eval()
    x, condition = torch.randn(3, 3, 16, 16), torch.from_numpy(unit(np.random.default_rng(0), 3))
    t = torch.tensor(500)
    with torch.no_grad():
        conditional = model(x, t, condition)
        unconditional = model(x, t, condition, torch.ones(3, dtype=torch.bool))
        assert not torch.allclose(conditional, unconditional)
        torch.testing.assert_close(null_guidance(model, x, t, condition, 0.0), unconditional, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(null_guidance(model, x, t, condition, 1.0), conditional, atol=1e-5, rtol=1e-4)


def test_evaluate_writes_metrics_and_samples(chain):
    paths, params, summaries = chain
    result = json.loads((paths.metrics / "eval.json").read_text())
    assert set(result) == {"clip_fd", "clip_score", "gt_clip_score", "num_samples", "guidance_scale"}
    assert all(math.isfinite(result[k]) for k in ("clip_fd", "clip_score", "gt_clip_score"))
    assert result["num_samples"] == 12 and result["guidance_scale"] == 2.0
    assert result == summaries["evaluate"]
    live = json.loads((paths.live("evaluate") / "metrics.json").read_text())
    assert live["clip_fd"] == pytest.approx(result["clip_fd"], abs=1e-4)
    grid = Image.open(paths.live("evaluate") / "plots" / "images" / "samples.png")
    assert grid.width == 8 * 128
    assert (paths.live("finetune") / "plots" / "metrics" / "loss.tsv").exists()


def test_clip_fd_is_zero_for_same_set_and_grows_with_shift(chain):
    paths, _, _ = chain
    bundle = clip_stage.load_clip(paths.clip)
    images = torch.rand(48, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    same = clip_fd(bundle, images, images, batch_size=16)
    shifted = clip_fd(bundle, images, (images * 0.5 + 0.5), batch_size=16)
    assert abs(same) < 1e-4
    assert shifted > 100 * max(abs(same), 1e-6)
    assert ClipFeatures(bundle)(images[:2]).shape == (2, bundle.embed_dim)


def test_seed_batches_pick_a_caption_of_the_drawn_image(tmp_path):
    paths = Paths(tmp_path)
    write_seed(paths, "train", 5, captions_per_image=3)
    data, captions = load_seed(paths, "train", 8)
    assert data.images.shape == (5, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.count.tolist() == [3] * 5 and len(captions) == 15
    assert captions[3].startswith("a ") and captions[3].endswith("number 0")  # image 1's first caption
    pixels, conditions = data.batch(64, torch.Generator().manual_seed(0))
    assert pixels.shape == (64, 3, 8, 8) and pixels.min() >= -1 and pixels.max() <= 1
    assert all(any(torch.equal(c, row) for row in data.conditions) for c in conditions)


def test_random_flip_mirrors_only_when_asked(tmp_path):
    paths = Paths(tmp_path)
    write_seed(paths, "train", 5)
    data, _ = load_seed(paths, "train", 8)
    originals = {data.images[i].float().div(127.5).sub(1).numpy().tobytes() for i in range(5)}
    mirrored = {data.images[i].float().div(127.5).sub(1).flip(-1).numpy().tobytes() for i in range(5)} - originals
    unflipped, _ = data.batch(64, torch.Generator().manual_seed(0), random_flip=False)
    assert all(p.numpy().tobytes() in originals for p in unflipped)
    flipped, _ = data.batch(64, torch.Generator().manual_seed(0), random_flip=True)
    assert any(p.numpy().tobytes() in mirrored for p in flipped)


def test_missing_inputs_name_the_path(tmp_path):
    paths, params = Paths(tmp_path), make_params()
    with pytest.raises(InputError, match="data/curated/shards"):
        pretrain.run(params, paths)
    with pytest.raises(InputError, match="models/pretrain"):
        finetune.run(params, paths)
    write_seed(paths, "train", 3)
    paths.embedding_file("seed_captions", "train").unlink()
    with pytest.raises(InputError, match="seed_captions/train.parquet"):
        load_seed(paths, "train", 8)
