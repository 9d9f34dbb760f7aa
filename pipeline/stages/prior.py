"""`dextra prior`: train the text-to-image-embedding prior (train/prior.py) on the seed train pairs and, with
prior.extra_pairs, the curated extra set's pairs; save it to models/prior/. metrics/prior.json says how far its
image embeddings for the seed test captions are from the test images' own, beside the text embedding used in the
image embedding's place: what sampling a `conditioning: image` model through the prior gains."""

from __future__ import annotations

import torch

from dextra.pipeline.atomic import write_json
from dextra.pipeline.device import pick_device
from dextra.pipeline.params import Params
from dextra.pipeline.paths import Paths
from dextra.train.prior import embedding_errors, extra_pairs, sample_prior, save_prior, seed_pairs, train_prior
from dvclive import Live

NAME = "prior"


def run(params: Params, paths: Paths) -> dict:
    cfg, device = params.prior, pick_device(params.device)
    pairs = seed_pairs(paths, "train")
    counts = {"seed_pairs": len(pairs), "extra_pairs": 0}
    if cfg.extra_pairs:
        extra = extra_pairs(paths)
        pairs, counts["extra_pairs"] = pairs + extra, len(extra)
    test = seed_pairs(paths, "test")

    with Live(dir=str(paths.live(NAME)), save_dvc_exp=False, dvcyaml=None) as live:

        def log(step: int, loss: float) -> None:
            live.step = step  # x axis of the loss plot = training step, not log index
            live.log_metric("loss", loss)
            live.next_step()

        model, scheduler = train_prior(pairs, cfg, params.seed, device, log)
    save_prior(model, scheduler, paths.model(NAME))
    drawn = sample_prior(model, scheduler, torch.from_numpy(test.text), cfg.sampling_steps, params.seed, cfg.candidates)
    summary = {
        **counts,
        "test_pairs": len(test),
        "prior": embedding_errors(drawn.cpu().numpy(), test),
        "text_embedding": embedding_errors(test.text, test),
    }
    write_json(paths.metrics / "prior.json", summary)
    return summary
