"""Sharpness-aware minimisation as full-update hosts: SAM (Foret et al., ICLR 2021), GSAM (Zhuang et al., ICLR
2022) and SAGM (Wang et al., CVPR 2023), each on ERM's pooled cross-entropy.

Every step makes two forward/backward passes on the same pooled batch::

    g   = grad L(w)                                  # first pass
    e   = scale * g                                  # SAM, GSAM: rho / |g|;  SAGM: rho / |g| - alpha
    g_p = grad L(w + e)                              # second pass, at the perturbed weights
    w   = the weights before the perturbation, restored exactly
    d   = SAM: g_p;  GSAM: g_p - alpha * (g - <g, g_p> / |g_p|^2 * g_p);  SAGM: (g + g_p) / 2
    optimizer.step() with d as the gradient

``|g|`` is the norm over every trainable parameter of the main optimizer. Both passes run through the prepared
module, so under DDP the perturbation is built from the global batch's gradient and N processes equal one (the
official GSAM/SAGM optimizers perturb with each process's own gradient under ``no_sync``). The combined gradient
is what the optimizer steps with, so add-ons that hook the optimizer step (``+gga_l``'s noise, gradient clipping)
act on it, once per step; ``+gga`` moves the weights before the step and ``+swad``/``+ema`` average after it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..hparams import Choice, HParam
from .base import Metrics, Minibatches, Recipe, UpdateHost
from .erm import pooled
from .gradients import check_mixed_precision
from .registry import register_algorithm

EPS = 1e-12  # the official optimizers' perturb_eps

SAM_CITATION = """@inproceedings{foret2021sharpness,
  title={Sharpness-aware Minimization for Efficiently Improving Generalization},
  author={Foret, Pierre and Kleiner, Ariel and Mobahi, Hossein and Neyshabur, Behnam},
  booktitle={International Conference on Learning Representations (ICLR)},
  year={2021}
}"""
GSAM_CITATION = """@inproceedings{zhuang2022surrogate,
  title={Surrogate Gap Minimization Improves Sharpness-Aware Training},
  author={Zhuang, Juntang and Gong, Boqing and Yuan, Liangzhe and Cui, Yin and Adam, Hartwig and Dvornek, Nicha and
          Tatikonda, Sekhar and Duncan, James and Liu, Ting},
  booktitle={International Conference on Learning Representations (ICLR)},
  year={2022}
}"""
SAGM_CITATION = """@inproceedings{wang2023sharpness,
  title={Sharpness-Aware Gradient Matching for Domain Generalization},
  author={Wang, Pengfei and Zhang, Zhaoxiang and Lei, Zhen and Zhang, Lei},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={3769--3778},
  year={2023}
}"""

_RHO = HParam(
    0.05,
    "radius of the weight perturbation, in absolute units of the gradient direction (0.05 in the "
    "SWAD/SAGM DomainBed code; searched as SAGM's registry)",
    minimum=0.0,
    search=Choice((0.01, 0.02, 0.05, 0.1)),
)


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of a list of tensors taken as one vector."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


class SharpnessAware(UpdateHost):
    """Base of the two-pass hosts: subclasses give the perturbation scale and the combined gradient."""

    # Whether BatchNorm running statistics move in the second pass: SWAD's DomainBed SAM lets them; the official
    # GSAM and SAGM optimizers set BatchNorm momentum to 0 for it, which keeps the running mean and variance but
    # still counts the batch in ``num_batches_tracked`` (so the counter is kept moving here too).
    SECOND_PASS_UPDATES_BN = False

    @classmethod
    def check_recipe(cls, hparams: dict[str, Any], recipe: Recipe) -> None:
        check_mixed_precision(recipe.mixed_precision)  # the gradient norm must be of unscaled gradients

    def cross_entropy(self, minibatches: Minibatches) -> torch.Tensor:
        x, y = pooled(minibatches)
        return F.cross_entropy(self.call("predict", x), y)

    def scale(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """The factor of the perturbation ``e = scale * g``."""
        return self.hparams["rho"] / (grad_norm + EPS)

    def combine(self, grads: list[torch.Tensor], perturbed: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gradient the optimizer steps with, from the first pass's ``grads`` and the second's ``perturbed``."""
        return perturbed

    def update(self, minibatches: Minibatches, step: int) -> Metrics:
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.cross_entropy(minibatches)
        self.runtime.backward(loss)
        used = [p for p in params if p.grad is not None]
        grads = [p.grad.detach().clone() for p in used]
        weights = [p.detach().clone() for p in used]
        scale = self.scale(global_norm(grads))
        with torch.no_grad():
            for p, g in zip(used, grads):
                p.add_(g * scale.to(g.dtype))
        self.optimizer.zero_grad(set_to_none=True)
        buffers = (
            None
            if self.SECOND_PASS_UPDATES_BN
            else [(b, b.detach().clone()) for b in self.network.buffers() if b.is_floating_point()]
        )
        perturbed_loss = self.cross_entropy(minibatches)
        self.runtime.backward(perturbed_loss)
        with torch.no_grad():
            for b, saved in buffers or []:
                b.copy_(saved)
            for p, w in zip(used, weights):  # restore exactly (the official code subtracts e again)
                p.copy_(w)
            perturbed = [p.grad if p.grad is not None else torch.zeros_like(p) for p in used]
            for p, d in zip(used, self.combine(grads, perturbed)):
                p.grad = d
        self.optimizer.step()
        return {"loss": loss.detach(), "perturbed_loss": perturbed_loss.detach()}


