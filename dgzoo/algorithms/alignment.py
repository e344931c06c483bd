"""Feature-distribution alignment across domains: CORAL, MMD (DomainBed's ``AbstractMMD``), and their causal
variants CausIRL-CORAL and CausIRL-MMD (DomainBed's ``AbstractCausIRL``).

Each is a loss host: per-domain cross-entropy plus ``mmd_gamma`` times a discrepancy between penultimate features.
As in DomainBed, every domain is a forward pass of its own (BatchNorm normalises each domain by its own batch
statistics). The discrepancy is computed on the *global* batch: each process's features are gathered
(differentiably, :meth:`~dgzoo.algorithms.runtime.Runtime.gather`) before the covariances or kernels are formed,
so N processes give the statistics and the gradient of one process on the same global batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..hparams import HParam, Uniform
from .base import LossHost, Metrics, Minibatches
from .registry import register_algorithm
from .seeding import derive_seed, run_seed

GAMMAS = (0.001, 0.01, 0.1, 1, 10, 100, 1000)  # DomainBed's bandwidths of the summed Gaussian kernels

_CORAL = """@inproceedings{sun2016deep,
  title={Deep CORAL: Correlation Alignment for Deep Domain Adaptation},
  author={Sun, Baochen and Saenko, Kate}, booktitle={ECCV Workshops}, year={2016}}"""
_MMD = """@inproceedings{li2018domain,
  title={Domain Generalization with Adversarial Feature Learning},
  author={Li, Haoliang and Pan, Sinno Jialin and Wang, Shiqi and Kot, Alex C.}, booktitle={CVPR}, year={2018}}"""
_CAUSIRL = """@inproceedings{chevalley2022invariant,
  title={Invariant Causal Mechanisms through Distribution Matching},
  author={Chevalley, Mathieu and Bunne, Charlotte and Krause, Andreas and Bauer, Stefan},
  booktitle={arXiv:2206.11646}, year={2022}}"""


def coral_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DomainBed's "mean_cov" discrepancy: mean squared difference of the feature means plus that of the
    (unbiased) feature covariances."""
    mean_x, mean_y = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    cent_x, cent_y = x - mean_x, y - mean_y
    cov_x = cent_x.t() @ cent_x / (len(x) - 1)
    cov_y = cent_y.t() @ cent_y / (len(y) - 1)
    return (mean_x - mean_y).pow(2).mean() + (cov_x - cov_y).pow(2).mean()


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[len(x), len(y)]`` squared Euclidean distances, clamped at 1e-30 (DomainBed's ``my_cdist``)."""
    x_norm, y_norm = x.pow(2).sum(-1, keepdim=True), y.pow(2).sum(-1, keepdim=True)
    return torch.addmm(y_norm.transpose(-2, -1), x, y.transpose(-2, -1), alpha=-2).add_(x_norm).clamp_min_(1e-30)


def gaussian_kernel(x: torch.Tensor, y: torch.Tensor, gammas: Sequence[float] = GAMMAS) -> torch.Tensor:
    """The sum over ``gammas`` of ``exp(-gamma * ||x_i - y_j||^2)``."""
    distances = squared_distances(x, y)
    return sum(torch.exp(-g * distances) for g in gammas)


def mmd_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The (biased) squared MMD with the multi-bandwidth Gaussian kernel."""
    return gaussian_kernel(x, x).mean() + gaussian_kernel(y, y).mean() - 2 * gaussian_kernel(x, y).mean()


_GAMMA = HParam(
    1.0, "weight of the feature discrepancy (DomainBed's mmd_gamma)", minimum=0.0, search=Uniform(-1, 1, base=10)
)


class FeatureAlignment(LossHost):
    """Mean per-domain cross-entropy + ``mmd_gamma`` x the mean pairwise discrepancy of the domains' features."""

    HPARAMS = {"mmd_gamma": _GAMMA}

    @staticmethod
    def distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        features = [self.featurize(x) for x, _ in minibatches]
        objective = sum(F.cross_entropy(self.classify(f), y) for f, (_, y) in zip(features, minibatches))
        penalty = self.penalty([self.runtime.gather(f) for f in features], step)
        objective = objective / len(minibatches)
        return objective + self.hparams["mmd_gamma"] * penalty, {"class_loss": objective, "penalty": penalty}

    def penalty(self, features: list[torch.Tensor], step: int) -> torch.Tensor:
        """The mean discrepancy over the domain pairs (0 with a single domain)."""
        k = len(features)
        pairs = [self.distance(features[i], features[j]) for i in range(k) for j in range(i + 1, k)]
        return sum(pairs) / len(pairs) if pairs else features[0].new_zeros(())


@register_algorithm
class CORAL(FeatureAlignment):
    """Deep CORAL: align the first and second moments of every pair of domains' features."""

    name = "coral"
    title = "Deep CORAL"
    paper = "Sun & Saenko, ECCV-W 2016"
    citation = _CORAL
    distance = staticmethod(coral_distance)


@register_algorithm
class MMD(FeatureAlignment):
    """MMD-AAE's alignment term (without the autoencoder, as DomainBed): Gaussian-kernel MMD between domains."""

    name = "mmd"
    title = "Maximum Mean Discrepancy"
    paper = "Li et al., CVPR 2018"
    citation = _MMD
    distance = staticmethod(mmd_distance)


class CausalAlignment(FeatureAlignment):
    """CausIRL: one random cut of every domain's batch splits the pooled features into two groups, whose
    discrepancy is penalised (matching the feature distribution across interventions on the style)."""

    def setup(self) -> None:
        self.seed = run_seed(self.runtime)  # the cuts are drawn from (run seed, step): the same on every process

    def penalty(self, features: list[torch.Tensor], step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, step))
        first, second = [], []
        for f in features:
            cut = int(torch.randint(0, len(f), (1,), generator=generator))
            first.append(f[:cut])
            second.append(f[cut:])
        first_all, second_all = torch.cat(first), torch.cat(second)
        if len(first_all) > 1 and len(second_all) > 1:
            return torch.nan_to_num(self.distance(first_all, second_all))
        return features[0].new_zeros(())

    def extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state.get("seed", self.seed))


@register_algorithm
class CausIRLCORAL(CausalAlignment):
    name = "causirl_coral"
    title = "CausIRL with CORAL"
    paper = "Chevalley et al., 2022"
    citation = _CAUSIRL
    distance = staticmethod(coral_distance)


@register_algorithm
class CausIRLMMD(CausalAlignment):
    name = "causirl_mmd"
    title = "CausIRL with MMD"
    paper = "Chevalley et al., 2022"
    citation = _CAUSIRL
    distance = staticmethod(mmd_distance)
