"""Identify-and-Unlearn's selection rules: the unlearning score, the MAD outlier thresholds and the channel IDV.

Pure functions of tensors (no network, no data), so each rule is tested on its own; :mod:`.iu` applies them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mad_outliers(values: torch.Tensor, k: float, tail: str) -> torch.Tensor:
    """Boolean mask of the MAD outliers of ``values``: ``< median - k MAD`` (``tail='lower'``) or ``> median + k MAD``.

    The raw median absolute deviation (no 1.4826 factor), as the paper's rule is stated; the median of an even
    count is the mean of the two middle values.
    """
    median = values.quantile(0.5)
    mad = (values - median).abs().quantile(0.5)
    if tail == "lower":
        return values < median - k * mad
    if tail == "upper":
        return values > median + k * mad
    raise ValueError(f"tail must be 'lower' or 'upper', not {tail!r}")


def outlier_scale(scores: torch.Tensor, scale: str) -> torch.Tensor:
    """The scores on the scale the lower-tail MAD rule reads them: ``log`` (default) or ``linear`` (as is).

    U = G^alpha / C is a ratio of positive quantities with a long right tail: on the README's own job its median
    absolute deviation was 0.67 to 0.99 of its median, so ``median - 2 MAD`` fell below 0, under every score, and
    the rule could select nothing (docs/iu.md, "Why D_u was empty"). On the log scale the same ranking has a lower
    tail the rule finds. Monotone: the samples selected are always the lowest U.
    """
    if scale == "log":
        return scores.double().clamp_min(1e-300).log().float()
    if scale == "linear":
        return scores
    raise ValueError(f"unknown score scale {scale!r}")


def inter_domain_variance(activations: Sequence[torch.Tensor], with_means: bool = False) -> torch.Tensor:
    """IDV per channel: the variance across domains of each domain's activation variance.

    ``activations[d]`` is ``[n_d, channels]`` (one scalar per sample and channel). Each domain counts once
    whatever its size. As a reviewer noted, a channel with equal variances but different means across
    domains gets IDV 0; ``with_means`` adds the across-domain variance of the means to catch it (not the
    paper's metric).
    """
    variances = torch.stack([a.float().var(0, unbiased=False) for a in activations])
    idv = variances.var(0, unbiased=False)
    if with_means:
        idv = idv + torch.stack([a.float().mean(0) for a in activations]).var(0, unbiased=False)
    return idv


def unlearning_scores(
    generalisation: torch.Tensor, complexity: torch.Tensor, alpha: float, transform: str = "minmax", eps: float = 1e-6
) -> torch.Tensor:
    """``U = G^alpha / C``; low means little help to validation for much complexity.

    ``G`` can be negative, so ``transform='minmax'`` first rescales it to ``[eps, 1]`` over the training set
    (note A2); ``'signed'`` uses ``sign(G) |G|^alpha`` instead.
    """
    g = generalisation.double()
    if transform == "minmax":
        g = eps + (1 - eps) * (g - g.min()) / (g.max() - g.min()).clamp_min(1e-30)
        g = g**alpha
    elif transform == "signed":
        g = g.sign() * g.abs() ** alpha
    else:
        raise ValueError(f"unknown G transform {transform!r}")
    return (g / complexity.double().clamp_min(1e-30)).float()


def mean_idv(activations: torch.Tensor, domain: torch.Tensor, channels: torch.Tensor) -> float:
    """Mean IDV over the selected channels, each domain of ``domain`` counted once."""
    domain = domain.to(activations.device)
    per_domain = [activations[domain == d] for d in domain.unique().tolist()]
    return inter_domain_variance(per_domain)[channels.to(activations.device)].mean().item()
