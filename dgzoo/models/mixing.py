"""Feature-statistics mixing inside a timm backbone: MixStyle (Zhou et al., ICLR 2021) and EFDMix (Zhang et al.,
CVPR 2022), as forward hooks on the outputs of chosen stages.

A hook changes no module and adds no parameter or buffer, so the network keeps its plain timm keys and, in
evaluation mode (where the hooks pass the output through), its plain timm logits: the exported model is the
plain backbone. The operations are pure functions of the feature map, the mixing weights and the partner of each
sample, so they can be checked on known tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.models.densenet import DenseNet
from timm.models.resnet import ResNet
from torch import nn

from ..errors import DGZooError

MIX_MODES = ("random", "crossdomain")


def mixstyle(x: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MixStyle on ``x`` ``[B, C, H, W]``: normalise each sample's channels by their spatial mean and standard
    deviation, then re-style them with ``lam * own + (1 - lam) * partner's`` statistics (``lam`` ``[B]``,
    ``partner`` ``[B]`` indices). The statistics are treated as constants, as the official code detaches them."""
    mu = x.mean(dim=(2, 3), keepdim=True)
    sigma = (x.var(dim=(2, 3), keepdim=True) + eps).sqrt()
    mu, sigma = mu.detach(), sigma.detach()
    lam = lam.view(-1, 1, 1, 1).to(x.dtype)
    mu_mix = lam * mu + (1 - lam) * mu[partner]
    sigma_mix = lam * sigma + (1 - lam) * sigma[partner]
    return (x - mu) / sigma * sigma_mix + mu_mix


def efdmix(x: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """EFDMix on ``x`` ``[B, C, H, W]``: exact feature distribution matching by sorting. Each channel's values are
    replaced by ``lam * own + (1 - lam) * partner's value of the same rank``; the gradient reaches the own
    values with weight 1 (the official ``x + (1 - lam) * (matched - x.detach())``) and the partner's through the
    sort."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    values, order = torch.sort(flat, dim=-1)
    rank = order.argsort(dim=-1)
    lam = lam.view(-1, 1, 1).to(x.dtype)
    matched = values[partner].gather(-1, rank)
    return (flat + (1 - lam) * (matched - flat.detach())).view_as(x)


def partners(
    batch: int, mode: str, domain_sizes: Sequence[int] | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The index of each sample's mixing partner, drawn from the global RNG.

    ``random``: a random permutation of the batch. ``crossdomain``: where the batch is the concatenation of
    equal-size domain minibatches (``domain_sizes``), domain ``d`` is paired with domain ``(d + k) mod D`` for one
    random ``k`` in ``1..D-1``, in random order within it (for two domains the official swap of the halves);
    other batches fall back to ``random``.
    """
    sizes = list(domain_sizes or [])
    if mode == "random" or len(sizes) < 2 or sum(sizes) != batch or len(set(sizes)) != 1:
        return torch.randperm(batch).to(device)
    n, size = len(sizes), sizes[0]
    shift = int(torch.randint(1, n, ()))
    chunks = [((d + shift) % n) * size + torch.randperm(size) for d in range(n)]
    return torch.cat(chunks).to(device)


class StyleMixing:
    """A forward hook mixing a stage's output with probability ``p`` in training mode.

    ``op`` is :func:`mixstyle` or :func:`efdmix` (with its keyword arguments bound); the mixing weights are drawn
    from Beta(alpha, alpha), the partners by :func:`partners`. ``domain_sizes`` is set by the add-on before each
    step. A deep copy of a hooked network (an average of its weights, a frozen reference) gets a hook that never
    mixes: copies are evaluated or regularised against, never trained with mixing.
    """

    def __init__(self, op: Callable[..., torch.Tensor], p: float, alpha: float, mode: str):
        self.op, self.p, self.mode, self.enabled = op, p, mode, True
        self.beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
        self.domain_sizes: list[int] | None = None
        self.calls = self.mixed = 0

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        # A 1x1 map has no spatial statistics to mix (its variance is undefined).
        if not (self.enabled and module.training) or output.dim() != 4 or output.shape[2] * output.shape[3] < 2:
            return None
        self.calls += 1
        if float(torch.rand(())) >= self.p:  # mixes with probability p (official: skip if random() > p)
            return None
        self.mixed += 1
        batch = output.shape[0]
        lam = self.beta.sample((batch,)).to(output.device)
        return self.op(output, lam, partners(batch, self.mode, self.domain_sizes, output.device))

    def __deepcopy__(self, memo: dict[int, Any]) -> StyleMixing:
        copy = StyleMixing.__new__(StyleMixing)
        copy.__dict__.update(self.__dict__)
        copy.enabled = False
        return copy


def mixing_stages(network: nn.Module, stages: Sequence[int], what: str = "feature mixing") -> list[str]:
    """Module names of the outputs of ``stages`` (1-based) of a timm ResNet-family or DenseNet backbone: ResNet's
    ``layer1``..``layer4``, DenseNet's ``features.denseblock1``..``3`` and its final ``features.norm5``.
    Raises a one-line DGZooError on any other backbone or a stage it does not have."""
    if not isinstance(network, (ResNet, DenseNet)):
        raise DGZooError(
            f"{what} is inserted after the stages of timm ResNet-family and DenseNet backbones; "
            f"{type(network).__name__} has none that dgzoo knows: use a backbone such as resnet50 or "
            f"densenet121"
        )
    names = [info["module"] for info in network.feature_info][1:]  # entry 0 is the stem
    bad = [s for s in stages if not 1 <= s <= len(names)]
    if bad:
        raise DGZooError(
            f"{what}: {type(network).__name__} has stages 1-{len(names)}, not {bad[0]}; choose layers "
            f"among {', '.join(map(str, range(1, len(names) + 1)))}"
        )
    return [names[s - 1] for s in stages]
