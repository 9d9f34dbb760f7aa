"""Image towers of the bundled CLIP configs that open_clip has no config for, registered with timm so that open_clip
builds them from a config's `timm_model_name` like any timm model.

`dextra_digits_cnn`: the demo's tower. open_clip's own small towers do not learn 32 px digits well from a few
thousand images (the ModifiedResNet's stem and attention pool plateau), and timm's ResNets quarter a 32 px image in
their stem; three stride-1 conv stages with pooling between them read a digit's strokes at full resolution. Written
by hand because no library ships a CNN this small; open_clip, timm and torch do everything around it.
"""

from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU pairs at widths (w, 2w, 4w), max-pooled between stages, global average pool, linear head."""

    def __init__(self, num_classes: int, width: int = 16, global_pool: str = "avg", **_timm_kwargs):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"DigitsCNN pools by average only, not {global_pool!r} (set timm_pool: avg)")
        layers, channels = [], 3
        for stage, out in enumerate((width, 2 * width, 4 * width)):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
                channels = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = channels
        self.head = nn.Linear(channels, num_classes) if num_classes else nn.Identity()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))


@register_model
def dextra_digits_cnn(pretrained: bool = False, **kwargs) -> DigitsCNN:
    if pretrained:
        raise ValueError("dextra_digits_cnn has no pretrained weights: train it (the clip stage's corpus)")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    return DigitsCNN(**kwargs)
