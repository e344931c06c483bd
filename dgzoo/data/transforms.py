"""Image transforms built from the backbone's timm data config.

The eval transform is what a published checkpoint's ``pretrained_cfg`` describes (squash-resize to the input
size, the backbone's mean/std), so ``dgzoo.from_pretrained`` and plain timm rebuild it from ``config.json``.
The DomainBed training augmentation (random resized crop 0.7-1.0, flip, colour jitter 0.3, 10% grayscale) is
built with timm's own ``create_transform``.
"""
from __future__ import annotations

from typing import Any, Callable

import timm.data
from torchvision import transforms as T


class ToRGB:
    """Convert any PIL image (grayscale, palette, RGBA) to RGB, since every timm backbone expects 3 channels."""

    def __call__(self, image: Any) -> Any:
        return image if getattr(image, "mode", "RGB") == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def eval_transform(data_config: dict[str, Any]) -> Callable:
    """The deterministic transform used for evaluation and for published checkpoints."""
    return T.Compose([ToRGB(), timm.data.create_transform(**data_config, is_training=False)])


def train_transform(data_config: dict[str, Any], augment: str) -> Callable:
    """The training transform: DomainBed's augmentation, or the eval transform when ``augment == 'none'``."""
    if augment == "none":
        return eval_transform(data_config)
    if augment == "randaugment":  # RandAugment(num_ops=2, magnitude=9), the views of the DGE paper, then eval
        return T.Compose([ToRGB(), T.RandAugment(num_ops=2, magnitude=9), eval_transform(data_config)])
    if augment != "domainbed":
        raise ValueError(f"unknown augmentation {augment!r}")
    return T.Compose([ToRGB(), timm.data.create_transform(
        input_size=data_config["input_size"], is_training=True, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
        color_jitter=(0.3, 0.3, 0.3, 0.3), grayscale_prob=0.1, interpolation=data_config["interpolation"],
        mean=data_config["mean"], std=data_config["std"])])
