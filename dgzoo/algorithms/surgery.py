"""Gradient surgery baselines: Agr-Sum, Agr-Rand (Mansilla et al., ICCV 2021) and PCGrad (Yu et al., NeurIPS 2020).

Each rule is a pure function of the ``[K, P]`` matrix of per-domain gradients, flattened over the whole model
as in the authors' code (``lucasmansilla/DGvGS``, ``src/gradient.py``), and returns the ``[P]`` gradient the
optimizer steps on. The thin algorithm classes ``agr_sum``, ``agr_rand`` and ``pcgrad`` compute the per-domain
gradients with the engine of :mod:`dgzoo.algorithms.gradients`, apply the rule and take one optimizer step.
With one source domain their domains are K RandAugment views of every image, as the DGE paper runs them.

As in DGvGS the rules *sum* over domains where ERM averages; ``reduction=mean`` divides by K instead, and
``step=matched`` rescales the combined gradient to the norm of the mean per-domain gradient (ERM's), so that a
comparison with ERM at one learning rate compares the rules' directions rather than their step sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..hparams import HParam
from .base import Minibatches
from .gradients import DomainGradientAlgorithm, gram, match_norm, vector_norm
from .registry import register_algorithm

_MANSILLA = """@inproceedings{mansilla2021domain,
  title={Domain Generalization via Gradient Surgery},
  author={Mansilla, Lucas and Echeveste, Rodrigo and Milone, Diego H. and Ferrante, Enzo},
  booktitle={ICCV}, pages={6630--6638}, year={2021}}"""

_PCGRAD = """@inproceedings{yu2020gradient,
  title={Gradient Surgery for Multi-Task Learning},
  author={Yu, Tianhe and Kumar, Saurabh and Gupta, Abhishek and Levine, Sergey and Hausman, Karol and Finn, Chelsea},
  booktitle={NeurIPS}, year={2020}}"""


def agreement_mask(grads: torch.Tensor) -> torch.Tensor:
    """``[P]`` bool: the components whose K signs are all equal *and* non-zero (|sum of signs| = K).

    A zero in any domain counts as disagreement, exactly as DGvGS's sign sum does. (Row by row: a reduction
    over the short domain axis is ten times slower on CPU.)
    """
    positive, negative = grads[0] > 0, grads[0] < 0
    for row in grads[1:]:
        positive &= row > 0
        negative &= row < 0
    return positive | negative


def agr_sum(grads: torch.Tensor, mask: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Agr-Sum: the sum of the K gradients on the components where they agree in sign, zero elsewhere."""
    mask = agreement_mask(grads) if mask is None else mask
    return torch.sum(grads, dim=0, out=out).mul_(mask)


