"""Backbone anatomy: which parameter rows of which layer write which channel, for timm ResNet, DenseNet and ViT.

Identify-and-Unlearn (:mod:`dgzoo.algorithms.iu`) edits only the parameters that write a chosen set of channels;
this module knows where those parameters live in each backbone family (research note ``iu.md`` A4, A5, A9), so
the algorithm itself stays backbone-agnostic. It is model knowledge, not an algorithm: it imports nothing above
the models layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DGZooError
from .backbones import classifier


@dataclass
class ChannelSlice:
    """Entries ``index`` of ``param`` along ``dim`` write channels ``channel`` of IU's layer."""

    name: str
    param: nn.Parameter
    dim: int
    index: torch.Tensor
    channel: torch.Tensor

    def selected(self, channel_mask: torch.Tensor) -> torch.Tensor:
        """Positions along ``dim`` that write a selected channel."""
        return self.index[channel_mask[self.channel]]


def _writer(prefix: str, module: nn.Module, first_channel: int = 0) -> list[ChannelSlice]:
    """Output-channel slices of a conv, linear, norm or layer-scale module (its weight/bias/gamma rows)."""
    slices = []
    for attr in ("weight", "bias", "gamma"):
        p = getattr(module, attr, None)
        if isinstance(p, nn.Parameter) and p.requires_grad:
            rows = torch.arange(p.shape[0], device="cpu" if p.is_meta else p.device)  # meta: recipe checks
            slices.append(ChannelSlice(f"{prefix}.{attr}", p, 0, rows, rows + first_channel))
    return slices


