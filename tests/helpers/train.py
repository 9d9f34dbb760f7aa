"""Tiny training sets with a known answer (red or blue squares, conditions that say which) and small params."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from dextra.pipeline.params import merged, parse_params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import IMAGE_SCHEMA, sha256_hex, write_embeddings, write_table
from tests.helpers import repo_params_dict

DIM = 16  # condition (caption embedding) dimension of the fixtures
COLOURS = np.array([[230, 40, 40], [40, 40, 230]], np.uint8)
NAMES = ["red", "blue"]


# The repository's params with a model and runs small enough for a test (most fixtures have no seed test split or
# CLIP model, so the checkpoint monitor is off; the chain test switches it on).
SMALL_TRAINING = {
    "clip": {"train_epochs": 0},
    "train": {
        "resolution": 16,
        "batch_size": 8,
        "backbone": "unet",  # rat (the demo's) and dit are tested by name
        "unet": {"block_out_channels": [32, 32], "layers_per_block": 1, "attention_head_dim": 8},
        "dit": {"patch_size": 2, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16},
        "cross_attention_dim": 32,
        "condition_tokens": 2,
        "log_every": 5,
        "grid_samples": 4,
        "monitor_samples": 0,
    },
    "pretrain": {"steps": 10, "lr": 2e-3, "warmup_steps": 2},
    "finetune": {"steps": 10, "lr": 1e-3, "warmup_steps": 0},
    "evaluate": {"num_samples": 12, "guidance_scale": 2.0, "sampling_steps": 3, "batch_size": 8, "baseline": False},
}


def small_training_params(**overrides):
    """SMALL_TRAINING, then `overrides`, deep-merged into the repository's params."""
    return parse_params(merged(repo_params_dict(**SMALL_TRAINING), overrides))


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


def write_curated(paths: Paths, n: int = 32, shard: str = "part-0", seed: int = 1) -> np.ndarray:
    """Red or blue squares; the condition says which (one fixed vector per colour, returned): trivially learnable.
    Each row also has neighbour captions (the best-weighted names its colour) and a CLIP image embedding."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    directions = unit(np.random.default_rng(1), 2)
    ids = [f"{shard}-web{i}" for i in range(n)]
    table = image_table(ids, [png(COLOURS[k], 24, rng) for k in labels], [["x"]] * n, "extra")
    table = table.append_column(
        "text_embedding", pa.array([directions[k].astype(np.float16) for k in labels], pa.list_(pa.float16()))
    )
    table = table.append_column(
        "neighbor_captions", pa.array([[f"a {NAMES[1 - k]} square", f"a {NAMES[k]} square"] for k in labels])
    )
    table = table.append_column("neighbor_weights", pa.array([[0.2, 0.8]] * n, pa.list_(pa.float32())))
    write_table(table, paths.curated_shards / f"{shard}.parquet")
    write_embeddings(paths.embedding_file("crawl_images", shard), ids, directions[labels])
    return directions.astype(np.float16).astype(np.float32)


def write_seed(paths: Paths, split: str, n: int, captions_per_image: int = 2) -> None:
    rng = np.random.default_rng({"train": 2, "test": 3}[split])
    ids = [f"{split}{i}" for i in range(n)]
    labels = rng.integers(0, 2, n)
    captions = [[f"a {NAMES[k]} square number {j}" for j in range(captions_per_image)] for k in labels]
    write_table(image_table(ids, [png(COLOURS[k], 20, rng) for k in labels], captions, split), paths.seed_split(split))
    rows = [(image_id, c) for image_id, cs in zip(ids, captions) for c in cs]
    write_embeddings(
        paths.embedding_file("seed_captions", split),
        [r[0] for r in rows],
        unit(rng, len(rows)),
        extra={"caption": pa.array([r[1] for r in rows], pa.string())},
    )
    write_embeddings(paths.embedding_file("seed_images", split), ids, unit(rng, n))


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_tsv(path: Path, column: str) -> list[float]:
    lines = path.read_text().splitlines()
    index = lines[0].split("\t").index(column)
    return [float(line.split("\t")[index]) for line in lines[1:]]


def losses(paths: Paths, stage: str = "pretrain") -> list[float]:
    return read_tsv(paths.live(stage) / "plots" / "metrics" / "loss.tsv", "loss")