def agr_rand(
    grads: torch.Tensor,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Agr-Rand: Agr-Sum, with every disagreeing component replaced by ``scale * N(0, 1)``.

    ``scale`` is the mean absolute value of the agreeing components of the sum (DGvGS); when no component
    agrees that mean is undefined and the scale is 0, so the result is all zeros. The noise is drawn for the
    disagreeing components in index order, as DGvGS draws it.
    """
    mask = agreement_mask(grads) if mask is None else mask
    combined = agr_sum(grads, mask, out)
    disagree = ~mask
    scale = combined[mask].abs().mean() if bool(mask.any()) else combined.new_zeros(())
    noise = torch.randn(int(disagree.sum()), generator=generator, device=grads.device, dtype=grads.dtype)
    combined[disagree] = noise * scale
    return combined


def pcgrad_coefficients(gram_matrix: torch.Tensor, order: Sequence[int]) -> tuple[torch.Tensor, int]:
    """PCGrad in the span of the gradients: ``(c [K], projections)`` with the PCGrad sum equal to ``c @ grads``.

    For every domain i, ``g_i`` is projected, in ``order`` (skipping i), off each *original* ``g_j`` it
    conflicts with (negative inner product with the running ``g_i``). All inner products come from the Gram
    matrix, so the ``[K, P]`` gradients are read once, when the sum is formed.
    """
    k = gram_matrix.shape[0]
    g = gram_matrix.double().cpu()
    total = torch.zeros(k, dtype=torch.float64)
    projections = 0
    for i in order:
        c = torch.zeros(k, dtype=torch.float64)
        c[i] = 1.0
        for j in order:
            if j == i:
                continue
            inner = float(c @ g[:, j])
            if inner < 0:
                c[j] -= inner / float(g[j, j])
                projections += 1
        total += c
    return total, projections


def pcgrad(
    grads: torch.Tensor, order: Sequence[int] | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """PCGrad: project conflicting components away pairwise, then *sum* (DGvGS; one shuffled order for all i)."""
    order = list(order) if order is not None else torch.randperm(grads.shape[0], generator=generator).tolist()
    coefficients, _ = pcgrad_coefficients(gram(grads), order)
    return coefficients.to(grads) @ grads


class GradientSurgery(DomainGradientAlgorithm):
    """Per-domain gradients, one surgery rule, one optimizer step (DGvGS's ``GradSurgery.train``)."""

    HPARAMS = {
        **DomainGradientAlgorithm.HPARAMS,
        "reduction": HParam(
            "sum",
            "combine K domains by their sum (DGvGS, so the step is about K times an ERM "
            "step at the same lr) or their mean (divide by K); ignored with step=matched",
            choices=("sum", "mean"),
        ),
    }

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.totals: dict[str, float] = {}

    def setup(self) -> None:
        super().setup()
        self.combined = self.flat.empty()  # reused [P] output: a fresh 45 MB vector per step costs page faults
        self.mean = self.flat.empty()  # ERM's gradient, the reference of step=matched and of step_ratio
        # One seed for the rule's randomness, identical on every process, then one generator per step from it.
        seed = torch.randint(0, 2**62, (1,), device=self.runtime.device)
        self.seed = int(self.runtime.broadcast(seed).item())

    def generator(self, step: int, device: torch.device | str = "cpu") -> torch.Generator:
        """The step's random stream: the same on every process and after a resume."""
        return torch.Generator(device=device).manual_seed((self.seed + step) % 2**63)

    def combine(self, grads: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The ``[P]`` gradient to step on, and diagnostics."""
        raise NotImplementedError

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        grads, losses = self.domain_gradients(self.domains(minibatches))
        combined, metrics = self.combine(grads, step)
        mean_norm = vector_norm(torch.mean(grads, dim=0, out=self.mean))
        # How far the faithful rule steps relative to ERM's gradient: about K for a sum, less where components
        # are masked or projected away.
        metrics["step_ratio"] = vector_norm(combined) / max(mean_norm, 1e-30)
        if self.hparams["step"] == "matched":
            match_norm(combined, mean_norm)
        elif self.hparams["reduction"] == "mean":
            combined /= grads.shape[0]
        self.flat.assign_grad(combined)
        self.optimizer.step()
        for key, value in metrics.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        self.totals["steps"] = self.totals.get("steps", 0.0) + 1
        return {"loss": losses.mean().item(), **metrics}

    def summary(self) -> dict[str, Any]:
        """Run means of the per-step diagnostics."""
        steps = self.totals.get("steps", 0.0)
        if not steps:
            return {}
        return {"steps": int(steps), **{f"mean_{k}": v / steps for k, v in self.totals.items() if k != "steps"}}

    def diagnostics(self) -> dict[str, float]:
        """Does the surgery act: the mean fraction of the gradient it masked (Agr-*: components whose signs
        disagree) or of domain pairs it projected (PCGrad), and the faithful step's norm over ERM's gradient's."""
        summary = self.summary()
        if not summary:
            return {}
        out = {"mean_step_ratio": summary["mean_step_ratio"]}
        if "mean_agreement" in summary:
            out["masked_fraction"] = 1.0 - summary["mean_agreement"]
        if "mean_conflict_rate" in summary:
            out["projected_fraction"] = summary["mean_conflict_rate"]
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "totals": dict(self.totals)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = state.get("seed", self.seed)
        self.totals = dict(state.get("totals", {}))


@register_algorithm
class AgrSum(GradientSurgery):
    """Sum the per-domain gradients where all agree in sign; zero the rest."""

    name = "agr_sum"
    title = "Agr-Sum (Domain Generalization via Gradient Surgery)"
    paper = "Mansilla et al., ICCV 2021"
    citation = _MANSILLA

    def combine(self, grads: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        mask = agreement_mask(grads)
        return agr_sum(grads, mask, self.combined), {"agreement": _fraction(mask)}


@register_algorithm
class AgrRand(GradientSurgery):
    """Agr-Sum with the disagreeing components filled with scaled Gaussian noise."""

    name = "agr_rand"
    title = "Agr-Rand (Domain Generalization via Gradient Surgery)"
    paper = "Mansilla et al., ICCV 2021"
    citation = _MANSILLA

    def combine(self, grads: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        mask = agreement_mask(grads)
        return agr_rand(grads, self.generator(step, grads.device), mask, self.combined), {"agreement": _fraction(mask)}


@register_algorithm
class PCGrad(GradientSurgery):
    """Project each domain's gradient off the others it conflicts with, then sum."""

    name = "pcgrad"
    title = "PCGrad (Gradient Surgery for Multi-Task Learning)"
    paper = "Yu et al., NeurIPS 2020"
    citation = _PCGRAD

    def combine(self, grads: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        k = grads.shape[0]
        order = torch.randperm(k, generator=self.generator(step)).tolist()
        coefficients, projections = pcgrad_coefficients(gram(grads), order)
        combined = torch.mv(grads.T, coefficients.to(grads), out=self.combined)
        return combined, {"conflict_rate": projections / (k * (k - 1))}


def _fraction(mask: torch.Tensor) -> float:
    return int(mask.count_nonzero()) / mask.numel()
