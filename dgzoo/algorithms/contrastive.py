"""Contrastive and self-supervised regularisers from DomainBed: SelfReg, CAD and CondCAD.

All three are loss hosts: the pooled cross-entropy plus a term comparing the samples of the step's batch with one
another (SelfReg: same-class pairs; CAD and CondCAD: a supervised-contrastive "domain bottleneck"). Such a term is
a statistic of the whole batch, so it is computed on the *global* batch: every process's features, labels and
domain indices are gathered per domain (differentiably, :meth:`~dgzoo.algorithms.runtime.Runtime.gather`), which
puts the samples in the order one process would hold them (each domain's global batch being the processes' equal
shares one after the other). Every process then computes the same global term, and DDP's gradient averaging gives
its one-process gradient. The only per-process statistic left is the backbone's BatchNorm (each process normalises
its own share); SelfReg's projection MLP runs on the gathered features, so its BatchNorm sees the global batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DGZooError
from ..hparams import Choice, HParam
from ..models import feature_dim
from .base import LossHost, Metrics, Minibatches
from .erm import pooled
from .registry import register_algorithm
from .runtime import Runtime
from .seeding import derive_seed, run_seed

_SELFREG = """@inproceedings{kim2021selfreg,
  title={SelfReg: Self-supervised Contrastive Regularization for Domain Generalization},
  author={Kim, Daehee and Yoo, Youngjun and Park, Seunghyun and Kim, Jinkyu and Lee, Jaekoo},
  booktitle={ICCV}, year={2021}}"""
_CAD = """@inproceedings{ruan2022optimal,
  title={Optimal Representations for Covariate Shift},
  author={Ruan, Yangjun and Dubois, Yann and Maddison, Chris J.}, booktitle={ICLR}, year={2022}}"""


def gather_domains(
    runtime: Runtime, features: torch.Tensor, minibatches: Minibatches
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features, labels, domains)`` of the global batch, domain by domain, from the pooled local ``features``.

    Features are gathered differentiably; the domain index of a sample is its minibatch's position.
    """
    sizes = [len(y) for _, y in minibatches]
    parts = [runtime.gather(f) for f in features.split(sizes)]
    labels = [runtime.gather(y) for _, y in minibatches]
    domains = [torch.full((len(y),), k, dtype=torch.long, device=y.device) for k, y in enumerate(labels)]
    return torch.cat(parts), torch.cat(labels), torch.cat(domains)


# ---------------------------------------------------------------------- SelfReg


