"""Image transforms built from the backbone's timm data config.

The eval transform is what a published checkpoint's ``pretrained_cfg`` describes (squash-resize to the input
size, the backbone's mean/std), so ``dgzoo.from_pretrained`` and plain timm rebuild it from ``config.json``.
The DomainBed training augmentation (random resized crop 0.7-1.0, flip, colour jitter 0.3, 10% grayscale) is
built with timm's own ``create_transform``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm.data
from torchvision import transforms as T

WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # more than 8 bits per pixel: PIL's RGB clips them


def to_rgb(image: Any) -> Any:
    """``image`` as 8-bit RGB, converting 16-bit, 32-bit and float grayscale by scaling rather than clipping.

    PIL's own ``convert("RGB")`` clips every value above 255, so a 16-bit PNG becomes near-white. 16-bit modes are
    scaled by 255/65535; ``I`` and ``F`` images by their range: as 8-bit when their values fit in 0..255, as 16-bit
    up to 65535, as 0..1 for floats at most 1, otherwise by their maximum.
    """
    mode = getattr(image, "mode", "RGB")
    if mode == "RGB":
        return image
    if mode not in WIDE_MODES:
        return image.convert("RGB")
    import numpy as np
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    high = float(values.max()) if values.size else 0.0
    if mode.startswith("I;16"):
        scale = 255 / 65535
    elif mode == "F" and high <= 1.0:
        scale = 255.0
    elif high <= 255:
        scale = 1.0
    elif high <= 65535:
        scale = 255 / 65535
    else:
        scale = 255 / high
    gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


class ToRGB:
    """Convert any PIL image (grayscale, palette, RGBA, 16-bit) to RGB, since every timm backbone expects 3
    channels (:func:`to_rgb`)."""

    def __call__(self, image: Any) -> Any:
        return to_rgb(image)

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
    return T.Compose(
        [
            ToRGB(),
            timm.data.create_transform(
                input_size=data_config["input_size"],
                is_training=True,
                scale=(0.7, 1.0),
                ratio=(3 / 4, 4 / 3),
                hflip=0.5,
                color_jitter=(0.3, 0.3, 0.3, 0.3),
                grayscale_prob=0.1,
                interpolation=data_config["interpolation"],
                mean=data_config["mean"],
                std=data_config["std"],
            ),
        ]
    )
