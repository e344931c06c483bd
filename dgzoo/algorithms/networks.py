"""Methods that add networks or heads around the backbone: SagNet (a style head and style randomisation), MTL
(DomainBed's marginal-transfer head) and Transfer (an adversarial copy of the classifier).

Each keeps the exported model plain timm: what it adds is a submodule of the host that the prediction does not need
(SagNet's style head, Transfer's adversary) or whose expected contribution to the logits is zero (MTL's noise
columns), so ``self.network`` alone predicts as the method does at test time.

DomainBed's ARM is not ported: its prediction concatenates to the image a context map averaged over the test batch
(a fourth input channel computed by a separate context network), which no plain timm model of the image can carry.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..hparams import Choice, HParam, Uniform
from ..models import feature_dim
from .base import LossHost, Metrics, Minibatches, UpdateHost
from .erm import pooled
from .registry import register_algorithm

_SAGNET = """@inproceedings{nam2021reducing,
  title={Reducing Domain Gap by Reducing Style Bias},
  author={Nam, Hyeonseob and Lee, HyunJae and Park, Jongchan and Yoon, Wonjun and Yoo, Donggeun},
  booktitle={CVPR}, year={2021}}"""
_MTL = """@article{blanchard2021domain,
  title={Domain Generalization by Marginal Transfer Learning},
  author={Blanchard, Gilles and Deshmukh, Aniket Anand and Dogan, {\\"U}r{\\"u}n and Lee, Gyemin and Scott, Clayton},
  journal={Journal of Machine Learning Research}, volume={22}, number={2}, pages={1--55}, year={2021}}"""
_TRANSFER = """@inproceedings{zhang2021quantifying,
  title={Quantifying and Improving Transferability in Domain Generalization},
  author={Zhang, Guojun and Zhao, Han and Yu, Yaoliang and Poupart, Pascal}, booktitle={NeurIPS}, year={2021}}"""


def fresh_copy(module: nn.Module) -> nn.Module:
    """A module of the same architecture as ``module``, re-initialised with torch's defaults (an independent head)."""
    clone = copy.deepcopy(module)
    for layer in clone.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    return clone


def randomize(x: torch.Tensor, alpha: torch.Tensor, perm: torch.Tensor, what: str, eps: float = 1e-5) -> torch.Tensor:
    """SagNet's randomisation of ``[B, D]`` features, with each row's mean and (unbiased) variance over its D
    entries as its "style" and the row normalised by them as its "content".

    ``what="style"``: every row keeps its content and takes the style ``alpha * own + (1 - alpha) * row perm[i]'s``
    (the interpolation is of means and of variances). ``what="content"``: every row keeps its own style and takes
    the content of row ``perm[i]``, detached, so the gradient reaches the features only through the style.
    ``alpha`` is ``[B, 1]``, ``perm`` a permutation of the rows.
    """
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    content = (x - mean) / (var + eps).sqrt()
    if what == "style":
        mean = alpha * mean + (1 - alpha) * mean[perm]
        var = alpha * var + (1 - alpha) * var[perm]
    else:
        content = content[perm].detach()
    return content * (var + eps).sqrt() + mean


