"""MIRO, Mutual-Information Regularization with Oracle (Cha et al., ECCV 2022), as a loss host.

The pretrained backbone, frozen, stands in for the oracle. At each training step the features of the trained
network ``f`` and of the frozen copy's ``r`` at five places (the official ``stem_block``: the stem and the end of
each of four blocks, see :func:`feature_stages`) enter a variational lower bound of their mutual information,
with an identity mean encoder and a learned per-channel variance ``v = softplus(b) + 1e-5`` (initialised to 0.1)::

    loss = CE + ld * sum_stages mean((f - r)^2 / v + log v) / 2

The encoders train at ``lr_mult`` times the recipe's learning rate and are not exported: the run exports the
plain timm backbone. Without ``--pretrained`` the frozen copy is a random initialisation, which carries no
oracle knowledge, so such a recipe is refused when it is planned.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DGZooError
from ..hparams import Choice, HParam
from .base import LossHost, Metrics, Minibatches, Recipe
from .erm import pooled
from .registry import register_algorithm

CITATION = """@inproceedings{cha2022domain,
  title={Domain Generalization by Mutual-Information Regularization with Pre-trained Models},
  author={Cha, Junbum and Lee, Kyungjae and Park, Sungrae and Chun, Sanghyuk},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2022}
}"""
VARIANCE_INIT, VARIANCE_EPS = 0.1, 1e-5  # the official VarianceEncoder's


STEM_MODULES = ("stem", "patch_embed")  # timm's name of the module before the first stage, where feature_info has none


def output_channels(module: nn.Module) -> int:
    """Channels of a stem's output: those of its last convolution, linear layer or normalisation."""
    for m in reversed(list(module.modules())):
        for attribute in ("out_channels", "out_features", "num_features"):
            if isinstance(getattr(m, attribute, None), int):
                return int(getattr(m, attribute))
        if isinstance(getattr(m, "normalized_shape", None), tuple):
            return int(m.normalized_shape[-1])
    raise DGZooError(f"miro could not find the channel count of {type(module).__name__}'s stem")


def feature_stages(network: nn.Module) -> list[tuple[str, int]]:
    """(module name, channels) of the five places MIRO regularises, as the official ``URFeaturizer`` with
    ``feat_layers="stem_block"`` places them: the stem's output and the last module of each of four blocks.

    From timm's ``feature_info``: ResNets, RegNets, DenseNets and EfficientNets list the stem first (five entries,
    the first at a smaller reduction than the next; for ResNets the stem's end is the max-pool, as the official
    ``stem`` block); ConvNeXts, Swins and ViTs list only their stages or blocks, and the stem is the module before
    them (``stem``, ``patch_embed``: the official CLIP ViT's ``conv1``). More than four stages are split into four
    equal blocks and the last of each tapped: a ViT-B's ``blocks.2, 5, 8, 11``, as the official CLIP ViT-B's three
    resblocks per block.
    """
    info = getattr(network, "feature_info", None)
    if not info:
        raise DGZooError(
            f"miro regularises the backbone's stage features, but {type(network).__name__} declares no "
            f"timm feature_info; use a timm backbone with stages (resnet50, convnext, vit)"
        )
    names = dict(network.named_modules())
    entries = [(entry["module"], int(entry["num_chs"])) for entry in info]
    reductions = [entry.get("reduction", 0) for entry in info]
    stem: tuple[str, int] | None
    if len(entries) >= 5 and reductions[0] < reductions[1]:
        stem, blocks = entries[0], entries[1:]
        if stem[0] == "act1" and isinstance(names.get("maxpool"), nn.MaxPool2d):
            stem = ("maxpool", stem[1])
    else:
        name = next((n for n in STEM_MODULES if n in names), None)
        stem = (name, output_channels(names[name])) if name else None
        blocks = entries
    if len(blocks) > 4:
        blocks = [blocks[math.ceil(len(blocks) * (k + 1) / 4) - 1] for k in range(4)]
    return ([stem] if stem else []) + blocks


