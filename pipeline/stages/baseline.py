"""`dextra baseline`: the paper's comparison. The same model trained from scratch on the seed train set alone, for
pretrain.steps + finetune.steps steps with pretrain's optimiser settings, so that evaluate can say what the
extrapolated extra set bought at equal compute. With evaluate.baseline false nothing is trained: the stage only
leaves a note in each of its outputs, which DVC needs to exist."""

from __future__ import annotations

from dextra.pipeline.atomic import write_json
from dextra.pipeline.params import Params, PhaseParams
from dextra.pipeline.paths import Paths
from dextra.train.data import load_seed
from dextra.train.trainer import fresh_model, make_accelerator, train

NAME = "baseline"
SKIPPED = "skipped.json"


def run(params: Params, paths: Paths) -> dict:
    if not params.evaluate.baseline:
        for folder in (paths.model(NAME), paths.live(NAME), paths.checkpoints(NAME)):
            write_json(folder / SKIPPED, {"skipped": "evaluate.baseline is false"})
        return {"skipped": "evaluate.baseline is false"}
    (paths.checkpoints(NAME) / SKIPPED).unlink(missing_ok=True)
    phase = PhaseParams(
        steps=params.pretrain.steps + params.finetune.steps,
        lr=params.pretrain.lr,
        warmup_steps=params.pretrain.warmup_steps,
    )
    accelerator = make_accelerator(params)
    model, data, vae = fresh_model(params, paths, accelerator, lambda encoding: load_seed(paths, "train", encoding)[0])
    return train(accelerator, model, data, phase, params, paths, NAME, vae=vae)