@register_algorithm
class SagNet(UpdateHost):
    """Style-Agnostic Networks, as DomainBed implements them (Algorithm 1 of the paper on a shared featurizer).

    Three steps per update on the pooled batch: (1) the content path (featurizer + classifier, i.e. the timm
    network) learns on features whose style is randomised; (2) a style head learns on features whose content is
    randomised; (3) the featurizer alone is trained adversarially to make the style head's predictions uniform
    (``sag_w_adv`` x the mean negative log-probability over classes). The prediction and the exported model are
    the content path: the timm network, unchanged.

    Where the randomisation happens: DomainBed's featurizer output is the pooled penultimate vector, so it
    randomises the ``[B, D]`` features with per-sample statistics over the D features (its ResNet-specific variant
    at an intermediate feature map is commented out there); this port does the same on
    ``forward_head(forward_features(x), pre_logits=True)``, which works for any timm backbone.

    Differences from DomainBed, none changing an update: its three Adams (featurizer, content head, style head)
    are the recipe's optimizer ``main`` over the timm network (in step 3 the content head has no gradient, so it
    is not stepped, as DomainBed's separate content optimizer is not) and ``style`` over the style head; step 2
    runs the featurizer without gradient (DomainBed computes featurizer gradients there and discards them); step 3
    uses the style head's weights without gradient (DomainBed's are discarded too); all gradients are cleared
    before each step, so the recipe's gradient clipping sees only the step's own. With N processes each process
    draws the mixing partners from its own share of the batch (as DomainBed on one GPU draws them from its batch);
    the per-sample statistics need no communication. The style head is a fresh torch-default copy of the
    network's head.
    """

    name = "sagnet"
    title = "Style-Agnostic Networks"
    paper = "Nam et al., CVPR 2021"
    citation = _SAGNET
    HPARAMS = {
        "sag_w_adv": HParam(
            0.1,
            "weight of the adversarial (style-confusion) loss on the featurizer",
            minimum=0.0,
            search=Uniform(-2, 1, base=10),
        )
    }
    FIND_UNUSED_PARAMETERS = True  # each of the three steps leaves a head out

    def __init__(self, network: nn.Module, num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(network, num_classes, num_domains, hparams)
        self.style_head = fresh_copy(network.get_classifier())

    def optimizer_groups(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "main": [{"params": [p for p in self.network.parameters() if p.requires_grad]}],
            "style": [{"params": list(self.style_head.parameters())}],
        }

    @staticmethod
    def _draw(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # DomainBed's order of draws: the mixing weights, then the partners (global RNG, as dropout).
        alpha = torch.rand(len(features), 1, device=features.device)
        return alpha.to(features.dtype), torch.randperm(len(features), device=features.device)

    def content_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The content path on style-randomised features (step 1)."""
        features = self.featurize(x)
        return self.classify(randomize(features, *self._draw(features), "style"))

    def style_logits(self, x: torch.Tensor, adversarial: bool) -> torch.Tensor:
        """The style head on content-randomised features: trained itself (step 2, featurizer without gradient) or,
        ``adversarial``, with its weights fixed so that the gradient reaches only the featurizer (step 3)."""
        if adversarial:
            features = self.featurize(x)
            head = {n: p.detach() for n, p in self.style_head.named_parameters()}
            return torch.func.functional_call(
                self.style_head, head, (randomize(features, *self._draw(features), "content"),)
            )
        with torch.no_grad():
            features = self.featurize(x)
            mixed = randomize(features, *self._draw(features), "content")
        return self.style_head(mixed)

    def _step(self, loss: torch.Tensor, name: str) -> None:
        self.zero_grad(set_to_none=True)
        self.backward_step(loss, name)

    def update(self, minibatches: Minibatches, step: int) -> Metrics:
        x, y = pooled(minibatches)
        loss_c = F.cross_entropy(self.call("content_logits", x), y)
        self._step(loss_c, "main")
        loss_s = F.cross_entropy(self.call("style_logits", x, False), y)
        self._step(loss_s, "style")
        loss_adv = -F.log_softmax(self.call("style_logits", x, True), dim=1).mean(1).mean()
        loss_adv = loss_adv * self.hparams["sag_w_adv"]
        self._step(loss_adv, "main")
        return {
            "loss_c": float(loss_c.detach()),
            "loss_s": float(loss_s.detach()),
            "loss_adv": float(loss_adv.detach()),
        }


@register_algorithm
class MTL(LossHost):
    """Marginal Transfer Learning as DomainBed implements it: the classifier reads the features concatenated with a
    "domain embedding" of the same width, and the loss is the sum over domains of their cross-entropies.

    DomainBed's embedding is the (EMA of the) batch mean of the domain's features, but it is then overwritten in
    place by standard-normal noise (``.normal_()``) before the classifier reads it, in training and at test time
    alike: its classifier sees ``[features, z]`` with ``z ~ N(0, I)`` drawn per sample, and its EMA embeddings and
    ``mtl_ema`` affect nothing. This port trains exactly that. The classifier ``W [f; z] + b`` is split into the
    timm network's own head (``W_f f + b``) and a bias-free ``noise_head`` (``W_z z``, initialised as the matching
    columns of DomainBed's ``Linear(2D, C)``). Since ``E[W_z z] = 0``, the timm network alone gives the expected
    logits over the noise: that is the prediction and the exported model (DomainBed predicts with one noisy draw,
    so its test accuracy is that of a randomly perturbed version of the same logits). ``mtl_ema`` is therefore
    not declared. The content columns keep the timm head's initialisation.
    """

    name = "mtl"
    title = "Marginal Transfer Learning"
    paper = "Blanchard et al., JMLR 2021"
    citation = _MTL

    def __init__(self, network: nn.Module, num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(network, num_classes, num_domains, hparams)
        width = feature_dim(network)
        self.noise_head = nn.Linear(width, num_classes, bias=False)
        bound = 1 / math.sqrt(2 * width)  # torch's default for the Linear(2D, C) it is part of in DomainBed
        nn.init.uniform_(self.noise_head.weight, -bound, bound)

    def noisy_logits(self, x: torch.Tensor) -> torch.Tensor:
        """DomainBed's training logits: the classifier on the features and a fresh standard-normal embedding."""
        features = self.featurize(x)
        return self.classify(features) + self.noise_head(torch.randn_like(features))

    def loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        return sum(F.cross_entropy(self.noisy_logits(x), y) for x, y in minibatches), {}


@register_algorithm
class Transfer(UpdateHost):
    """Transfer (Algorithm 1 of Zhang et al.): make the source domains' losses transferable to each other.

    Each update, as DomainBed's ``Transfer.update``: (1) a cross-entropy step of the network on the pooled batch;
    (2) a step of the network on ``t_lambda`` x the gap ``max_i L_i - min_j L_j`` between the domains' losses
    under an adversarial copy of the classifier (the gradient reaches the featurizer); (3) the adversary is reset
    to the classifier and takes ``d_steps_per_g`` steps of plain SGD (``lr_d``) ascending the gap, each followed by
    the Euclidean projection onto the ball of radius ``delta`` around the classifier's parameters. The adversary so
    trained is the one step (2) uses at the next update. The exported model is the timm network.

    Differences from DomainBed: DomainBed's ``lr`` and ``weight_decay`` are the recipe's (``--lr``,
    ``--weight-decay``, the optimizer ``--optimizer``). Its ``gda`` switch is not ported: as written, ``gda=True``
    gives the model's optimizer the adversary's parameters instead of the network's, so the featurizer and
    classifier are never updated (and the adversary is reset every update); plain gradient descent on the model
    is ``--optimizer sgd``. Its ``weight_decay_d`` and ``beta1`` are declared there but unused and are not declared.
    The adversary's SGD step is taken here by hand (it has no momentum or decay, so it is torch's SGD step), with
    its gradient averaged across processes; its parameters are excluded from the recipe's optimizer and clipping.
    The adversary's featurizer passes run without gradient (DomainBed computes featurizer gradients there and
    discards them). With N processes the domains whose losses are the largest and smallest are chosen on the
    losses averaged across processes, so the gap and its gradients are those of one process on the global batch.
    """

    name = "transfer"
    title = "Transfer"
    paper = "Zhang et al., NeurIPS 2021"
    citation = _TRANSFER
    HPARAMS = {
        "t_lambda": HParam(
            1.0,
            "weight of the gap between the largest and smallest domain losses",
            minimum=0.0,
            search=Uniform(-2, 1, base=10),
        ),
        "delta": HParam(
            2.0,
            "radius of the ball around the classifier's parameters the adversary stays in",
            minimum=0.0,
            search=Uniform(0.1, 3.0),
        ),
        "d_steps_per_g": HParam(10, "adversary (gap-ascent) steps per update", minimum=0, search=Choice((1, 2, 5))),
        "lr_d": HParam(1e-3, "learning rate of the adversary's SGD", minimum=0.0, search=Uniform(-4.5, -2.5, base=10)),
    }
    FIND_UNUSED_PARAMETERS = True  # the gap step does not use the classifier

    def __init__(self, network: nn.Module, num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(network, num_classes, num_domains, hparams)
        self.adversary = copy.deepcopy(network.get_classifier()).requires_grad_(False)
        self.projections = self.ascent_steps = 0

    def optimizer_groups(self) -> dict[str, list[dict[str, Any]]]:
        return {"main": [{"params": [p for p in self.network.parameters() if p.requires_grad]}]}

    def adversary_losses(self, minibatches: Minibatches, head: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``[K]`` cross-entropies of the domains (one featurizer pass each) under the adversary, or under the
        adversary with parameters ``head`` (then the featurizer runs without gradient, the head in float32)."""
        losses = []
        for x, y in minibatches:
            if head is None:
                losses.append(F.cross_entropy(self.adversary(self.featurize(x)), y))
            else:
                with torch.no_grad(), self.runtime.autocast():
                    features = self.featurize(x)
                logits = torch.func.functional_call(self.adversary, head, (features.float(),))
                losses.append(F.cross_entropy(logits, y))
        return torch.stack(losses)

    def gap(self, losses: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``max_i L_i - min_j L_j`` of the local losses for the domains extreme on the process-averaged losses
        (the first of ties, as DomainBed's strict comparisons), and the global gap's value."""
        averaged = self.runtime.all_reduce_mean(losses.detach().clone())
        i, j = int(averaged.argmax()), int(averaged.argmin())
        return losses[i] - losses[j], float(averaged[i] - averaged[j])

    @torch.no_grad()
    def project(self) -> bool:
        """Pull the adversary back onto the ball of radius ``delta`` around the classifier; whether it was outside."""
        pairs = list(zip(self.network.get_classifier().parameters(), self.adversary.parameters()))
        distance = torch.sqrt(sum(torch.linalg.vector_norm(a - h) ** 2 for h, a in pairs))  # Frobenius, as DomainBed
        if distance <= self.hparams["delta"]:
            return False
        ratio = self.hparams["delta"] / distance
        for h, a in pairs:
            a.copy_(h + ratio * (a - h))
        return True

    def ascend(self, minibatches: Minibatches) -> float:
        """One SGD step of the adversary up the gap, then the projection; the gap's value before the step."""
        params = dict(self.adversary.named_parameters())
        leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        gap, value = self.gap(self.adversary_losses(minibatches, leaves))
        grads = torch.autograd.grad(-self.hparams["t_lambda"] * gap, list(leaves.values()), allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params.values(), grads):
                if g is not None:
                    p.sub_(self.hparams["lr_d"] * self.runtime.all_reduce_mean(g))
        self.projections += int(self.project())
        self.ascent_steps += 1
        return self.hparams["t_lambda"] * value

    def update(self, minibatches: Minibatches, step: int) -> Metrics:
        x, y = pooled(minibatches)
        loss = F.cross_entropy(self.call("predict", x), y)
        self.zero_grad(set_to_none=True)
        self.backward_step(loss)
        gap, value = self.gap(self.call("adversary_losses", minibatches))
        self.zero_grad(set_to_none=True)
        self.backward_step(self.hparams["t_lambda"] * gap)
        self.adversary.load_state_dict(self.network.get_classifier().state_dict())
        # DomainBed reports the gap of the last ascent step (before it is taken)
        metrics = {"loss": float(loss.detach()), "gap": self.hparams["t_lambda"] * value}
        for _ in range(self.hparams["d_steps_per_g"]):
            metrics["gap"] = self.ascend(minibatches)
        return metrics

    def extra_state(self) -> dict[str, Any]:
        return {"projections": self.projections, "ascent_steps": self.ascent_steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.projections = int(state.get("projections", 0))
        self.ascent_steps = int(state.get("ascent_steps", 0))

    def summary(self) -> dict[str, Any]:
        return {"projection_rate": self.projections / self.ascent_steps} if self.ascent_steps else {}