def _resnet_stage_writers(prefix: str, stage: nn.Module) -> list[ChannelSlice]:
    """Note A9: every block's last conv + norm of the residual branch, and the shortcut's conv + norm."""
    from timm.models.resnet import Bottleneck

    slices = []
    for name, block in stage.named_children():
        last = ("conv3", "bn3") if isinstance(block, Bottleneck) else ("conv2", "bn2")
        for attr in last:
            slices += _writer(f"{prefix}.{name}.{attr}", getattr(block, attr))
        if getattr(block, "downsample", None) is not None:
            for sub, module in block.downsample.named_modules():
                if isinstance(module, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
                    slices += _writer(f"{prefix}.{name}.downsample.{sub}", module)
    return slices


def _vit_block_writers(prefix: str, block: nn.Module) -> list[ChannelSlice]:
    """The residual-stream writers of a transformer block: attention and MLP output projections, layer scales."""
    slices = _writer(f"{prefix}.attn.proj", block.attn.proj) + _writer(f"{prefix}.mlp.fc2", block.mlp.fc2)
    for attr in ("ls1", "ls2"):
        if hasattr(getattr(block, attr), "gamma"):
            slices += _writer(f"{prefix}.{attr}", getattr(block, attr))
    return slices


def _densenet_block_writers(model: nn.Module, name: str) -> list[ChannelSlice]:
    """A dense block concatenates its input with every layer's new channels: each channel has one writer."""
    from timm.models.densenet import DenseTransition

    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    children = list(parent.named_children())
    position = [n for n, _ in children].index(child)
    slices: list[ChannelSlice] = []
    if position and isinstance(children[position - 1][1], DenseTransition):
        previous = children[position - 1][0]
        slices += _writer(f"{parent_name}.{previous}.conv", getattr(parent, previous).conv)
        offset = getattr(parent, previous).conv.out_channels
    else:
        offset = next(layer.norm1.num_features for layer in model.get_submodule(name).children())
    for layer_name, layer in model.get_submodule(name).named_children():
        slices += _writer(f"{name}.{layer_name}.conv2", layer.conv2, offset)
        offset += layer.conv2.out_channels
    return slices


class ChannelLayer:
    """Where IU looks for domain-specific channels, and which parameter slices write each channel.

    ``layer='auto'`` is the pooled feature vector the classifier reads (ResNet: GAP of ``layer4``; DenseNet:
    GAP of ``features.norm5``; ViT: the final-norm class token), so its activations are the penultimate
    features themselves. A module name (``layer3``, ``blocks.5``, ``features.denseblock3``) picks an earlier
    stage; its output is reduced to one scalar per channel by spatial mean (CNNs, note A5) or the class token
    (ViTs). ``include_head`` adds the classifier's input columns (only for ``auto``, note A9's variant).
    """

    def __init__(self, model: nn.Module, layer: str = "auto", include_head: bool = False):
        from timm.models.densenet import DenseBlock, DenseNet
        from timm.models.resnet import ResNet
        from timm.models.vision_transformer import Block, VisionTransformer

        self.model, self.layer = model, layer
        self.module: nn.Module | None = None  # hooked module (None: the penultimate features)
        if layer == "auto":
            if isinstance(model, ResNet):
                self.slices = _resnet_stage_writers("layer4", model.layer4)
            elif isinstance(model, DenseNet):
                last = [n for n, m in model.features.named_children() if isinstance(m, DenseBlock)][-1]
                self.slices = _densenet_block_writers(model, f"features.{last}") + _writer(
                    "features.norm5", model.features.norm5
                )
            elif isinstance(model, VisionTransformer):
                self.slices = _vit_block_writers(f"blocks.{len(model.blocks) - 1}", model.blocks[-1])
                for norm in ("norm", "fc_norm"):
                    self.slices += _writer(norm, getattr(model, norm))
            else:
                raise DGZooError(
                    f"iu.layer=auto knows timm ResNet, DenseNet and VisionTransformer backbones, not "
                    f"{type(model).__name__}; use one of those backbones with +iu"
                )
            self.num_channels = model.num_features
        else:
            try:
                module = model.get_submodule(layer)
            except AttributeError:
                raise DGZooError(
                    f"iu.layer={layer!r} is not a module of {type(model).__name__}; use 'auto' or a "
                    f"stage name such as layer3, blocks.5 or features.denseblock3"
                ) from None
            if isinstance(model, ResNet) and layer in ("layer1", "layer2", "layer3", "layer4"):
                self.slices = _resnet_stage_writers(layer, module)
            elif isinstance(model, VisionTransformer) and isinstance(module, Block):
                self.slices = _vit_block_writers(layer, module)
            elif isinstance(model, DenseNet) and isinstance(module, DenseBlock):
                self.slices = _densenet_block_writers(model, layer)
            else:
                raise DGZooError(
                    f"iu.layer={layer!r} is not a ResNet stage (layer1..layer4), a ViT block "
                    f"(blocks.N) or a DenseNet dense block (features.denseblockN)"
                )
            self.module = module
            self.num_channels = 1 + max(int(s.channel.max()) for s in self.slices)
        if include_head:
            if layer != "auto":
                raise DGZooError(
                    "iu.include_head=true needs iu.layer=auto: the head's columns are the channels of "
                    "the penultimate features only"
                )
            head = classifier(model)
            columns = torch.arange(head.in_features, device="cpu" if head.weight.is_meta else head.weight.device)
            self.slices.append(ChannelSlice("head.weight", head.weight, 1, columns, columns))
        self.uses_cls_token = getattr(model, "cls_token", None) is not None

    def reduce(self, output: torch.Tensor) -> torch.Tensor:
        """One scalar per sample and channel from the hooked module's output."""
        if output.ndim == 4:
            return output.float().mean((2, 3))
        return (output[:, 0] if self.uses_cls_token else output.mean(1)).float()

    def parameters(self) -> list[nn.Parameter]:
        """The distinct parameters some slice belongs to, in slice order."""
        seen: dict[int, nn.Parameter] = {}
        for s in self.slices:
            seen.setdefault(id(s.param), s.param)
        return list(seen.values())


def masked_ascent(
    params: Sequence[nn.Parameter],
    grads: Sequence[torch.Tensor],
    slices: Sequence[ChannelSlice] | None,
    channel_mask: torch.Tensor | None,
    lr: float,
) -> None:
    """``theta += lr * grad`` on the slices writing selected channels only (every parameter when ``slices`` is None).

    Other entries are not written at all, so they stay bit-identical; no optimizer (and no optimizer state)
    is involved, as note A10 asks.
    """
    with torch.no_grad():
        if slices is None:
            for p, g in zip(params, grads):
                p.add_(g.to(p.dtype), alpha=lr)
            return
        grad_of = {id(p): g for p, g in zip(params, grads)}
        for s in slices:
            index = s.selected(channel_mask)
            if len(index):
                s.param.index_add_(
                    s.dim, index, grad_of[id(s.param)].index_select(s.dim, index).to(s.param.dtype), alpha=lr
                )


class ResNetTail:
    """A timm ResNet from IU's first edited stage on: run from that stage's cached inputs after an edit.

    DSGA edits only the writers of IU's layer (and optionally the head), so every layer before the first edited
    stage computes the same thing before and after the ascent: the line search and the after-ascent passes only
    need the rest of the network.
    """

    def __init__(self, model: nn.Module, stages: list[str]):
        self.model, self.stages = model, stages
        self.entry = model.get_submodule(stages[0])

    @classmethod
    def of(cls, model: nn.Module, layer: ChannelLayer) -> ResNetTail | None:
        """The tail for ``layer``'s writers, or None when the backbone is not a timm ResNet."""
        from timm.models.resnet import ResNet

        if not isinstance(model, ResNet):
            return None
        names = ["layer1", "layer2", "layer3", "layer4"]
        edited = {s.name.split(".")[0] for s in layer.slices if s.name.split(".")[0] in names}
        if not edited:
            return None
        return cls(model, names[min(names.index(n) for n in edited) :])

    def features(self, entry: torch.Tensor) -> torch.Tensor:
        h = entry
        for name in self.stages:
            h = self.model.get_submodule(name)(h)
        return self.model.forward_head(h, pre_logits=True)
