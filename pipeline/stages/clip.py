"""`dextra clip`: build the open_clip model named in params (pretrained tag or local checkpoint), optionally adapt it
to the seed train pairs, and save it to models/clip/ with its retrieval recall on seed test in metrics/clip.json."""

from __future__ import annotations

import torch

from dextra.filter.clip import create, save_clip
from dextra.filter.clip_training import retrieval_recall, train_contrastive
from dextra.pipeline.atomic import write_json
from dextra.pipeline.device import pick_device
from dextra.pipeline.errors import InputError
from dextra.pipeline.params import Params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import read_table


def run(params: Params, paths: Paths) -> dict:
    cfg = params.clip
    torch.manual_seed(params.seed)
    bundle = create(cfg.model, cfg.pretrained, pick_device(params.device))
    bundle.model.eval()
    history: list[dict] = []
    if cfg.train_epochs:
        train = read_table(paths.seed_split("train"), columns=["image", "captions", "class"])
        if train.num_rows < 2:
            raise InputError(
                f"{paths.seed_split('train')}: needs at least 2 images to train CLIP, has {train.num_rows}"
            )
        images, captions, classes = (train.column(c).to_pylist() for c in ("image", "captions", "class"))
        history = train_contrastive(bundle, images, captions, cfg, params.seed, classes)
    test = read_table(paths.seed_split("test"), columns=["image", "captions"])
    recall = retrieval_recall(
        bundle, test.column("image").to_pylist(), test.column("captions").to_pylist(), params.embed.batch_size
    )
    save_clip(bundle, cfg.model, paths.clip, {"pretrained": cfg.pretrained, "epochs": history})
    write_json(paths.clip_metrics, {**recall, "test_images": test.num_rows, "epochs_trained": len(history)})
    best = min(history, key=lambda e: e["heldout_loss"]) if history else None
    return {
        "model": cfg.model,
        "epochs": len(history),
        "best_epoch": best and best["epoch"],
        **{k: round(v, 3) for k, v in recall.items()},
    }