def same_class_shuffles(labels: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two index tensors that send every sample of the label-sorted batch ``labels`` to a random sample of its own
    class: inside each run of equal labels, two random permutations, drawn class after class (as DomainBed
    shuffles each class interval twice)."""
    _, counts = torch.unique_consecutive(labels, return_counts=True)
    first, second, start = [], [], 0
    for count in counts.tolist():
        first.append(start + rng.permutation(count))
        second.append(start + rng.permutation(count))
        start += count
    return (
        torch.as_tensor(np.concatenate(first), dtype=torch.long, device=labels.device),
        torch.as_tensor(np.concatenate(second), dtype=torch.long, device=labels.device),
    )


def selfreg_terms(
    features: torch.Tensor,
    projections: torch.Tensor,
    logits: torch.Tensor,
    lam: float,
    first: torch.Tensor,
    second: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """SelfReg's four regularisers of a label-sorted batch, given its two same-class shuffles ``first`` and
    ``second``: the logits and the projections are compared with their shuffled same-class partner (``ind``,
    individualised) and with a ``lam`` mixup of the two partners (``hdl``, heterogeneous); the feature terms
    carry DomainBed's factor 0.3 and compare the raw features with the partners' *projections*."""
    logits_1, projections_1 = logits[first], projections[first]
    logits_mix = lam * logits_1 + (1 - lam) * logits[second]
    projections_mix = lam * projections_1 + (1 - lam) * projections[second]
    return {
        "ind_logit": F.mse_loss(logits, logits_1),
        "hdl_logit": F.mse_loss(logits, logits_mix),
        "ind_feat": 0.3 * F.mse_loss(features, projections_1),
        "hdl_feat": 0.3 * F.mse_loss(features, projections_mix),
    }


@register_algorithm
class SelfReg(LossHost):
    """SelfReg: cross-entropy plus self-supervised regularisers pulling every sample's logits and projected
    features towards those of random samples of the same class, and towards a Beta(0.5, 0.5) mixup of two such
    samples; the regulariser is scaled by ``min(CE, 1)`` (DomainBed's ``C_scale``).

    The projection MLP (DomainBed's ``cdpl``: three linear layers with BatchNorm, width 2048 for 2048-wide
    features, twice the feature width otherwise) is a submodule, not exported. As in DomainBed its weights keep their
    initial values (DomainBed builds the optimizer before the MLP, so no step reaches it) while its BatchNorm running
    statistics move and gradients flow through it to the features; ``train_projection=true`` trains it with the
    network instead, as the paper describes it.

    Deliberate differences from DomainBed: ``lam`` and the same-class shuffles are drawn from a numpy generator
    seeded with (run seed, step) instead of numpy's and torch's global RNGs, so every process and a resumed run
    draw the same; the batch is sorted by label with a stable sort and its features are computed in the original
    order then reordered (DomainBed sorts the images first: the same features, BatchNorm being
    order-independent); the whole loss, cross-entropy included, is computed on the gathered global batch.
    """

    name = "selfreg"
    title = "Self-supervised Contrastive Regularization"
    paper = "Kim et al., ICCV 2021"
    citation = _SELFREG
    HPARAMS = {
        "train_projection": HParam(
            False,
            "train the projection MLP with the network (the paper's SelfReg); false "
            "keeps its initial weights, as DomainBed's optimizer never steps it",
        ),
    }

    def __init__(self, network: nn.Module, num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(network, num_classes, num_domains, hparams)
        width = feature_dim(network)
        hidden = width if width == 2048 else 2 * width
        self.cdpl = nn.Sequential(
            nn.Linear(width, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, width),
            nn.BatchNorm1d(width),
        )
        # Frozen rather than only left out of the optimizer: no gradient is kept for it, so gradient clipping and
        # DDP see the network's parameters alone, as DomainBed's optimizer does.
        self.cdpl.requires_grad_(bool(self.hparams.get("train_projection", False)))

    def setup(self) -> None:
        self.seed = run_seed(self.runtime)

    def loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        x, _ = pooled(minibatches)
        features, labels, _ = gather_domains(self.runtime, self.featurize(x), minibatches)
        labels, order = torch.sort(labels, stable=True)
        features = features[order]
        projections, logits = self.cdpl(features), self.classify(features)
        rng = np.random.default_rng(derive_seed(self.seed, step))
        lam = float(rng.beta(0.5, 0.5))
        first, second = same_class_shuffles(labels, rng)
        terms = selfreg_terms(features, projections, logits, lam, first, second)
        class_loss = F.cross_entropy(logits, labels)
        scale = min(class_loss.item(), 1.0)
        penalty = lam * (terms["ind_logit"] + terms["ind_feat"]) + (1 - lam) * (terms["hdl_logit"] + terms["hdl_feat"])
        return class_loss + scale * penalty, {"class_loss": class_loss, "penalty": penalty, "lam": lam}

    def extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state.get("seed", self.seed))


# ---------------------------------------------------------------------- CAD, CondCAD

BASE_TEMPERATURE = 0.07  # SupCon's reference temperature, by which DomainBed rescales the bottleneck loss


def finite_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of the finite entries (0 when there is none): anchors without any admissible pair give +-inf."""
    finite = torch.isfinite(values)
    total = torch.where(finite, values, torch.zeros_like(values)).sum()
    count = finite.sum()
    return total / count if count > 0 else values.new_zeros(())


def bottleneck_loss(
    z: torch.Tensor, y: torch.Tensor, domains: torch.Tensor, temperature: float, conditional: bool, flipped: bool = True
) -> torch.Tensor:
    """CAD's contrastive domain bottleneck (a supervised-contrastive loss, Khosla et al.) on representations ``z``.

    For an anchor ``i`` the other samples are scored by ``softmax_j(z_i . z_j / temperature)``. Unconditional
    (CAD, bounds I(D; Z)): ``flipped`` maximises the log of the probability mass on samples of *other* domains,
    otherwise the mass on the anchor's own domain is minimised; anchors without another sample of their class are
    left out. Conditional (CondCAD, bounds I(D; Z | Y)): the same within the anchor's class (the softmax over
    same-class samples), anchors without a same-class sample of another (flipped) / the same (not flipped) domain
    left out. Scaled by ``temperature / 0.07`` and averaged over the anchors with a finite loss.
    """
    n = len(z)
    y, domains = y.reshape(-1, 1), domains.reshape(-1, 1)

    def log_mask(mask: torch.Tensor) -> torch.Tensor:  # 0 where admitted, -inf elsewhere
        return mask.to(z.dtype).log()

    not_self = ~torch.eye(n, dtype=torch.bool, device=z.device)
    same_class = (y == y.T) & not_self
    same_domain = domains == domains.T
    logits = (z @ z.T) / temperature * not_self.to(z.dtype)
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()  # stability: cancels in every log-ratio
    scale = temperature / BASE_TEMPERATURE
    if not conditional:
        log_prob = logits - torch.logsumexp(logits + log_mask(not_self), dim=1, keepdim=True)
        valid = same_class.sum(1) > 0
        log_prob, same_domain = log_prob[valid], same_domain[valid]
        if flipped:
            loss = -scale * torch.logsumexp(log_prob + log_mask(~same_domain), dim=1)
        else:  # DomainBed's mask here keeps the anchor itself (its similarity counted as the logit 0)
            loss = scale * torch.logsumexp(log_prob + log_mask(same_domain), dim=1)
    else:
        class_other_domain, class_same_domain = same_class & ~same_domain, same_class & same_domain
        valid = (class_other_domain if flipped else class_same_domain).sum(1) > 0
        logits, same_class = logits[valid], same_class[valid]
        log_prob = logits - torch.logsumexp(logits + log_mask(same_class), dim=1, keepdim=True)
        if flipped:
            loss = -scale * torch.logsumexp(log_prob + log_mask(class_other_domain[valid]), dim=1)
        else:
            loss = scale * torch.logsumexp(log_prob + log_mask(class_same_domain[valid]), dim=1)
    return finite_mean(loss)


class ContrastiveBottleneck(LossHost):
    """Pooled cross-entropy + ``lmbda`` x the contrastive domain bottleneck of the penultimate features.

    Deliberate differences from DomainBed: ``is_project`` works (DomainBed's projection head refers to an undefined
    ``feature_dim`` and fails to build; here it is Linear(F, F), ReLU, Linear(F, 128) on the F-wide features, a
    submodule trained with the network and not exported); the bottleneck is computed on the gathered global batch;
    the classifier is the backbone's own head (DomainBed's ``nonlinear_classifier`` is off by default).
    """

    paper = "Ruan et al., ICLR 2022"
    citation = _CAD
    CONDITIONAL = False
    HPARAMS = {
        "lmbda": HParam(
            1e-1, "weight of the bottleneck loss", minimum=0.0, search=Choice((1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2))
        ),
        "temperature": HParam(0.1, "temperature of the contrastive softmax", minimum=0.0, search=Choice((0.05, 0.1))),
        "is_normalized": HParam(False, "L2-normalise the representations before their dot products"),
        "is_project": HParam(False, "score projections by a 2-layer head (to 128 dims) instead of the features"),
        "is_flipped": HParam(
            True,
            "maximise the log-probability of other-domain samples instead of minimising "
            "that of same-domain ones (the same optimum; DomainBed finds it more stable)",
        ),
    }

    def __init__(self, network: nn.Module, num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(network, num_classes, num_domains, hparams)
        if hparams["is_project"]:
            width = feature_dim(network)
            self.project = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, 128))

    @classmethod
    def check_hparams(cls, hparams: dict[str, Any]) -> None:
        if hparams["temperature"] <= 0:
            raise DGZooError(f"hparam temperature={hparams['temperature']} must be positive; give e.g. temperature=0.1")

    def loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        x, y = pooled(minibatches)
        features, logits = self.features_and_logits(x)
        class_loss = F.cross_entropy(logits, y)
        z, labels, domains = gather_domains(self.runtime, features, minibatches)
        if self.hparams["is_project"]:
            z = self.project(z)
        if self.hparams["is_normalized"]:
            z = F.normalize(z, dim=1)
        bottleneck = bottleneck_loss(
            z.float(), labels, domains, self.hparams["temperature"], self.CONDITIONAL, self.hparams["is_flipped"]
        )
        return class_loss + self.hparams["lmbda"] * bottleneck, {"class_loss": class_loss, "bn_loss": bottleneck}


@register_algorithm
class CAD(ContrastiveBottleneck):
    """Contrastive Adversarial Domain bottleneck: penalise how well a sample's features identify its domain
    (bounds I(D; Z); needs domain labels only)."""

    name = "cad"
    title = "Contrastive Adversarial Domain bottleneck"


@register_algorithm
class CondCAD(ContrastiveBottleneck):
    """Conditional CAD: penalise how well a sample's features identify its domain among the samples of its class
    (bounds I(D; Z | Y); needs domain and class labels)."""

    name = "condcad"
    title = "Conditional Contrastive Adversarial Domain bottleneck"
    CONDITIONAL = True