class _Tap:
    """A forward hook that records its module's output while ``features`` is a list. Copies of the network (an
    average of its weights) get a tap that records nothing."""

    def __init__(self) -> None:
        self.features: list[torch.Tensor] | None = None

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if self.features is not None:
            self.features.append(output)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Tap:
        return _Tap()


def _tap(network: nn.Module, names: list[str]) -> _Tap:
    tap, modules = _Tap(), dict(network.named_modules())
    for name in names:
        modules[name].register_forward_hook(tap)
    return tap


def variance(b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The per-channel variance ``softplus(b) + eps``, shaped for ``like``: ``[B, C, H, W]``, or channels last
    (``[B, N, C]`` tokens, a Swin's ``[B, H, W, C]``)."""
    v = F.softplus(b) + VARIANCE_EPS
    if like.dim() == 4 and like.shape[1] == v.numel():
        return v.view(1, -1, 1, 1)
    return v.view(*([1] * (like.dim() - 1)), -1)


@register_algorithm
class MIRO(LossHost):
    """ERM plus the mutual information of the stage features with a frozen copy of the pretrained backbone."""

    name = "miro"
    title = "Mutual-Information Regularization with Oracle"
    paper = "Cha et al., ECCV 2022"
    citation = CITATION
    COMPILABLE = False
    COMPILE_REFUSAL = (
        "its feature taps are forward hooks switched on and off between passes, which a compiled "
        "network would fix at its first call"
    )
    HPARAMS = {
        "ld": HParam(
            0.1,
            "weight lambda of the regulariser (official 0.1; the paper searches 1.0-0.001)",
            minimum=0.0,
            search=Choice((1.0, 0.1, 0.01, 0.001)),
        ),
        "lr_mult": HParam(10.0, "learning-rate multiplier of the variance encoders (official 10)", minimum=0.0),
    }

    @classmethod
    def check_recipe(cls, hparams: dict[str, Any], recipe: Recipe) -> None:
        if recipe.pretrained is False:
            raise DGZooError(
                "miro regularises toward the pretrained backbone's features, but the recipe trains from "
                "a random initialisation; add --pretrained"
            )
        if recipe.network is not None:
            feature_stages(recipe.network)

    def __init__(self, network: nn.Module, num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(network, num_classes, num_domains, hparams)
        stages = feature_stages(network)
        self.reference = copy.deepcopy(network)  # taken before any add-on hooks the network
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.reference.eval()
        names = [name for name, _ in stages]
        object.__setattr__(self, "tap", _tap(network, names))  # plain attributes: no state-dict keys
        object.__setattr__(self, "reference_tap", _tap(self.reference, names))
        init = float(torch.log(torch.expm1(torch.tensor(VARIANCE_INIT - VARIANCE_EPS))))
        self.variances = nn.ParameterList([nn.Parameter(torch.full((c,), init)) for _, c in stages])

    def train(self, mode: bool = True) -> MIRO:
        super().train(mode)
        self.reference.eval()  # the oracle's statistics never move
        return self

    def optimizer_groups(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "main": [
                {"params": [p for p in self.network.parameters() if p.requires_grad]},
                {"params": list(self.variances.parameters())},
            ]
        }

    def setup(self) -> None:
        # The encoders' group at lr_mult x the recipe's lr (set before the engine builds the schedule on it).
        for group in self.optimizer.param_groups[1:]:
            group["lr"] = group["lr"] * self.hparams["lr_mult"]

    def loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        x, y = pooled(minibatches)
        self.tap.features, self.reference_tap.features = [], []
        try:
            logits = self.predict(x)
            with torch.no_grad():
                self.reference(x)
            features, references = self.tap.features, self.reference_tap.features
        finally:
            self.tap.features = self.reference_tap.features = None
        reg = logits.new_zeros(())
        for f, r, b in zip(features, references, self.variances):
            v = variance(b, f)
            reg = reg + ((f - r.detach()).pow(2) / v + v.log()).mean() / 2
        ce = F.cross_entropy(logits, y)
        return ce + self.hparams["ld"] * reg, {"ce": ce.detach(), "reg": reg.detach()}
