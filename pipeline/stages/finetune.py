"""`dextra finetune`: continue from pretrain's EMA weights on the seed train set, conditioned on a random one of
each image's caption embeddings (docs/architecture.md, "The method"). Backbone, conditioning, resolution and VAE come
from the pretrained model, not from params."""

from __future__ import annotations

from dextra.pipeline.errors import InputError
from dextra.pipeline.params import Params
from dextra.pipeline.paths import Paths
from dextra.train.checkpoint import folder_digest
from dextra.train.data import Encoding, load_seed
from dextra.train.model import Denoiser, image_resolution, saved_vae
from dextra.train.trainer import make_accelerator, train


def run(params: Params, paths: Paths) -> dict:
    accelerator = make_accelerator(params)
    source = paths.model("pretrain")
    model = Denoiser.load(source)
    vae = saved_vae(source)
    resolution = image_resolution(model, vae)
    encoding = Encoding.create(
        paths, resolution, model.mode, vae, params.train.random_flip, accelerator.device, model.tokenizer
    )
    with accelerator.local_main_process_first():
        data, _ = load_seed(paths, "train", encoding)
    if data.condition_size != model.condition_size:
        raise InputError(
            f"{paths.embedding_file('seed_images' if model.mode == 'image' else 'seed_captions', 'train')}: "
            "conditions have "
            f"{data.condition_size} values, the pretrained model in {source} was conditioned on {model.condition_size}"
        )
    return train(
        accelerator, model, data, params.finetune, params, paths, "finetune", vae=vae, init=folder_digest(source)
    )
