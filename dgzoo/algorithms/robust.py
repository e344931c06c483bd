"""Robust objectives and gradient masks from DomainBed: GroupDRO, inter-domain Mixup, spectral decoupling (SD),
Representation Self-Challenging (RSC), AND-mask, SAND-mask and Inter-environmental Gradient Alignment (IGA).

GroupDRO, Mixup, SD and RSC are loss hosts (one loss, one optimizer step). AND-mask, SAND-mask and IGA are update
hosts: they need every domain's gradient before they can form the step's gradient.

Several processes. Each method gives the update of one process on the global batch (every domain's global batch
being the concatenation of the processes' equal shares), up to BatchNorm, whose batch statistics are those of
each process's share:

- GroupDRO averages the per-domain losses over processes before updating ``q``, so every process holds the same
  ``q``; its loss is then linear in per-domain means, which DDP's gradient averaging makes global.
- Mixup draws its pairing of domains and its mixing weights from (run seed, step), the same on every process.
- SD's penalty and RSC's feature masks are per example; RSC's batch percentile is taken on the gathered changes.
- AND-mask and SAND-mask compare the per-domain gradients of the global batch
  (:func:`~dgzoo.algorithms.gradients.per_domain_gradients` averages them over processes).
- IGA: see :class:`IGA`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DGZooError
from ..hparams import HParam, Uniform
from .base import LossHost, Metrics, Minibatches, Recipe, UpdateHost
from .erm import pooled
from .gradients import DomainGradientAlgorithm, FlatParams, check_mixed_precision, check_precision
from .registry import register_algorithm
from .seeding import derive_seed, run_seed

_GROUPDRO = """@inproceedings{sagawa2020distributionally,
  title={Distributionally Robust Neural Networks for Group Shifts: On the Importance of Regularization for
         Worst-Case Generalization},
  author={Sagawa, Shiori and Koh, Pang Wei and Hashimoto, Tatsunori B. and Liang, Percy},
  booktitle={ICLR}, year={2020}}"""
_MIXUP = """@article{yan2020improve,
  title={Improve Unsupervised Domain Adaptation with Mixup Training},
  author={Yan, Shen and Song, Huan and Li, Nanxiang and Zou, Lincan and Ren, Liu},
  journal={arXiv preprint arXiv:2001.00677}, year={2020}}"""
_SD = """@inproceedings{pezeshki2021gradient,
  title={Gradient Starvation: A Learning Proclivity in Neural Networks},
  author={Pezeshki, Mohammad and Kaba, S{\\'e}kou-Oumar and Bengio, Yoshua and Courville, Aaron and Precup, Doina
          and Lajoie, Guillaume},
  booktitle={NeurIPS}, year={2021}}"""
_RSC = """@inproceedings{huang2020self,
  title={Self-Challenging Improves Cross-Domain Generalization},
  author={Huang, Zeyi and Wang, Haohan and Xing, Eric P. and Huang, Dong}, booktitle={ECCV}, year={2020}}"""
_ANDMASK = """@inproceedings{parascandolo2021learning,
  title={Learning Explanations that are Hard to Vary},
  author={Parascandolo, Giambattista and Neitz, Alexander and Orvieto, Antonio and Gresele, Luigi and
          Sch{\\"o}lkopf, Bernhard},
  booktitle={ICLR}, year={2021}}"""
_SANDMASK = """@article{shahtalebi2021sand,
  title={SAND-mask: An Enhanced Gradient Masking Strategy for the Discovery of Invariances in Domain
         Generalization},
  author={Shahtalebi, Soroosh and Gagnon-Audet, Jean-Christophe and Laleh, Touraj and Faramarzi, Mojtaba and
          Ahuja, Kartik and Rish, Irina},
  journal={arXiv preprint arXiv:2106.02266}, year={2021}}"""
_IGA = """@article{koyama2020invariance,
  title={When is invariance useful in an Out-of-Distribution Generalization problem?},
  author={Koyama, Masanori and Yamaguchi, Shoichiro}, journal={arXiv preprint arXiv:2008.01883}, year={2020}}"""


def _require_domains(name: str, recipe: Recipe, why: str) -> None:
    if recipe.num_domains < 2:
        raise DGZooError(
            f"{name} needs at least 2 source domains ({why}), got {recipe.num_domains}; train on "
            f"several source domains or use erm"
        )


# ---------------------------------------------------------------------- GroupDRO


@register_algorithm
class GroupDRO(LossHost):
    """Group DRO (Sagawa et al., Algorithm 1): minimise ``sum_k q_k L_k``, the per-domain losses weighted by ``q``,
    where ``q`` is raised by exponentiated-gradient ascent, ``q_k <- q_k exp(eta L_k)`` then normalised, before
    every step's loss (so the step already uses the updated weights, as DomainBed).

    ``q`` is a buffer (checkpointed with the model), ones before the first step as in DomainBed. It is updated
    with the per-domain losses averaged over processes, so every process holds the same ``q``. Deliberate
    differences from DomainBed: ``q`` is updated at every call of the loss, i.e. once per micro-batch under
    gradient accumulation (DomainBed has none); a single source domain is refused (``q`` would stay 1: ERM).
    """

    name = "groupdro"
    title = "Group Distributionally Robust Optimization"
    paper = "Sagawa et al., ICLR 2020"
    citation = _GROUPDRO
    HPARAMS = {
        "groupdro_eta": HParam(
            1e-2,
            "step size of the exponentiated-gradient ascent on the domain weights q",
            minimum=0.0,
            search=Uniform(-3, -1, base=10),
        )
    }

    def __init__(self, network: nn.Module, num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(network, num_classes, num_domains, hparams)
        self.register_buffer("q", torch.ones(num_domains))

    @classmethod
    def check_recipe(cls, hparams: dict[str, Any], recipe: Recipe) -> None:
        _require_domains(cls.name, recipe, "it reweights domains")

    def loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        losses = torch.stack([F.cross_entropy(self.predict(x), y) for x, y in minibatches]).float()
        with torch.no_grad():
            global_losses = self.runtime.all_reduce_mean(losses.detach().clone())
            self.q.mul_(torch.exp(self.hparams["groupdro_eta"] * global_losses))
            self.q.div_(self.q.sum())
        # A copy: the buffer changes in place at the next call (and DDP's buffer broadcast), after this graph.
        return torch.dot(losses, self.q.clone()), {f"q_{k}": float(w) for k, w in enumerate(self.q)}


# ---------------------------------------------------------------------- Mixup


def mixup_pairs(num_domains: int, alpha: float, seed: int) -> list[tuple[int, int, float]]:
    """The step's ``(i, j, lambda)`` triples: a random cyclic order of the domains, each mixed with the next one
    in that order, ``lambda ~ Beta(alpha, alpha)`` drawn per pair (DomainBed's ``random_pairs_of_minibatches``),
    all drawn from a generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_domains).tolist()
    lambdas = rng.beta(alpha, alpha, size=num_domains)
    return [(order[i], order[(i + 1) % num_domains], float(lam)) for i, lam in enumerate(lambdas)]


@register_algorithm
class Mixup(LossHost):
    """Inter-domain Mixup: each domain's batch is mixed with another domain's, ``x = lam x_i + (1 - lam) x_j``,
    and the loss is ``lam CE(f(x), y_i) + (1 - lam) CE(f(x), y_j)``, summed over the K pairs of a random cyclic
    order of the domains and divided by K. Each mixed batch is a forward pass of its own.

    Deliberate differences from DomainBed: the order and the ``lambda`` are drawn from a numpy generator seeded
    with (run seed, step) instead of torch's and numpy's global RNGs, so that every process draws the same and a
    resumed run draws again what it drew (numpy's, as torch has no seeded Beta sampler); a single source domain is
    refused (it would be mixed with itself: ERM). Under gradient accumulation every micro-batch of a step uses the
    step's draw, as one pass over the whole batch would.
    """

    name = "mixup"
    title = "Inter-domain Mixup"
    paper = "Yan et al., arXiv 2020"
    citation = _MIXUP
    HPARAMS = {
        "mixup_alpha": HParam(
            0.2,
            "alpha of the Beta(alpha, alpha) distribution of the mixing weight",
            minimum=0.0,
            search=Uniform(-1, 1, base=10),
        )
    }

    @classmethod
    def check_hparams(cls, hparams: dict[str, Any]) -> None:
        if hparams["mixup_alpha"] <= 0:
            raise DGZooError(
                f"hparam mixup_alpha={hparams['mixup_alpha']} must be positive (Beta(alpha, alpha)); "
                f"give e.g. mixup_alpha=0.2"
            )

    @classmethod
    def check_recipe(cls, hparams: dict[str, Any], recipe: Recipe) -> None:
        _require_domains(cls.name, recipe, "it mixes pairs of domains")

    def setup(self) -> None:
        self.seed = run_seed(self.runtime)

    def loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        objective = 0.0
        for i, j, lam in mixup_pairs(len(minibatches), self.hparams["mixup_alpha"], derive_seed(self.seed, step)):
            (xi, yi), (xj, yj) = minibatches[i], minibatches[j]
            n = min(len(xi), len(xj))
            logits = self.predict(lam * xi[:n] + (1 - lam) * xj[:n])
            objective = objective + lam * F.cross_entropy(logits, yi[:n]) + (1 - lam) * F.cross_entropy(logits, yj[:n])
        return objective / len(minibatches), {}

    def extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state.get("seed", self.seed))


# ---------------------------------------------------------------------- SD


@register_algorithm
class SD(LossHost):
    """Spectral decoupling (Pezeshki et al., Eq. 25): pooled cross-entropy plus ``sd_reg`` times the mean squared
    logit, which keeps a few strong features from starving the learning of others. As DomainBed."""

    name = "sd"
    title = "Spectral Decoupling"
    paper = "Pezeshki et al., NeurIPS 2021"
    citation = _SD
    HPARAMS = {"sd_reg": HParam(0.1, "weight of the mean squared logit", minimum=0.0, search=Uniform(-5, -1, base=10))}

    def loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        x, y = pooled(minibatches)
        logits = self.predict(x)
        class_loss = F.cross_entropy(logits, y)
        penalty = logits.float().pow(2).mean()
        return class_loss + self.hparams["sd_reg"] * penalty, {"class_loss": class_loss, "penalty": penalty}


# ---------------------------------------------------------------------- RSC


def feature_mask(grads: torch.Tensor, drop_factor: float) -> torch.Tensor:
    """RSC's Eq. 2: per example, 1 for the features whose gradient is below the example's ``1 - drop_factor``
    quantile (linear interpolation, numpy's percentile), 0 for the top ``drop_factor`` fraction."""
    grads = grads.float()
    return grads.lt(torch.quantile(grads, 1.0 - drop_factor, dim=1, keepdim=True)).float()


def sample_mask(changes: torch.Tensor, batch_changes: torch.Tensor, drop_factor: float) -> torch.Tensor:
    """RSC's batch percentage: ``[B, 1]``, 1 for the examples whose confidence drop under the feature mask is below
    the ``1 - drop_factor`` quantile of ``batch_changes`` (the global batch's), which keep all their features."""
    threshold = torch.quantile(batch_changes.float(), 1.0 - drop_factor)
    return changes.lt(threshold).float().view(-1, 1)


@register_algorithm
class RSC(LossHost):
    """Representation Self-Challenging: mute the penultimate features with the largest gradient of the true-class
    logit (Eq. 1-3), but only for the examples whose true-class probability drops most when muted (Section 3.3's
    batch percentage), then minimise the cross-entropy of the muted features (Eq. 4-5). As DomainBed, one pooled
    forward pass; the feature quantiles are per example, the batch quantile is taken on the global batch (the
    changes are gathered from every process)."""

    name = "rsc"
    title = "Representation Self-Challenging"
    paper = "Huang et al., ECCV 2020"
    citation = _RSC
    HPARAMS = {
        "rsc_f_drop_factor": HParam(
            1 / 3,
            "fraction of each example's features muted (largest gradients)",
            minimum=0.0,
            maximum=1.0,
            search=Uniform(0, 0.5),
        ),
        "rsc_b_drop_factor": HParam(
            1 / 3,
            "fraction of the batch whose features are muted (largest confidence drop)",
            minimum=0.0,
            maximum=1.0,
            search=Uniform(0, 0.5),
        ),
    }

    def loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        x, y = pooled(minibatches)
        onehot = F.one_hot(y, self.num_classes).to(torch.float32)
        features = self.featurize(x)
        logits = self.classify(features)
        # Eq. 1: the gradient of the true-class logit with respect to the features (not to the parameters).
        grads = torch.autograd.grad((logits * onehot).sum(), features)[0]
        mask_f = feature_mask(grads, self.hparams["rsc_f_drop_factor"]).to(features.dtype)
        with torch.no_grad():
            muted = self.classify(features * mask_f)
            changes = (F.softmax(logits.float(), 1) * onehot).sum(1) - (F.softmax(muted.float(), 1) * onehot).sum(1)
            mask_b = sample_mask(changes, self.runtime.gather(changes), self.hparams["rsc_b_drop_factor"])
        mask = torch.logical_or(mask_f.bool(), mask_b.bool()).to(features.dtype)
        return F.cross_entropy(self.classify(features * mask), y), {"muted": 1.0 - mask.float().mean()}


# ---------------------------------------------------------------------- AND-mask, SAND-mask


def _per_tensor_rescaled(mask: torch.Tensor, mean: torch.Tensor, numels: Sequence[int]) -> torch.Tensor:
    """``mask * mean``, each parameter tensor's part divided by the fraction of its entries the mask keeps."""
    kept = torch.stack([chunk.sum() / chunk.numel() for chunk in mask.split(list(numels))])
    scale = (1.0 / (1e-10 + kept)).repeat_interleave(torch.tensor(list(numels), device=mask.device))
    return mask * mean * scale


def and_mask(grads: torch.Tensor, numels: Sequence[int], tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AND-mask of ``[K, P]`` per-domain gradients: ``(gradient [P], mask [P])``.

    An entry is kept when ``|mean_k sign(g_k)| >= tau`` (the domains agree on its sign); the gradient is the mean
    gradient on the kept entries, rescaled per parameter tensor by its fraction of kept entries (DomainBed).
    """
    mask = (torch.sign(grads).mean(0).abs() >= tau).to(grads.dtype)
    return _per_tensor_rescaled(mask, grads.mean(0), numels), mask


def sand_mask(grads: torch.Tensor, numels: Sequence[int], tau: float, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SAND-mask of ``[K, P]`` per-domain gradients: ``(gradient [P], mask [P])``.

    The mask is continuous, ``max(0, tanh(k (|mean_k sign(g_k)| - tau) / var_k(g_k)))`` (unbiased variance), so
    entries the domains agree on with a small spread pass almost whole. As DomainBed: an undefined variance is
    1e-17, a NaN mask entry (0 / 0) is 1e-17, and the mean gradient is rescaled per parameter tensor.
    """
    agreement = torch.sign(grads).mean(0).abs()
    variance = grads.var(dim=0)
    variance[torch.isnan(variance)] = 1e-17
    mask = torch.tanh(k * variance.pow(-1) * (agreement - tau))
    mask = torch.maximum(mask, torch.zeros_like(mask))  # propagates NaN, replaced below
    mask[torch.isnan(mask)] = 1e-17
    return _per_tensor_rescaled(mask, grads.mean(0), numels), mask


class GradientMask(DomainGradientAlgorithm):
    """One step on a masked combination of the per-domain gradients (averaged over processes)."""

    def combine(self, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def update(self, minibatches: Minibatches, step: int) -> Metrics:
        grads, losses = self.domain_gradients(self.domains(minibatches))
        gradient, mask = self.combine(grads)
        self.optimizer.zero_grad(set_to_none=True)
        self.flat.assign_grad(gradient)
        self.optimizer.step()
        return {"loss": float(losses.mean()), "mask": float(mask.mean())}


@register_algorithm
class ANDMask(GradientMask):
    """AND-mask (Parascandolo et al.): step only along the parameters whose gradient sign most domains agree on.

    As DomainBed's ``ANDMask``, on dgzoo's per-domain gradient engine (whose ``domains`` option also allows K
    RandAugment views of a single source domain as the domains; DomainBed has the source domains only).
    """

    name = "andmask"
    title = "AND-mask"
    paper = "Parascandolo et al., ICLR 2021"
    citation = _ANDMASK
    HPARAMS = {
        **DomainGradientAlgorithm.HPARAMS,
        "tau": HParam(
            1.0,
            "minimum sign agreement |mean_k sign(g_k)| of a kept gradient entry",
            minimum=0.0,
            maximum=1.0,
            search=Uniform(0.5, 1.0),
        ),
    }

    def combine(self, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return and_mask(grads, self.flat.numels, self.hparams["tau"])


@register_algorithm
class SANDMask(GradientMask):
    """SAND-mask (Shahtalebi et al.): AND-mask's agreement test made smooth and scaled by the gradients' spread
    across domains. As DomainBed's ``SANDMask`` (whose own Adam betas are the recipe optimizer's here), on dgzoo's
    per-domain gradient engine (see :class:`ANDMask`)."""

    name = "sandmask"
    title = "SAND-mask"
    paper = "Shahtalebi et al., arXiv 2021"
    citation = _SANDMASK
    HPARAMS = {
        **DomainGradientAlgorithm.HPARAMS,
        "tau": HParam(
            1.0,
            "sign agreement |mean_k sign(g_k)| above which an entry passes",
            minimum=0.0,
            maximum=1.0,
            search=Uniform(0.0, 1.0),
        ),
        "k": HParam(10.0, "steepness of the tanh mask", minimum=0.0, search=Uniform(-3, 5, base=10)),
    }

    def combine(self, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sand_mask(grads, self.flat.numels, self.hparams["tau"], self.hparams["k"])


# ---------------------------------------------------------------------- IGA


@register_algorithm
class IGA(UpdateHost):
    """Inter-environmental Gradient Alignment: the mean per-domain cross-entropy plus ``penalty`` times
    ``sum_k ||g_k - g||^2``, the spread of the per-domain gradients ``g_k`` around their mean ``g`` (a constant, as
    DomainBed computes it without a graph).

    The penalty's gradient is ``2 sum_k H_k (g_k - g)``, with ``H_k`` domain k's Hessian. It is computed as the
    gradient of ``2 sum_k <g_k, r_k>``, ``g_k`` with its graph (``create_graph=True``) and the residuals ``r_k = g_k -
    g`` constant: on one process exactly DomainBed's gradient. On N processes ``r_k`` is formed from the per-domain
    gradients averaged over processes, so it is the global batch's residual; each process differentiates its own
    ``g_k`` against it and the gradients are averaged, which gives ``2 sum_k mean_p(H_k^p) r_k``, the gradient of the
    global batch's penalty (up to BatchNorm's per-process statistics), and the logged penalty is the global one.
    The forward passes use the bare network (one per domain, as DomainBed) and the gradient is averaged by hand,
    as the per-domain gradient engine does; fp16 is refused (see :mod:`dgzoo.algorithms.gradients`). Deliberate
    difference: a single source domain is refused (the penalty would be 0: ERM).
    """

    name = "iga"
    title = "Inter-environmental Gradient Alignment"
    paper = "Koyama & Yamaguchi, arXiv 2020"
    citation = _IGA
    COMPILABLE = False
    COMPILE_REFUSAL = (
        "its penalty differentiates the network's gradients (create_graph), which a compiled "
        "backward graph does not support"
    )
    HPARAMS = {
        "penalty": HParam(
            1000.0, "weight of the spread of the per-domain gradients", minimum=0.0, search=Uniform(1, 5, base=10)
        )
    }

    def __init__(self, network: nn.Module, num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(network, num_classes, num_domains, hparams)
        self.flat = FlatParams.of(self.network)

    @classmethod
    def check_recipe(cls, hparams: dict[str, Any], recipe: Recipe) -> None:
        check_mixed_precision(recipe.mixed_precision)
        _require_domains(cls.name, recipe, "it aligns the domains' gradients")

    def setup(self) -> None:
        check_precision(self.runtime)

    def update(self, minibatches: Minibatches, step: int) -> Metrics:
        params = self.flat.tensors
        losses, grads = [], []
        for x, y in minibatches:
            with self.runtime.autocast():
                loss = F.cross_entropy(self.network(x), y)
            grads.append(self.flat.flatten(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)))
            losses.append(loss.float())
        local = torch.stack(grads)  # [K, P], differentiable
        with torch.no_grad():
            domain_grads = self.runtime.all_reduce_mean(local.detach().clone())
            residuals = domain_grads - domain_grads.mean(0)
            penalty = residuals.pow(2).sum()
        mean_loss = torch.stack(losses).mean()
        objective = mean_loss + self.hparams["penalty"] * 2 * (local * residuals).sum()
        gradient = self.flat.flatten(torch.autograd.grad(objective, params, allow_unused=True))
        self.runtime.all_reduce_mean(gradient)
        self.optimizer.zero_grad(set_to_none=True)
        self.flat.assign_grad(gradient)
        self.optimizer.step()
        reported = self.runtime.all_reduce_mean(mean_loss.detach().clone())
        return {"loss": float(reported), "penalty": float(penalty)}
