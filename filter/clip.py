"""CLIP models: the one way to build, save and load them, and to turn encoded images into their input pixels.

The model comes from open_clip: a model name with a pretrained tag or local checkpoint, or a config bundled in
filter/clip_configs/ (the demo's, trained from scratch because no weights can be downloaded). A saved model folder
(models/clip) holds the config and the weights, so loading needs nothing but that folder.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

import dextra.filter.clip_towers  # noqa: F401 (registers the bundled configs' timm towers)
from dextra.pipeline.atomic import atomic_path, write_json
from dextra.pipeline.errors import InputError, ParamsError

BUNDLED_CONFIGS = Path(__file__).parent / "clip_configs"
CHECKPOINT = "checkpoint.pt"
MODEL_INFO = "model.json"


@dataclass
class ClipBundle:
    """A loaded CLIP model with its preprocessing and tokenizer; encoders return L2-normalised float32 arrays."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    device: torch.device
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        out = [
            F.normalize(self.model.encode_text(self.tokenizer(list(texts[i : i + batch_size])).to(self.device)), dim=-1)
            for i in range(0, len(texts), batch_size)
        ]
        return torch.cat(out).float().cpu().numpy() if out else np.zeros((0, self.embed_dim), np.float32)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embed float images in [0, 1], shape (N, 3, H, W), of any size: resized and normalised like `preprocess`."""
        pixels = F.interpolate(
            pixels.to(self.device, torch.float32),
            size=(self.image_size, self.image_size),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        )
        mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
        return F.normalize(self.model.encode_image((pixels.clamp(0, 1) - mean) / std), dim=-1)

    @property
    def embed_dim(self) -> int:
        return (
            int(self.model.text_projection.shape[1])
            if hasattr(self.model, "text_projection")
            else int(self.model.visual.output_dim)
        )


def _register_config(model: str, search: Path) -> None:
    """open_clip only knows its own configs; add ours (bundled, or saved beside a checkpoint) under their file name."""
    config = search / f"{model}.json"
    if config.exists():
        open_clip.add_model_config(config)


def create(model: str, pretrained: str | None, device: torch.device, fields: str = "clip.") -> ClipBundle:
    """Build an open_clip model by name; `pretrained` is an open_clip tag or a local checkpoint path. Errors name
    `fields` + model / pretrained, the params they came from."""
    _register_config(model, BUNDLED_CONFIGS)
    if open_clip.get_model_config(model) is None:
        raise ParamsError(f"{fields}model: {model!r} is neither an open_clip model nor a config in {BUNDLED_CONFIGS}")
    try:
        clip_model, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
    except RuntimeError as exc:
        raise ParamsError(f"{fields}pretrained: cannot load {pretrained!r} for {model} ({exc})") from None
    visual = clip_model.visual
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    return ClipBundle(
        model=clip_model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(model),
        device=device,
        image_size=int(size),
        mean=tuple(visual.preprocess_cfg["mean"]),
        std=tuple(visual.preprocess_cfg["std"]),
    )


def load_clip(folder: str | Path, device: torch.device | str = "cpu") -> ClipBundle:
    """Load what the `clip` stage saved in `folder` (models/clip), in eval mode."""
    folder = Path(folder)
    info_path = folder / MODEL_INFO
    if not info_path.exists():
        raise InputError(f"{info_path}: not found (run `dextra clip` first)")
    info = json.loads(info_path.read_text())
    _register_config(info["model"], folder)
    bundle = create(info["model"], str(folder / CHECKPOINT), torch.device(device))
    bundle.model.eval()
    return bundle


def decode(image_bytes: bytes) -> Image.Image:
    return Image.open(io.BytesIO(image_bytes)).convert("RGB")


def decode_pixels(image_bytes: bytes) -> torch.Tensor:
    """uint8 (3, H, W): torchvision's decoders give PIL's pixels (the same libjpeg-turbo and libpng) at a third of
    its per-image cost on small images; PIL for what torchvision lacks (BMP, say) or decodes otherwise (16-bit PNG)."""
    try:
        pixels = decode_image(torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        pixels = None
    return pixels if pixels is not None and pixels.dtype == torch.uint8 else TF.pil_to_tensor(decode(image_bytes))


JPEG_MAGIC = b"\xff\xd8\xff"


def decode_on(device: torch.device | str, images: Sequence[bytes]) -> list[torch.Tensor]:
    """uint8 (3, H, W) tensors on `device`: the JPEGs decoded there in one call (torchvision's decode_jpeg: nvJPEG
    on CUDA, batched), and each image that decoder rejects (PNG and other formats, a JPEG nvJPEG cannot read, a
    corrupt one) by decode_pixels on the CPU, then moved."""
    out: list[torch.Tensor | None] = [None] * len(images)
    jpegs = [i for i, data in enumerate(images) if data[:3] == JPEG_MAGIC]
    data = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in jpegs]
    try:
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device) if data else []
    except RuntimeError:  # one image fails the whole batch: find it one at a time
        decoded = []
        for tensor in data:
            try:
                decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    for i, pixels in zip(jpegs, decoded):
        out[i] = pixels
    return [pixels if pixels is not None else decode_pixels(images[i]).to(device) for i, pixels in enumerate(out)]


def preprocess_pixels(preprocess: Callable, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """The model's own preprocessing (open_clip's transforms take float tensors in [0, 1] as well as PIL images, and
    are torch ops, so they run where the tensors are: on the GPU after decode_on), run once per group of same-sized
    images instead of once per image. Returns (N, 3, S, S) in input order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(images)
    for rows in groups.values():
        for row, pixels in zip(rows, preprocess(torch.stack([images[i] for i in rows]).float().div_(255))):
            out[row] = pixels
    return torch.stack(out)


def save_clip(bundle: ClipBundle, model: str, folder: Path, info: dict) -> None:
    """Write what load_clip reads: the weights, the model's open_clip config and `info` (model name and more)."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        torch.save({"state_dict": bundle.model.state_dict()}, tmp / CHECKPOINT)
        (tmp / f"{model}.json").write_text(json.dumps(open_clip.get_model_config(model), indent=2))
        write_json(tmp / MODEL_INFO, {"model": model, **info})
