"""`dextra clip`: build the open_clip model named in params (pretrained tag or local checkpoint), pretrain it on the
captioned corpus in data/seed/corpus.parquet when that has rows (the demo's stand-in for web-scale pretraining),
optionally adapt it to the seed train pairs, and save it to models/clip/ with its retrieval recall on seed test in
metrics/clip.json. On the demo, metrics/clip.json also gets the model's zero-shot digit accuracy on freshly drawn
web-style images, per style: how well the class detector and the extrapolated captions can read the web."""

from __future__ import annotations

import torch

from dextra.filter.clip import create, save_clip
from dextra.filter.clip_training import retrieval_recall, train_contrastive
from dextra.pipeline.atomic import write_json
from dextra.pipeline.demo.zero_shot import zero_shot_digits
from dextra.pipeline.device import pick_device
from dextra.pipeline.errors import InputError
from dextra.pipeline.manifest import load_manifest
from dextra.pipeline.params import ClipParams, Params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import read_table


def run(params: Params, paths: Paths) -> dict:
    cfg = params.clip
    torch.manual_seed(params.seed)
    bundle = create(cfg.model, cfg.pretrained, pick_device(params.device))
    bundle.model.eval()
    history: list[dict] = []
    corpus_path = paths.seed_split("corpus")  # absent from seed folders imported before the corpus existed
    corpus = read_table(corpus_path, columns=["image", "captions", "class"]) if corpus_path.exists() else None
    if corpus is not None and corpus.num_rows and cfg.corpus_epochs:
        corpus_cfg = cfg.model_copy(
            update={
                "train_epochs": cfg.corpus_epochs,
                "lr": cfg.corpus_lr,
                "class_loss_weight": cfg.corpus_class_loss_weight,
                "augment": False,  # the corpus is drawn in every style already
            }
        )
        history += _train(bundle, corpus, corpus_cfg, params.seed, "corpus")
    if cfg.train_epochs:
        train = read_table(paths.seed_split("train"), columns=["image", "captions", "class"])
        if train.num_rows < 2:
            raise InputError(
                f"{paths.seed_split('train')}: needs at least 2 images to train CLIP, has {train.num_rows}"
            )
        history += _train(bundle, train, cfg, params.seed, "seed")
    test = read_table(paths.seed_split("test"), columns=["image", "captions"])
    recall = retrieval_recall(
        bundle, test.column("image").to_pylist(), test.column("captions").to_pylist(), params.embed.batch_size
    )
    save_clip(bundle, cfg.model, paths.clip, {"pretrained": cfg.pretrained, "epochs": history})
    metrics = {**recall, "test_images": test.num_rows, "epochs_trained": len(history)}
    if paths.manifest(params.dataset).exists() and load_manifest(params.dataset, paths).seed.importer == "demo":
        metrics["zero_shot_digit_accuracy"] = zero_shot_digits(bundle, params)
    write_json(paths.clip_metrics, metrics)
    seed_epochs = [e for e in history if e["phase"] == "seed"]
    best = min(seed_epochs, key=lambda e: e["heldout_loss"]) if seed_epochs else None
    return {
        "model": cfg.model,
        "epochs": len(history),
        "best_epoch": best and best["epoch"],
        **{k: round(v, 3) for k, v in recall.items()},
    }


def _train(bundle, table, cfg: ClipParams, seed: int, phase: str) -> list[dict]:
    images, captions, classes = (table.column(c).to_pylist() for c in ("image", "captions", "class"))
    return [{"phase": phase, **epoch} for epoch in train_contrastive(bundle, images, captions, cfg, seed, classes)]
