"""timm backbones for DG, kept timm-native.

A dgzoo model *is* the plain timm model (``timm.create_model(arch, num_classes=C)``): no wrapper, no prefix,
so its state dict loads with ``timm.create_model("hf-hub:...", pretrained=True)``. DomainBed's
featurizer/classifier split is expressed through timm's own API: :func:`features` is
``forward_head(forward_features(x), pre_logits=True)`` and :func:`classifier` is ``get_classifier()``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import timm
import torch
from torch import nn

from ..errors import DGZooError, suggest

HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


def check_backbone(name: str) -> None:
    """Fail fast, naming close timm models or the available pretrained tags, when ``name`` is not a timm model."""
    if name.startswith(HUB_PREFIXES):
        return
    arch, _, tag = name.partition(".")
    if timm.is_model(arch):
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        if not tag or tag in tags:
            return
        raise DGZooError(
            f"backbone '{arch}' has no pretrained tag '{tag}'{suggest(tag, tags)}; "
            f"available: {', '.join(tags[:8]) or 'none'}"
        )
    letters = re.match(r"[A-Za-z]*", arch)  # always matches, possibly the empty string
    family = (letters.group(0) if letters else "") or arch
    raise DGZooError(
        f"unknown backbone '{name}'{suggest(arch, timm.list_models())}; list timm models with "
        f"`python -c \"import timm; print(timm.list_models('*{family}*'))\"`"
    )


def has_fixed_input_size(name: str) -> bool:
    """Whether the architecture needs its input size at construction (ViT-style position embeddings)."""
    if name.startswith(HUB_PREFIXES):
        return False
    try:
        return bool(timm.models.get_pretrained_cfg_value(name, "fixed_input_size"))
    except RuntimeError:
        return False


def create_backbone(
    name: str, num_classes: int, pretrained: bool = False, image_size: int | None = None, dropout: float = 0.0
) -> nn.Module:
    """Create a timm classifier with ``num_classes`` outputs.

    Fixed-input-size backbones (ViT) are built for ``image_size`` (timm resamples pretrained position
    embeddings), so small images such as rotated-digits work with any backbone.
    """
    check_backbone(name)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if dropout:
        kwargs["drop_rate"] = dropout
    if image_size is not None and has_fixed_input_size(name):
        kwargs["img_size"] = image_size
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as e:
        if pretrained:
            raise DGZooError(
                f"could not load pretrained weights for '{name}' ({type(e).__name__}); check the "
                f"connection to the Hub or the HF cache, or train with --no-pretrained"
            ) from None
        raise


def meta_backbone(name: str, num_classes: int, image_size: int | None = None, dropout: float = 0.0) -> nn.Module | None:
    """The backbone :func:`create_backbone` would build, on the meta device: module names and shapes at no memory or
    time cost, for checks made before a run writes anything. None when the model cannot be built there (a Hub
    checkpoint whose config is not cached, an architecture that needs real tensors at construction)."""
    try:
        with torch.device("meta"):
            return create_backbone(name, num_classes, False, image_size, dropout)
    except Exception:
        return None


def data_config(model: nn.Module, image_size: int | None = None) -> dict[str, Any]:
    """The model's preprocessing (timm data config) at ``image_size``, squash-resized as DomainBed evaluates."""
    cfg = dict(timm.data.resolve_model_data_config(model))
    if image_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], image_size, image_size)
    cfg["crop_pct"], cfg["crop_mode"] = 1.0, "squash"
    return cfg


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features (DomainBed's featurizer output): pooled, after dropout, before the classifier."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def feature_dim(model: nn.Module) -> int:
    """The width of :func:`features`: timm's ``head_hidden_size`` where a pre-logits layer sits before the head,
    else ``num_features``."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def classifier(model: nn.Module) -> nn.Module:
    """The classification head (DomainBed's classifier)."""
    return model.get_classifier()


def classifier_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the head's parameters."""
    head = classifier(model)
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def featurizer_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Trainable parameters outside the classifier head (what GGA perturbs, what IU masks)."""
    head = classifier_parameter_names(model)
    for name, p in model.named_parameters():
        if p.requires_grad and name not in head:
            yield name, p


def _keep_eval(module: nn.Module, _inputs: Any) -> None:
    module.training = False


def batchnorm_frozen(module: nn.Module) -> bool:
    """Whether :func:`freeze_batchnorm` froze ``module``'s BatchNorm layers (its running statistics never move)."""
    return any(
        _keep_eval in m._forward_pre_hooks.values()
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )


def freeze_batchnorm(model: nn.Module) -> int:
    """Keep every BatchNorm layer in eval mode (running statistics fixed), whatever ``model.train()`` says.

    DomainBed's paper setting. A forward pre-hook is used rather than swapping modules, so the state dict keeps
    its plain timm keys (including ``num_batches_tracked``) and the model loads with plain timm. The affine
    parameters stay trainable. Returns the number of layers frozen.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_pre_hook(_keep_eval)
            module.eval()
            count += 1
    return count
