"""Values a run derives on the user's behalf, each with where it came from.

A recipe leaves many settings to dgzoo: the input resolution, the augmentation, the held-out domains, the split
seed, the checkpoint interval, the output directory. A run states every one of them, with its source, in its first
log line, in ``results.json`` (``derived``) and in ``dgzoo train --dry-run``, so no default comes as a surprise.

Image size. ``--image-size`` wins; else a registry entry's native size; else, for a dataset dgzoo does not know,
the images decide when they are small (at most :data:`SMALL_IMAGE_MAX` pixels a side) and the backbone trains
from scratch: such a network has no resolution it was trained for, and enlarging 32-pixel images to a ResNet's
224 costs about 50 times the compute for no new information (DomainBed trains its MNIST-like datasets at their
native 28 pixels). Larger images, and any images under a pretrained backbone (whose features were learned at its
input size), take the backbone's input size, as timm's pretrained config gives it; when that enlarges the images
of a from-scratch backbone by :data:`UPSAMPLE_WARNING` or more a side, the run warns and names ``--image-size``.
"""

from __future__ import annotations

from typing import Any

from ..config import TrainConfig
from ..data import DGDataset, Protocol
from ..data.inspect import native_size, size_outliers

SMALL_IMAGE_MAX = 64  # pixels a side: at most this, an unknown dataset trains at its own size (from scratch)
UPSAMPLE_WARNING = 2.0  # enlarging a from-scratch backbone's images by this factor a side or more is warned about

Derived = dict[str, dict[str, Any]]  # name -> {"value": ..., "source": "..."}


def backbone_input_size(backbone: str) -> int | None:
    """The backbone's default input resolution (timm's pretrained config), or None when timm does not know it."""
    import timm

    try:
        size = timm.models.get_pretrained_cfg_value(backbone, "input_size")
    except RuntimeError:  # hf-hub: / local-dir: names have no registered config
        return None
    return int(size[-1]) if size else None


def resolve_image_size(cfg: TrainConfig, data: DGDataset) -> tuple[int | None, str, str | None]:
    """``(image size, its source, a warning or None)``; size None means the backbone's own input size (kept
    unset, as timm's data config then resolves it, so a ``results.json`` records ``null`` for it as before)."""
    if cfg.image_size:
        return cfg.image_size, "--image-size", None
    if data.spec is not None and data.spec.image_size:
        return data.spec.image_size, f"the registry entry of {data.spec.name}: its native size", None
    backbone = backbone_input_size(cfg.backbone)
    native = native_size(data)
    if native is None:
        return None, "the backbone's default input size; the images' sizes could not be read", None
    side, seen = native
    odd = size_outliers(data)
    odd_warning = (
        f"{len(odd)} sampled image(s) are far from the typical {side}-pixel side (e.g. {odd[0][0]}x"
        f"{odd[0][1]}); the size is taken from the typical images and every image is resized to it; "
        f"check those images, or pass --image-size"
        if odd
        else None
    )
    if side <= SMALL_IMAGE_MAX and not cfg.pretrained:
        return side, f"the images: {seen}; small, and the backbone trains from scratch", odd_warning
    source = f"the backbone's default input size{f', {backbone}' if backbone else ''}; the images: {seen}"
    warning = None
    if backbone is not None and not cfg.pretrained and backbone >= UPSAMPLE_WARNING * side:
        warning = (
            f"the from-scratch backbone {cfg.backbone} enlarges the {side}-pixel images to {backbone} "
            f"({(backbone / side) ** 2:.0f}x the pixels per image, and about as much compute); pass "
            f"--image-size {side} to train at the images' own size"
        )
    return None, source, "; ".join(w for w in (warning, odd_warning) if w) or None


def _given(cfg: TrainConfig, name: str) -> bool:
    return getattr(cfg, name) != getattr(TrainConfig(), name)


def derived_values(
    cfg: TrainConfig,
    data: DGDataset,
    protocol: Protocol,
    augment: str,
    image_size: int | None,
    image_size_source: str,
    output_dir: str,
    small_images: bool,
) -> Derived:
    """Every value the run takes without being told, with its source (a given value says ``given``)."""
    spec = data.spec
    if cfg.augment != "auto":
        augment_source = "--augment"
    elif spec is not None:
        augment_source = f"--augment auto: the registry default of {spec.name}"
    else:
        augment_source = "--augment auto: DomainBed's augmentation, the dataset has no registry entry"
    if cfg.target_domains or cfg.source_domains:
        held_out_source = "--target-domains" if cfg.target_domains else "the domains not in --source-domains"
    else:
        held_out_source = f"the registry default of {data.spec.name if data.spec else data.name}"
    values: Derived = {
        "image_size": {"value": image_size, "source": image_size_source},
        "augment": {"value": augment, "source": augment_source},
        "target_domains": {"value": list(protocol.targets), "source": held_out_source},
        "selection": {
            "value": cfg.selection,
            "source": "--selection" if _given(cfg, "selection") else "default: DomainBed's training-domain validation",
        },
        "split_seed": {
            "value": cfg.resolved_split_seed(),
            "source": "--split-seed" if cfg.split_seed is not None else "= --seed",
        },
        "checkpoint_every": {
            "value": cfg.resolved_checkpoint_every(),
            "source": "--checkpoint-every" if cfg.checkpoint_every else "= --eval-every",
        },
        "hparam_defaults": {
            "value": "small-image" if small_images else "image",
            "source": "the registry marks the dataset small-image: DomainBed's MNIST-like defaults"
            if small_images
            else "DomainBed's defaults for image datasets",
        },
        "output_dir": {"value": output_dir, "source": "--output-dir" if cfg.output_dir else "default: runs/<recipe>"},
    }
    return values


def derived_line(derived: Derived) -> str:
    """One log line stating every derived value and its source."""

    def shown(value: Any) -> str:
        if value is None:
            return "the backbone's"
        return " ".join(map(str, value)) if isinstance(value, list) else str(value)

    return "derived: " + " | ".join(
        f"{name.replace('_', ' ')} {shown(item['value'])} ({item['source']})" for name, item in derived.items()
    )
