"""Text encoders from transformers (RoBERTa, T5, CLIP's text model, …) for `tokens` conditioning: the backbone
cross-attends to the encoder's per-token states, as the CMU 10-701 text-to-image project conditions on RoBERTa.

An encoder is named by `train.text_encoder`: a local folder or a hub name, loaded with transformers' own
`from_pretrained` (AutoModelForTextEncoding picks the encoder half of T5-like models; a whole CLIP checkpoint gives its
CLIPTextModel) beside its AutoTokenizer. Saved as diffusers pipelines keep theirs: `text_encoder/` and `tokenizer/` in
transformers' formats, and the projection to the backbone's width with its learned NULL tokens in `projection/`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForTextEncoding,
    AutoTokenizer,
    CLIPTextModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dextra.pipeline.errors import InputError, ParamsError

PADDING = -1  # a cached token row marks padding with this, so the attention mask travels with the ids


class CaptionTokenizer:
    """Captions -> int32 token ids (N, length), padding marked PADDING. `identity` names everything that shapes the
    ids, for the training cache's key."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, length: int):
        self.tokenizer, self.length = tokenizer, length

    def __call__(self, captions: list[str]) -> torch.Tensor:
        encoded = self.tokenizer(
            captions, padding="max_length", max_length=self.length, truncation=True, return_tensors="pt"
        )
        return encoded.input_ids.masked_fill(encoded.attention_mask == 0, PADDING).to(torch.int32)

    @property
    def identity(self) -> str:
        vocab = json.dumps(self.tokenizer.get_vocab(), sort_keys=True)
        described = f"{type(self.tokenizer).__name__}|{self.length}|{self.tokenizer.padding_side}|{vocab}"
        return hashlib.sha256(described.encode()).hexdigest()


def caption_tokenizer(source: str | Path, field: str = "train.text_encoder") -> CaptionTokenizer:
    """The tokenizer of the encoder at `source` (folder or hub name), without the encoder's weights; `field` names
    where the source came from, for errors."""
    return load_text_encoder(source, field, weights=False)[1]


def load_text_encoder(
    source: str | Path, field: str = "train.text_encoder", weights: bool = True
) -> tuple[PreTrainedModel | None, CaptionTokenizer]:
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        encoder = _encoder_class(config).from_pretrained(source) if weights else None
    except (OSError, ValueError, KeyError) as exc:
        raise ParamsError(
            f"{field}: cannot load a transformers text encoder and tokenizer from {str(source)!r} ({_first_line(exc)})"
        ) from None
    if tokenizer.pad_token is None:
        raise ParamsError(f"{field}: the tokenizer of {str(source)!r} has no padding token")
    return encoder, CaptionTokenizer(tokenizer, caption_length(config, tokenizer))


def _encoder_class(config) -> type:
    """AutoModelForTextEncoding takes the encoder half of T5-like models; a whole CLIP checkpoint gives its text
    tower."""
    return CLIPTextModel if config.model_type == "clip" else AutoModelForTextEncoding


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def caption_length(config, tokenizer: PreTrainedTokenizerBase) -> int:
    """Token positions per caption: CLIP's 77 (ample for captions), or fewer where the encoder or tokenizer stops."""
    config = getattr(config, "text_config", config)  # a whole CLIP checkpoint's config holds its text tower's
    length = min(77, tokenizer.model_max_length)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None:
        # RoBERTa-like position tables spend padding_idx + 1 entries before the first token.
        reserved = config.pad_token_id + 1 if config.model_type.endswith("roberta") else 0
        length = min(length, positions - reserved)
    return length


class TokenProjection(ModelMixin, ConfigMixin):
    """Per-token encoder states (B, L, width) -> (B, L, cross_attention_dim), and the learned NULL tokens."""

    @register_to_config
    def __init__(self, width: int, cross_attention_dim: int, length: int):
        super().__init__()
        self.proj = nn.Linear(width, cross_attention_dim)
        self.null = nn.Parameter(torch.randn(length, cross_attention_dim) * 0.02)


class TextEncoderConditioner(nn.Module):
    """`tokens` with a transformers encoder: token ids (B, L), padding marked PADDING -> (B, L, cross_attention_dim)."""

    mode = "tokens"

    def __init__(self, encoder: PreTrainedModel, tokenizer: CaptionTokenizer, projection: TokenProjection):
        super().__init__()
        self.encoder, self.tokenizer, self.projection = encoder, tokenizer, projection
        self.pad_id = int(tokenizer.tokenizer.pad_token_id)

    @classmethod
    def create(cls, source: str | Path, cross_attention_dim: int) -> TextEncoderConditioner:
        encoder, tokenizer = load_text_encoder(source)
        return cls(
            encoder, tokenizer, TokenProjection(encoder.config.hidden_size, cross_attention_dim, tokenizer.length)
        )

    @property
    def condition_size(self) -> int:
        return self.tokenizer.length

    @property
    def text_encoder(self) -> nn.Module:
        return self.encoder

    def forward(self, tokens: torch.Tensor, null: torch.Tensor | None = None) -> torch.Tensor:
        mask = tokens >= 0
        states = self.encoder(input_ids=tokens.long().masked_fill(~mask, self.pad_id), attention_mask=mask.long())
        out = self.projection.proj(states.last_hidden_state)
        if null is None:
            return out
        return torch.where(null[:, None, None], self.projection.null.to(out.dtype), out)

    def save_pretrained(self, folder: Path) -> None:
        folder = Path(folder)
        self.encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.tokenizer.save_pretrained(folder / "tokenizer")
        self.projection.save_pretrained(folder / "projection")
        (folder / "config.json").write_text(json.dumps({"_class_name": type(self).__name__}))

    @classmethod
    def from_pretrained(cls, folder: Path) -> TextEncoderConditioner:
        folder = Path(folder)
        try:
            encoder = _encoder_class(AutoConfig.from_pretrained(folder / "text_encoder")).from_pretrained(
                folder / "text_encoder"
            )
            tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"{folder}: unreadable text encoder or tokenizer ({_first_line(exc)})") from None
        projection = TokenProjection.from_pretrained(folder / "projection")
        return cls(encoder, CaptionTokenizer(tokenizer, projection.config.length), projection)
