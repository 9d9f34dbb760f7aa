"""Text encoders from transformers (RoBERTa, T5, CLIP's text model) for `tokens` conditioning: tiny ones are built
from configs and saved by the test, with a word-level tokenizer of the fixtures' captions (nothing is downloaded),
then loaded by path the way a user names a real one; each trains, samples and is evaluated, frozen or fine-tuned."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaModel,
    T5Config,
    T5EncoderModel,
)

from dextra.pipeline.errors import ParamsError
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import read_tables, shard_files
from dextra.pipeline.stages import evaluate, finetune, pretrain
from dextra.train.data import Encoding, load_extra
from dextra.train.model import Denoiser
from dextra.train.text_encoder import PADDING, TextEncoderConditioner, caption_tokenizer, load_text_encoder
from tests.helpers.train import NAMES, small_training_params, state
from tests.test_train import write_all

WIDTH = 32
ENCODERS = {
    "roberta": lambda vocab: RobertaModel(
        RobertaConfig(
            vocab_size=vocab,
            hidden_size=WIDTH,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=24,
            pad_token_id=0,
        )
    ),
    "t5": lambda vocab: T5EncoderModel(
        T5Config(vocab_size=vocab, d_model=WIDTH, d_kv=16, d_ff=64, num_layers=1, num_heads=2, pad_token_id=0)
    ),
    "clip": lambda vocab: CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=WIDTH,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    ),
}


def word_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    words = [f"a {name} square number {j}" for name in NAMES for j in range(4)] + ["x"]
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]" if pad else None, unk_token="[UNK]")


def save_encoder(folder, kind: str, pad: bool = True):
    tokenizer = word_tokenizer(pad)
    torch.manual_seed(0)
    encoder = ENCODERS[kind](len(tokenizer))
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return encoder


def encoder_params(folder, **train):
    return small_training_params(
        train=dict(conditioning="tokens", text_encoder=str(folder), **train),
        pretrain=dict(steps=3, lr=1e-2, warmup_steps=0),
        finetune=dict(steps=2),
    )


@pytest.mark.parametrize(
    ("kind", "trainable", "backbone"), [("roberta", False, "unet"), ("t5", True, "unet"), ("clip", False, "dit")]
)
def test_a_transformers_encoder_trains_samples_and_loads_back(tmp_path, kind, trainable, backbone):
    """The backbone cross-attends to the encoder's per-token states (the UNet's attention blocks, the DiT's)."""
    paths = Paths(tmp_path / "project")
    source = save_encoder(tmp_path / kind, kind)
    params = encoder_params(tmp_path / kind, train_text_encoder=trainable, backbone=backbone)
    write_all(paths, params)

    tokenizer = caption_tokenizer(tmp_path / kind)
    # CLIP's 77 positions, or fewer where the position table ends (RoBERTa spends padding_idx + 1 before the first)
    assert tokenizer.length == {"roberta": 23, "t5": 77, "clip": 16}[kind]
    extra = load_extra(paths, Encoding.create(paths, 16, "tokens", tokenizer=tokenizer))
    # A web image is conditioned on its best-weighted neighbour caption; padding is marked so the mask is kept.
    best = [c[1] for c in read_tables(shard_files(paths.curated_shards)).column("neighbor_captions").to_pylist()]
    assert np.array_equal(np.asarray(extra.conditions), tokenizer(best).numpy())
    assert (np.asarray(extra.conditions)[:, -1] == PADDING).all()

    pretrain.run(params, paths)
    model = Denoiser.load(paths.model("pretrain")).eval()
    folder = paths.model("pretrain") / "condition"
    assert isinstance(model.condition, TextEncoderConditioner) and model.condition_size == tokenizer.length
    assert {p.name for p in folder.iterdir()} >= {"text_encoder", "tokenizer", "projection"}
    unchanged = all(torch.equal(v, model.condition.encoder.state_dict()[k]) for k, v in state(source).items())
    assert unchanged != trainable

    red, blue = (tokenizer([f"a {name} square number 0"]) for name in NAMES)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor(400)
    with torch.no_grad():
        assert not torch.equal(model(x, t, red), model(x, t, blue))  # the text reaches the backbone
        # Padding is masked: a caption's token states do not depend on how far it is padded.
        words = int((red >= 0).sum())
        assert words < tokenizer.length and (red[:, words:] == PADDING).all()
        shorter = model.condition(red[:, : words + 1])[:, :words]
        assert torch.allclose(model.condition(red)[:, :words], shorter, atol=1e-5)

    for stage in (finetune, evaluate):
        stage.run(params, paths)
    assert isinstance(Denoiser.load(paths.model("finetune")).condition, TextEncoderConditioner)
    assert math.isfinite(json.loads((paths.metrics / "eval.json").read_text())["clip_fd"])


def test_resuming_a_run_with_tied_t5_weights_continues_from_its_checkpoint(tmp_path):
    """T5 ties its token embedding into the encoder: the checkpoint keeps one copy and a resumed run finds both."""
    paths = Paths(tmp_path / "project")
    save_encoder(tmp_path / "t5", "t5")
    write_all(paths, encoder_params(tmp_path / "t5"))
    params = encoder_params(tmp_path / "t5", train_text_encoder=True, checkpoint_every=2)
    pretrain.run(params, paths)
    longer = encoder_params(tmp_path / "t5", train_text_encoder=True, checkpoint_every=2)
    longer = longer.model_copy(update={"pretrain": longer.pretrain.model_copy(update={"steps": 5})})
    summary = pretrain.run(longer, paths)
    assert summary["resumed_from_step"] == 3  # the last run's final checkpoint
    encoder = Denoiser.load(paths.model("pretrain")).condition.encoder
    assert encoder.shared.weight.data_ptr() == encoder.encoder.embed_tokens.weight.data_ptr()


def test_text_encoder_errors_name_the_field(tmp_path):
    with pytest.raises(ParamsError, match="train: value error, text_encoder needs conditioning: tokens"):
        small_training_params(train=dict(text_encoder="roberta-base"))
    with pytest.raises(ParamsError, match=r"train.text_encoder: cannot load .*nowhere"):
        load_text_encoder(tmp_path / "nowhere")
    save_encoder(tmp_path / "nopad", "roberta", pad=False)
    with pytest.raises(ParamsError, match="train.text_encoder: the tokenizer of .* has no padding token"):
        caption_tokenizer(tmp_path / "nopad")
