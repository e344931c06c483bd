"""Invariance penalties from DomainBed: IRM, V-REx, IB-ERM, IB-IRM, EQRM, Fishr and RDM.

Over 500 lines for one job: seven hosts of one family share the annealed-penalty template and its helpers, and each
reads against DomainBed's class of the same name; split per host they would each import the same base.

Each is a loss host: the mean cross-entropy plus a penalty whose weight switches on after a number of steps
(``*_penalty_anneal_iters``, EQRM's ``eqrm_burnin_iters``). DomainBed builds a fresh Adam at that step, "because it
doesn't like the sharp jump in gradient magnitudes"; dgzoo empties the state of the recipe's optimizer at the same
step, inside ``loss()`` (before that step's update), which is the same fresh optimizer with the same parameter
groups, learning rate and weight decay. EQRM and RDM also switch to their own learning rate then
(``eqrm_lr``, ``rdm_lr``): from that step on, every optimizer step runs at that learning rate times the recipe's
schedule factor (``lr`` now / ``lr`` of the recipe: 1 with DomainBed's constant schedule), set by a pre-step hook
and restored after the step, so the schedule itself is untouched.

The step counter is the engine's ``step`` (DomainBed's ``update_count``: 0 on the first update), so a resumed run
switches at the same step without extra state.

Several processes. Every penalty is a statistic of each domain's *global* batch: the per-domain logits, features,
per-sample losses, per-domain mean losses or per-sample gradients are gathered (differentiably,
:meth:`~dgzoo.algorithms.runtime.Runtime.gather`, in process order) before it is formed, so N processes compute
the penalty, and get the gradient, of one process on the concatenated batch. For IRM the two halves of a domain's
batch (even and odd rows, as DomainBed) are then the halves of the gathered global batch. Cross-entropy means are
local (DDP averages equal shares). Only BatchNorm's batch statistics remain per process. Under
``--grad-accumulation`` each micro-batch is a batch of its own (its penalty is that micro-batch's, and Fishr's moving
average advances once per micro-batch).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..errors import DGZooError
from ..hparams import HParam, Uniform
from .alignment import gaussian_kernel
from .base import LossHost, Metrics, Minibatches, Recipe
from .erm import pooled
from .registry import register_algorithm

_IRM = """@article{arjovsky2019invariant,
  title={Invariant Risk Minimization},
  author={Arjovsky, Martin and Bottou, L{\\'e}on and Gulrajani, Ishaan and Lopez-Paz, David},
  journal={arXiv:1907.02893}, year={2019}}"""
_VREX = """@inproceedings{krueger2021out,
  title={Out-of-Distribution Generalization via Risk Extrapolation (REx)},
  author={Krueger, David and Caballero, Ethan and Jacobsen, Joern-Henrik and Zhang, Amy and Binas, Jonathan and
          Zhang, Dinghuai and Le Priol, Remi and Courville, Aaron}, booktitle={ICML}, year={2021}}"""
_IB = """@inproceedings{ahuja2021invariance,
  title={Invariance Principle Meets Information Bottleneck for Out-of-Distribution Generalization},
  author={Ahuja, Kartik and Caballero, Ethan and Zhang, Dinghuai and Gagnon-Audet, Jean-Christophe and Bengio, Yoshua
          and Mitliagkas, Ioannis and Rish, Irina}, booktitle={NeurIPS}, year={2021}}"""
_EQRM = """@inproceedings{eastwood2022probable,
  title={Probable Domain Generalization via Quantile Risk Minimization},
  author={Eastwood, Cian and Robey, Alexander and Singh, Shashank and von K{\\"u}gelgen, Julius and Hassani, Hamed
          and Pappas, George J. and Sch{\\"o}lkopf, Bernhard}, booktitle={NeurIPS}, year={2022}}"""
_FISHR = """@inproceedings{rame2022fishr,
  title={Fishr: Invariant Gradient Variances for Out-of-Distribution Generalization},
  author={Rame, Alexandre and Dancette, Corentin and Cord, Matthieu}, booktitle={ICML}, year={2022}}"""
_RDM = """@inproceedings{nguyen2024domain,
  title={Domain Generalisation via Risk Distribution Matching},
  author={Nguyen, Toan and Do, Kien and Duong, Bao and Nguyen, Thin}, booktitle={WACV}, year={2024}}"""

RDM_GAMMAS = (0.0001, 0.001, 0.01, 0.1, 1, 10, 100, 1000)  # RDM's kernel bandwidths (CORAL/MMD's plus 1e-4)
KDE_BISECTION_STEPS = 32  # DomainBed's continuous_bisect_fun_left

# DomainBed's shared search spaces of a penalty weight and of its anneal length.
_LAMBDA_SEARCH = Uniform(-1, 5, base=10)
_ANNEAL_SEARCH = Uniform(0, 4, base=10, integer=True)


def _anneal(default: int, what: str) -> HParam:
    return HParam(
        default,
        f"steps before {what} switches on (the optimizer's state is reset at that step)",
        minimum=0,
        search=_ANNEAL_SEARCH,
    )


# -- penalties (pure functions of one domain's global batch, tested by hand)


def irm_penalty(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """IRMv1: the product of the gradients, with respect to a dummy logit scale at 1.0, of the cross-entropy of
    the even and of the odd rows (two independent estimates of the squared gradient)."""
    scale = torch.ones((), device=logits.device, requires_grad=True)
    logits = logits.float()
    (grad_1,) = torch.autograd.grad(F.cross_entropy(logits[::2] * scale, y[::2]), scale, create_graph=True)
    (grad_2,) = torch.autograd.grad(F.cross_entropy(logits[1::2] * scale, y[1::2]), scale, create_graph=True)
    return grad_1 * grad_2


def information_bottleneck(features: torch.Tensor) -> torch.Tensor:
    """IB penalty: the mean over feature dimensions of the (unbiased) variance over the batch."""
    return features.float().var(dim=0).mean()


def risk_variance(risks: torch.Tensor) -> torch.Tensor:
    """V-REx: the (biased) variance of the per-domain risks."""
    return (risks - risks.mean()).pow(2).mean()


def rbf_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """RDM's (biased) squared MMD with the Gaussian kernels of :data:`RDM_GAMMAS`."""
    return (
        gaussian_kernel(x, x, RDM_GAMMAS).mean()
        + gaussian_kernel(y, y, RDM_GAMMAS).mean()
        - 2 * gaussian_kernel(x, y, RDM_GAMMAS).mean()
    )


def kde_quantile(values: torch.Tensor, q: float, steps: int = KDE_BISECTION_STEPS) -> torch.Tensor:
    """The ``q``-quantile of a Gaussian kernel density estimate of ``values`` (DomainBed's ``Nonparametric``).

    The bandwidth is the Gauss-optimal ``1.06 * std * n^(-1/5)``; the quantile is found by bisection of the KDE's
    CDF between the ``q``-quantiles of the kernels at the smallest and largest value. As in DomainBed, the
    result is an affine combination of those two bounds (the bisection picks the weights), and that is where its
    gradient flows. A negative ``q`` stands for ``log(1 - q')`` with ``q'`` very close to 1 (DomainBed's
    asymptotic branch): ``mean(values + bw * sqrt(-2 q))``. Computed in float64.
    """
    data = values.double().sort().values
    bandwidth = 1.06 * data.std() * len(data) ** -0.2
    if q < 0:
        return (data + bandwidth * math.sqrt(-2 * q)).mean().to(values.dtype)
    z = float(torch.special.ndtri(torch.tensor(q, dtype=torch.float64)))
    bounds = [data[0] + bandwidth * z, data[-1] + bandwidth * z]
    middle = 0.5 * (bounds[0] + bounds[1])
    for _ in range(steps):
        above = bool(torch.special.ndtr((middle - data) / bandwidth).mean() > q)
        bounds[int(above)] = middle  # the CDF at the middle exceeds q: the quantile is below it
        following = 0.5 * (bounds[0] + bounds[1])
        if bool(following == middle):
            break
        middle = following
    return middle.to(values.dtype)


def per_sample_head_gradients(head: nn.Module, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B, P]``: row ``i`` is the gradient of sample ``i``'s cross-entropy with respect to the head's trainable
    parameters (weights, then bias, in ``named_parameters`` order), flattened; differentiable with respect to
    the features and the parameters (what DomainBed's BackPACK ``BatchGrad`` with ``create_graph`` gives)."""
    params = {name: p for name, p in head.named_parameters() if p.requires_grad}

    def sample_loss(weights: dict[str, torch.Tensor], f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(head, weights, (f.unsqueeze(0),)), target.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, features, y)
    return torch.cat([grads[name].reshape(len(features), -1) for name in params], dim=1)


# -- hosts


class AnnealedPenalty(LossHost):
    """A loss host whose penalty weights switch on at given steps, where the optimizer's state is reset (subclasses
    write :meth:`penalised_loss` and name the steps in ``RESET_AT``; :meth:`loss` does the rest); with
    ``LR_SWITCH = (step key, lr key)``, optimizer steps from that step on run at that learning rate instead of the
    recipe's (times the schedule's factor)."""

    RESET_AT: ClassVar[tuple[str, ...]] = ()  # hparams naming the steps where the optimizer's state is reset
    LR_SWITCH: ClassVar[tuple[str, str] | None] = None

    def setup(self) -> None:
        self._switched_lr = False
        if self.LR_SWITCH is not None:
            optimizer = self._bare_optimizer()
            first = optimizer.param_groups[0]
            self._recipe_lr = float(first.get("initial_lr", first["lr"]))  # before any schedule changed it
            self._scheduled_lrs: list[float] = []
            optimizer.register_step_pre_hook(lambda *_: self._use_switched_lr())
            optimizer.register_step_post_hook(lambda *_: self._restore_lr())

    def _bare_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # under Accelerate's wrapper

    def loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        """Arm this step's optimizer reset and lr switch (:meth:`begin_step`), then the host's
        :meth:`penalised_loss`: a template method, so no host can forget the reset."""
        self.begin_step(step)
        return self.penalised_loss(minibatches, step)

    def penalised_loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        """The host's loss at ``step``, its penalty weighted by where ``step`` is in the anneal."""
        raise NotImplementedError

    def begin_step(self, step: int) -> None:
        """Reset the optimizer where a penalty switches on (DomainBed's fresh Adam), and arm the lr switch."""
        if any(step == self.hparams[key] for key in self.RESET_AT):
            self._bare_optimizer().state.clear()
        if self.LR_SWITCH is not None:
            self._switched_lr = step >= self.hparams[self.LR_SWITCH[0]]

    def _use_switched_lr(self) -> None:
        groups = self._bare_optimizer().param_groups
        self._scheduled_lrs = [g["lr"] for g in groups]
        if self._switched_lr and self._recipe_lr > 0 and self.LR_SWITCH is not None:  # switched: LR_SWITCH is set
            ratio = self.hparams[self.LR_SWITCH[1]] / self._recipe_lr
            for g in groups:
                g["lr"] = g["lr"] * ratio

    def _restore_lr(self) -> None:
        for g, lr in zip(self._bare_optimizer().param_groups, self._scheduled_lrs):
            g["lr"] = lr

    def domain_outputs(self, minibatches: Minibatches) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-domain features and logits of one pooled forward pass (DomainBed's, BatchNorm over all domains)."""
        x, _ = pooled(minibatches)
        features, logits = self.features_and_logits(x)
        sizes = [len(x) for x, _ in minibatches]
        return list(features.split(sizes)), list(logits.split(sizes))

    def irm_term(self, logits: list[torch.Tensor], minibatches: Minibatches) -> torch.Tensor:
        """The mean over domains of IRM's penalty on each domain's gathered (global) logits."""
        gather = self.runtime.gather
        return sum(irm_penalty(gather(z), gather(y)) for z, (_, y) in zip(logits, minibatches)) / len(minibatches)

    def global_domain_risks(self, risks: torch.Tensor) -> torch.Tensor:
        """``[K]`` per-domain mean losses of the global batch: the mean of the processes' (equal-share) means."""
        return self.runtime.gather(risks.unsqueeze(0)).mean(0)


def _nll(logits: list[torch.Tensor], minibatches: Minibatches) -> torch.Tensor:
    """The mean over domains of each domain's mean cross-entropy."""
    return sum(F.cross_entropy(z, y) for z, (_, y) in zip(logits, minibatches)) / len(minibatches)


@register_algorithm
class IRM(AnnealedPenalty):
    """IRMv1: cross-entropy + ``irm_lambda`` x the per-domain IRM penalty (weight 1.0 during the anneal).

    The penalty of each domain is formed on its gathered global logits (halves: even and odd rows of the global
    batch). Otherwise as DomainBed.
    """

    name = "irm"
    title = "Invariant Risk Minimization"
    paper = "Arjovsky et al., 2019"
    citation = _IRM
    HPARAMS = {
        "irm_lambda": HParam(
            1e2, "weight of the IRM penalty after the anneal (1.0 before)", minimum=0.0, search=_LAMBDA_SEARCH
        ),
        "irm_penalty_anneal_iters": _anneal(500, "irm_lambda"),
    }
    RESET_AT: ClassVar[tuple[str, ...]] = ("irm_penalty_anneal_iters",)

    def penalised_loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        weight = self.hparams["irm_lambda"] if step >= self.hparams["irm_penalty_anneal_iters"] else 1.0
        _, logits = self.domain_outputs(minibatches)
        nll, penalty = _nll(logits, minibatches), self.irm_term(logits, minibatches)
        return nll + weight * penalty, {"nll": nll, "penalty": penalty}


@register_algorithm
class VREx(AnnealedPenalty):
    """V-REx: mean per-domain risk + ``vrex_lambda`` x the variance of the per-domain risks (weight 1.0 during the
    anneal). The risks are those of each domain's global batch. Otherwise as DomainBed."""

    name = "vrex"
    title = "Variance Risk Extrapolation"
    paper = "Krueger et al., ICML 2021"
    citation = _VREX
    HPARAMS = {
        "vrex_lambda": HParam(
            1e1, "weight of the risk variance after the anneal (1.0 before)", minimum=0.0, search=_LAMBDA_SEARCH
        ),
        "vrex_penalty_anneal_iters": _anneal(500, "vrex_lambda"),
    }
    RESET_AT = ("vrex_penalty_anneal_iters",)

    def penalised_loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        weight = self.hparams["vrex_lambda"] if step >= self.hparams["vrex_penalty_anneal_iters"] else 1.0
        _, logits = self.domain_outputs(minibatches)
        risks = self.global_domain_risks(
            torch.stack([F.cross_entropy(z.float(), y) for z, (_, y) in zip(logits, minibatches)])
        )
        mean, penalty = risks.mean(), risk_variance(risks)
        return mean + weight * penalty, {"nll": mean, "penalty": penalty}


@register_algorithm
class IBERM(AnnealedPenalty):
    """IB-ERM: cross-entropy + ``ib_lambda`` x the per-domain feature variance (weight 0 during the anneal, so an
    ERM step until then). Variances are over each domain's global batch. Otherwise as DomainBed."""

    name = "ib_erm"
    title = "Information Bottleneck ERM"
    paper = "Ahuja et al., NeurIPS 2021"
    citation = _IB
    HPARAMS = {
        "ib_lambda": HParam(
            1e2,
            "weight of the feature-variance penalty after the anneal (0 before)",
            minimum=0.0,
            search=_LAMBDA_SEARCH,
        ),
        "ib_penalty_anneal_iters": _anneal(500, "ib_lambda"),
    }
    RESET_AT: ClassVar[tuple[str, ...]] = ("ib_penalty_anneal_iters",)

    def ib_term(self, features: list[torch.Tensor]) -> torch.Tensor:
        return sum(information_bottleneck(self.runtime.gather(f)) for f in features) / len(features)

    def ib_weight(self, step: int) -> float:
        return self.hparams["ib_lambda"] if step >= self.hparams["ib_penalty_anneal_iters"] else 0.0

    def penalised_loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        features, logits = self.domain_outputs(minibatches)
        nll, penalty = _nll(logits, minibatches), self.ib_term(features)
        return nll + self.ib_weight(step) * penalty, {"nll": nll, "ib_penalty": penalty}


@register_algorithm
class IBIRM(IBERM):
    """IB-IRM: cross-entropy + ``irm_lambda`` x IRM's penalty (1.0 during its anneal) + ``ib_lambda`` x the feature
    variance (0 during its anneal); the optimizer is reset where either switches on. Otherwise as DomainBed."""

    name = "ib_irm"
    title = "Information Bottleneck IRM"
    paper = "Ahuja et al., NeurIPS 2021"
    citation = _IB
    HPARAMS = {**IRM.HPARAMS, **IBERM.HPARAMS}
    RESET_AT = ("irm_penalty_anneal_iters", "ib_penalty_anneal_iters")

    def penalised_loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        irm_weight = self.hparams["irm_lambda"] if step >= self.hparams["irm_penalty_anneal_iters"] else 1.0
        features, logits = self.domain_outputs(minibatches)
        nll, ib = _nll(logits, minibatches), self.ib_term(features)
        irm = self.irm_term(logits, minibatches)
        return (nll + irm_weight * irm + self.ib_weight(step) * ib, {"nll": nll, "irm_penalty": irm, "ib_penalty": ib})


@register_algorithm
class EQRM(AnnealedPenalty):
    """EQRM: minimise the ``eqrm_quantile``-quantile of the per-domain risks, estimated with a Gaussian KDE; the
    mean risk (ERM) during ``eqrm_burnin_iters``, after which the optimizer is reset and steps at ``eqrm_lr``.

    Each domain is a forward pass of its own (as DomainBed); the risks are those of each domain's global batch.
    Differences from DomainBed: DomainBed's search draws a *float* burn-in (``10**U(2.5, 3.5)``), which never
    equals the step, so its sampled runs never reset the optimizer nor switch to ``eqrm_lr``; dgzoo's search
    truncates it to an integer, so they do. ``eqrm_lr`` is scaled by the recipe's lr schedule (module docstring).
    """

    name = "eqrm"
    title = "Empirical Quantile Risk Minimization"
    paper = "Eastwood et al., NeurIPS 2022"
    citation = _EQRM
    HPARAMS = {
        "eqrm_quantile": HParam(
            0.75,
            "quantile of the per-domain risks to minimise, in (0, 1) (a negative value q "
            "stands for 1 - exp(q), DomainBed's branch for quantiles very close to 1)",
            search=Uniform(0.5, 0.99),
        ),
        "eqrm_burnin_iters": HParam(
            2500,
            "ERM steps before the quantile objective (the optimizer's state is reset and eqrm_lr used from then on)",
            minimum=0,
            search=Uniform(2.5, 3.5, base=10, integer=True),
        ),
        "eqrm_lr": HParam(
            1e-6,
            "learning rate after the burn-in (replaces the recipe's lr)",
            minimum=0.0,
            search=Uniform(-7, -5, base=10),
        ),
    }
    RESET_AT = ("eqrm_burnin_iters",)
    LR_SWITCH = ("eqrm_burnin_iters", "eqrm_lr")

    @classmethod
    def check_hparams(cls, hparams: dict[str, Any]) -> None:
        q = hparams["eqrm_quantile"]
        if not (q < 0 or 0 < q < 1):
            raise DGZooError(f"eqrm_quantile={q} must be in (0, 1) (or negative for log(1 - q)); use e.g. 0.75")

    @classmethod
    def check_recipe(cls, hparams: dict[str, Any], recipe: Recipe) -> None:
        if recipe.num_domains < 2:
            raise DGZooError(
                f"eqrm estimates a distribution of per-domain risks and needs at least 2 training "
                f"domains, got {recipe.num_domains}; train on more source domains"
            )

    def penalised_loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        risks = self.global_domain_risks(
            torch.stack([F.cross_entropy(self.predict(x).float(), y) for x, y in minibatches])
        )
        if step < self.hparams["eqrm_burnin_iters"]:
            return risks.mean(), {"mean_risk": risks.mean()}
        return kde_quantile(risks, self.hparams["eqrm_quantile"]), {"mean_risk": risks.mean()}


@register_algorithm
class Fishr(AnnealedPenalty):
    """Fishr: cross-entropy + ``lambda`` x the distance between each domain's variance of per-sample classifier
    gradients (a moving average, ``ema``) and their mean over domains (weight 0 during the anneal).

    Differences from DomainBed: the per-sample gradients of the head's weights and bias are computed with
    ``torch.func`` (``vmap(grad)``) instead of BackPACK, in float32 (outside autocast), the same quantity; the
    variances are over each domain's global batch (per-sample gradients are gathered); the moving averages are a
    ``[domains, head parameters]`` buffer (zeros at start, as DomainBed's first update). During the anneal the
    penalty is computed without a graph (its weight is 0), so the update is ERM's exactly.
    """

    name = "fishr"
    title = "Fishr"
    paper = "Rame et al., ICML 2022"
    citation = _FISHR
    HPARAMS = {
        "lambda": HParam(
            1000.0,
            "weight of the gradient-variance penalty after the anneal (0 before)",
            minimum=0.0,
            search=Uniform(1, 4, base=10),
        ),
        "penalty_anneal_iters": HParam(
            1500,
            "steps before lambda switches on (the optimizer's state is reset at that step)",
            minimum=0,
            search=Uniform(0, 5000, integer=True),
        ),
        "ema": HParam(
            0.95,
            "moving-average factor of the per-domain gradient variances, in [0, 1)",
            minimum=0.0,
            search=Uniform(0.90, 0.99),
        ),
    }
    RESET_AT = ("penalty_anneal_iters",)

    def __init__(self, network: nn.Module, num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(network, num_classes, num_domains, hparams)
        size = sum(p.numel() for p in self.head().parameters() if p.requires_grad)
        self.register_buffer("gradient_variances", torch.zeros(num_domains, size))

    def head(self) -> nn.Module:
        return self.network.get_classifier()

    @classmethod
    def check_hparams(cls, hparams: dict[str, Any]) -> None:
        if not hparams["ema"] < 1:
            raise DGZooError(f"ema={hparams['ema']} must be below 1 (the averages are divided by 1 - ema)")

    @classmethod
    def check_recipe(cls, hparams: dict[str, Any], recipe: Recipe) -> None:
        if recipe.network is not None and not any(
            p.requires_grad for p in recipe.network.get_classifier().parameters()
        ):
            raise DGZooError(
                "fishr penalises per-sample gradients of the classifier head, which has no trainable "
                "parameter in this backbone; use a backbone with a trainable head"
            )

    def penalty(self, features: list[torch.Tensor], minibatches: Minibatches) -> torch.Tensor:
        """Update the moving averages of the per-domain gradient variances; return the Fishr distance."""
        with torch.autocast(features[0].device.type, enabled=False):
            sizes = [len(f) for f in features]
            grads = per_sample_head_gradients(self.head(), torch.cat(features).float(), pooled(minibatches)[1])
            variances = []
            for g in grads.split(sizes):
                g = self.runtime.gather(g)
                variances.append((g - g.mean(0, keepdim=True)).pow(2).mean(0))
            ema = self.hparams["ema"]
            averaged = ema * self.gradient_variances.clone() + (1 - ema) * torch.stack(variances)
            self.gradient_variances.copy_(averaged.detach())
            averaged = averaged / (1 - ema)  # DomainBed's correction: the penalty's gradient does not scale with ema
            return (averaged - averaged.mean(0, keepdim=True)).pow(2).mean(1).mean()

    def penalised_loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        features, logits = self.domain_outputs(minibatches)
        nll = F.cross_entropy(torch.cat(logits), pooled(minibatches)[1])
        if step < self.hparams["penalty_anneal_iters"]:
            with torch.no_grad():  # weight 0: the moving averages advance, the update is ERM's
                penalty = self.penalty([f.detach() for f in features], minibatches)
            return nll, {"nll": nll, "penalty": penalty}
        penalty = self.penalty(features, minibatches)
        return nll + self.hparams["lambda"] * penalty, {"nll": nll, "penalty": penalty}


@register_algorithm
class RDM(AnnealedPenalty):
    """RDM: mean per-domain risk + ``rdm_lambda`` x the MMD between the per-sample losses of the worst domain and
    those of all domains + ``variance_weight`` x their variances (both 0 during the anneal, after which the
    optimizer is reset and steps at ``rdm_lr``).

    The per-sample losses are gathered, so the worst domain, the MMD and the variances are those of the global
    batch. Defaults are DomainBed's for datasets other than PACS, TerraIncognita, OfficeHome and DomainNet (see
    each hyperparameter's help). Differences from DomainBed: ``rdm_lr`` is scaled by the recipe's lr schedule
    (module docstring); its unused moment/KL/JS penalties are not ported.
    """

    name = "rdm"
    title = "Risk Distribution Matching"
    paper = "Nguyen et al., WACV 2024"
    citation = _RDM
    HPARAMS = {
        "rdm_lambda": HParam(
            5.0,
            "weight of the risk-distribution MMD after the anneal (DomainBed: 0.5, "
            "U(0.1, 1) on DomainNet; 5.0, U(1, 10) on PACS and TerraIncognita)",
            minimum=0.0,
            search=Uniform(0.1, 10.0),
        ),
        "rdm_penalty_anneal_iters": HParam(
            1500,
            "ERM steps before the penalties switch on (the optimizer's state "
            "is reset and rdm_lr used from then on; DomainBed: 2400, "
            "int(U(1500, 3000)) on DomainNet)",
            minimum=0,
            search=Uniform(800, 2700, integer=True),
        ),
        "variance_weight": HParam(
            0.004,
            "weight of the risk variances after the anneal (DomainBed: 0.0, not "
            "searched, on TerraIncognita, OfficeHome and DomainNet)",
            minimum=0.0,
            search=Uniform(0.001, 0.007),
        ),
        "rdm_lr": HParam(
            1.5e-5, "learning rate after the anneal (replaces the recipe's lr)", minimum=0.0, search=Uniform(8e-6, 2e-5)
        ),
    }
    RESET_AT = ("rdm_penalty_anneal_iters",)
    LR_SWITCH = ("rdm_penalty_anneal_iters", "rdm_lr")

    def penalised_loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        x, _ = pooled(minibatches)
        logits = self.predict(x).float().split([len(x) for x, _ in minibatches])
        sample_losses = torch.stack(
            [self.runtime.gather(F.cross_entropy(z, y, reduction="none")) for z, (_, y) in zip(logits, minibatches)]
        )  # [K, global batch]
        risks = sample_losses.mean(1)
        erm = risks.mean()
        worst = sample_losses[int(risks.detach().argmax())]
        every = sample_losses.flatten()
        matching = rbf_mmd(worst.unsqueeze(1), every.unsqueeze(1))
        variance = every.var() + worst.var()
        on = step >= self.hparams["rdm_penalty_anneal_iters"]
        total = erm
        if on:
            total = erm + self.hparams["rdm_lambda"] * matching + self.hparams["variance_weight"] * variance
        return total, {"erm_loss": erm, "matching_penalty": matching, "variance_penalty": variance}