@register_algorithm
class SAM(SharpnessAware):
    """Step with the gradient at the worst point of a rho-ball around the weights (first-order)."""

    name = "sam"
    title = "Sharpness-Aware Minimization"
    paper = "Foret et al., ICLR 2021"
    citation = SAM_CITATION
    HPARAMS = {"rho": _RHO}
    SECOND_PASS_UPDATES_BN = True


@register_algorithm
class GSAM(SharpnessAware):
    """SAM's step minus ``alpha`` times the part of the plain gradient orthogonal to it (the surrogate gap)."""

    name = "gsam"
    title = "Surrogate Gap Guided Sharpness-Aware Minimization"
    paper = "Zhuang et al., ICLR 2022"
    citation = GSAM_CITATION
    HPARAMS = {
        "rho": _RHO,
        "alpha": HParam(
            0.4,
            "weight of the ascent along the plain gradient's component orthogonal to the perturbed "
            "one (official default 0.4)",
            minimum=0.0,
            search=Choice((0.01, 0.02, 0.05, 0.1, 0.2, 0.4)),
        ),
    }

    def combine(self, grads: list[torch.Tensor], perturbed: list[torch.Tensor]) -> list[torch.Tensor]:
        inner = sum((g * p).sum() for g, p in zip(grads, perturbed))
        norm, perturbed_norm = global_norm(grads), global_norm(perturbed)
        cosine = inner / (perturbed_norm * norm + EPS)
        alpha = self.hparams["alpha"]
        # vertical = g - (|g| cos / |g_p|) g_p: the plain gradient minus its projection on the perturbed one
        return [p - alpha * (g - cosine * norm * p / (perturbed_norm + EPS)) for g, p in zip(grads, perturbed)]


@register_algorithm
class SAGM(SharpnessAware):
    """The mean of the gradients at the weights and at a perturbation shrunk by ``alpha`` along the gradient."""

    name = "sagm"
    title = "Sharpness-Aware Gradient Matching"
    paper = "Wang et al., CVPR 2023"
    citation = SAGM_CITATION
    HPARAMS = {
        "rho": _RHO,
        "alpha": HParam(
            0.001,
            "step back along the gradient in the perturbation: e = (rho / |g| - alpha) g "
            "(official default 0.001; its search, kept, draws from 0.01-0.1)",
            minimum=0.0,
            search=Choice((0.01, 0.02, 0.05, 0.1)),
        ),
    }

    def scale(self, grad_norm: torch.Tensor) -> torch.Tensor:
        return self.hparams["rho"] / (grad_norm + EPS) - self.hparams["alpha"]

    def combine(self, grads: list[torch.Tensor], perturbed: list[torch.Tensor]) -> list[torch.Tensor]:
        return [0.5 * g + 0.5 * p for g, p in zip(grads, perturbed)]
