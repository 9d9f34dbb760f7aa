"""The prior stage learns to map caption text embeddings to image embeddings across a modality gap, saves a prior
that loads back and samples the same, and refuses missing inputs with the path to fix."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from dextra.pipeline.errors import InputError
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import write_embeddings, write_table
from dextra.pipeline.stages import prior as prior_stage
from dextra.train.prior import EmbeddingPairs, embedding_errors, load_prior, sample_prior, seed_pairs
from tests.helpers.train import image_table, png, small_training_params

DIM = 16
CLASSES = 4


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def gapped_pairs(rng, labels) -> EmbeddingPairs:
    """Each class has an image direction and a different text direction (CLIP's modality gap), with a little spread."""
    directions = np.random.default_rng(5).normal(size=(2, CLASSES, DIM))
    text = _unit(directions[0][labels] + 0.15 * rng.normal(size=(len(labels), DIM)))
    image = _unit(directions[1][labels] + 0.15 * rng.normal(size=(len(labels), DIM)))
    return EmbeddingPairs(text, image)


def write_project(paths: Paths, extra: int = 48) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 12)):
        labels = rng.integers(0, CLASSES, n)
        ids = [f"{split}{i}" for i in range(n)]
        caption_pairs, image_pairs = gapped_pairs(rng, np.repeat(labels, 2)), gapped_pairs(rng, labels)
        write_embeddings(
            paths.embedding_file("seed_captions", split),
            list(np.repeat(ids, 2)),
            caption_pairs.text,
            extra={"caption": pa.array([f"class {k}" for k in np.repeat(labels, 2)], pa.string())},
        )
        write_embeddings(paths.embedding_file("seed_images", split), ids, image_pairs.image)
    if extra:
        labels = rng.integers(0, CLASSES, extra)
        pairs, ids = gapped_pairs(rng, labels), [f"web{i}" for i in range(extra)]
        table = image_table(ids, [png((0, 0, 0), 8, rng)] * extra, [["x"]] * extra, "extra")
        table = table.append_column(
            "text_embedding", pa.array(list(pairs.text.astype(np.float16)), pa.list_(pa.float16()))
        )
        write_table(table, paths.curated_shards / "part-0.parquet")
        write_embeddings(paths.embedding_file("crawl_images", "part-0"), ids, pairs.image)


def prior_params(**prior):
    return small_training_params(prior={"steps": 300, "batch_size": 64, "lr": 2e-3, **prior}, device="cpu")


def test_the_prior_crosses_the_modality_gap_and_loads_back(tmp_path):
    paths = Paths(tmp_path)
    write_project(paths)
    params = prior_params()
    summary = prior_stage.run(params, paths)
    assert summary["seed_pairs"] == 48 and summary["extra_pairs"] == 48 and summary["test_pairs"] == 24
    assert json.loads((paths.metrics / "prior.json").read_text()) == summary
    # The text embedding sits across the gap from its image: far, and nearest to the wrong image as often as not.
    assert summary["text_embedding"]["cosine_distance"] > 0.5
    assert summary["prior"]["cosine_distance"] < 0.5 * summary["text_embedding"]["cosine_distance"]
    assert summary["prior"]["retrieval_top1"] > summary["text_embedding"]["retrieval_top1"]
    assert (paths.live("prior") / "plots" / "metrics" / "loss.tsv").exists()

    test = seed_pairs(paths, "test")
    model, scheduler = load_prior(paths.model("prior"), torch.device("cpu"))
    text, cfg = torch.from_numpy(test.text), params.prior
    drawn = sample_prior(model, scheduler, text, cfg.sampling_steps, params.seed, cfg.candidates)
    assert torch.allclose(drawn.norm(dim=1), torch.ones(len(drawn)), atol=1e-4)
    assert embedding_errors(drawn.numpy(), test) == pytest.approx(summary["prior"], abs=1e-5)
    # Of several draws the one nearest the text is kept: the first draw alone is never nearer.
    first, best = (sample_prior(model, scheduler, text, cfg.sampling_steps, params.seed, n) for n in (1, 4))
    assert ((best * text).sum(1) >= (first * text).sum(1) - 1e-5).all() and not torch.allclose(first, best)


def test_the_prior_trains_on_seed_pairs_alone_without_curated_shards(tmp_path):
    paths = Paths(tmp_path)
    write_project(paths, extra=0)
    with pytest.raises(InputError, match="curated/shards: no curated shards"):
        prior_stage.run(prior_params(), paths)
    assert prior_stage.run(prior_params(extra_pairs=False, steps=20), paths)["extra_pairs"] == 0


def test_missing_embeddings_and_prior_name_what_to_run(tmp_path):
    paths = Paths(tmp_path)
    with pytest.raises(Exception, match="seed_captions/train.parquet"):
        prior_stage.run(prior_params(), paths)
    with pytest.raises(InputError, match=r"models/prior: no prior .*run `dextra prior`"):
        load_prior(paths.model("prior"), torch.device("cpu"))
