"""`dextra finetune`: continue from pretrain's EMA weights on the seed train set, conditioned on a random one
of each image's caption embeddings (DESIGN.md "The method" 4). Architecture and resolution come from the
pretrained model, not from params."""
from __future__ import annotations

from dextra.pipeline.errors import InputError
from dextra.pipeline.params import Params
from dextra.pipeline.paths import Paths

from .data import load_seed
from .model import Denoiser
from .trainer import train


def run(params: Params, paths: Paths) -> dict:
    model = Denoiser.load(paths.model("pretrain"))
    data, _ = load_seed(paths, "train", model.resolution)
    if data.conditions.shape[1] != model.condition_dim:
        raise InputError(
            f"{paths.embedding_file('seed_captions', 'train')}: caption embeddings have {data.conditions.shape[1]} dimensions, "
            f"the pretrained model in {paths.model('pretrain')} was conditioned on {model.condition_dim}"
        )
    return train(model, data, params.finetune, params, paths, "finetune")
