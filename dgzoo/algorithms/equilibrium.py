"""Domain Gradient Equilibrium (DGE; Zhang, Li & Shin, ACM MM 2024), for single- and multi-source DG.

One training iteration, following the paper's Sections 3.1-3.3 and Algorithm 1:

1. per-domain gradients ``g_k`` (single-source: the domains are K RandAugment views of every image);
2. decomposition (Eq. 3-4): the domain-invariant part is the mean ``g_inv = mean_k g_k``, the domain-specific
   parts are the residuals ``s_k = g_k - g_inv``;
3. adjustment (Eq. 5): when ``cos(s_i, s_j) > alpha``, ``s_i`` is projected onto the normal plane of ``s_j``;
4. reweighting (Eq. 7-8): projected gradient descent on ``w`` in ``[0, 1]^K`` for ``min ||sum_k w_k s~_k||^2``;
5. update (Eq. 9): ``d_k = g_k - w_k s~_k``, applied sequentially, one optimizer step per domain.

Every step after the first is a linear combination of the K rows of the residual matrix, so steps 3-5 run
on K x K matrices (the Gram matrix of the residuals) and the ``[K, P]`` gradients are read only to form the
Gram matrix and each ``d_k``. Section 1.5 of ``research/equilibrium_sure.md`` derives what the implementation
must show: with no projection and ``w = 1`` every ``d_k`` is the plain mean gradient, and with a converged
reweighting ``sum_k d_k = sum_k g_k``, so the method differs from averaging only through the optimizer's
non-linearity, an unconverged reweighting, the ``residual=original`` reading, or ``updates=recompute``.
The diagnostics logged every step (projection rate, w, residual norm, distance of the summed update from the
mean gradient) show which of these is at work in a run.

The choices the paper leaves open are hyperparameters whose defaults are the research note's proposals:
``pgd_init``, ``pgd_lr``, ``pgd_steps``, ``pgd_tol``, ``project_test``, ``residual`` and ``updates``. Three
readings where dgzoo's default differs from the paper's text are named too (docs/equilibrium.md): ``weights``
(Algorithm 1 initialises w once: ``persistent``), ``domain_loss`` (Eq. 1 sums over the M samples: ``sum``) and
``domains`` (Algorithm 1 builds the K domains from augmentations of the N-source data: ``views``).
``step=matched`` takes one optimizer step on ``mean_k d_k`` at the norm of ERM's gradient instead of K steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..hparams import Choice, HParam
from .base import Minibatches
from .gradients import DomainGradientAlgorithm, gram, match_norm, vector_norm
from .registry import register_algorithm

_CITATION = """@inproceedings{zhang2024embracing,
  title={Embracing Domain Gradient Conflicts: Domain Generalization Using Domain Gradient Equilibrium},
  author={Zhang, Zuyu and Li, Yan and Shin, Byung-Seok},
  booktitle={Proceedings of the 32nd ACM International Conference on Multimedia}, pages={5594--5603},
  year={2024}, doi={10.1145/3664647.3681141}}"""


def adjust_residuals(
    residual_gram: torch.Tensor, alpha: float, test: str = "original"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 in coefficient form: ``(A [K, K], fired [K, K])`` with the adjusted residuals ``s~ = A @ S``.

    For each i, and each j != i in index order, ``s~_i`` loses its component along the *unadjusted* ``s_j``
    when the cosine exceeds ``alpha`` (strictly). ``test`` says whose cosine is compared: ``"original"``
    (``cos(s_i, s_j)``, the research note's reading) or ``"adjusted"`` (the running ``s~_i``, as PCGrad tests).
    ``residual_gram`` is ``S @ S.T``; zero residuals never trigger a projection.
    """
    g = residual_gram.double().cpu()
    k = g.shape[0]
    coefficients = torch.eye(k, dtype=torch.float64)
    fired = torch.zeros(k, k, dtype=torch.bool)
    for i in range(k):
        for j in range(k):
            if i == j or g[j, j] <= 0:
                continue
            a = coefficients[i]
            if test == "original":
                norm_i, inner_test = g[i, i], g[i, j]
            else:
                norm_i, inner_test = a @ g @ a, a @ g[:, j]
            if norm_i <= 0 or inner_test / math.sqrt(float(norm_i) * float(g[j, j])) <= alpha:
                continue
            coefficients[i, j] -= (a @ g[:, j]) / g[j, j]
            fired[i, j] = True
    return coefficients, fired


def reweight(
    adjusted_gram: torch.Tensor, init: float | torch.Tensor = 1.0, steps: int = 100, lr: float = 1.0, tol: float = 1e-3
) -> tuple[torch.Tensor, int]:
    """Eq. 8: projected gradient descent on ``F(w) = w^T G w = ||sum_k w_k s~_k||^2`` over ``w`` in ``[0, 1]^K``.

    Starts from ``w = init`` (a number for every domain, or the ``[K]`` weights of the previous iteration); the step is ``lr / (2 lambda_max(G))`` (``lr=1`` is 1/L for this quadratic:
    scale-free and never overshooting); stops after ``steps`` updates, once ``sqrt(F(w)) <= tol *
    ||sum_k s~_k||``, or at a fixed point. Returns ``(w [K] float64, updates taken)``.
    """
    g = adjusted_gram.double().cpu()
    w = (
        torch.as_tensor(init, dtype=torch.float64).clone()
        if isinstance(init, torch.Tensor)
        else torch.full((g.shape[0],), float(init), dtype=torch.float64)
    ).clamp_(0.0, 1.0)
    largest = float(torch.linalg.eigvalsh(g).max())
    if largest <= 0:  # all adjusted residuals are zero: every w is optimal
        return w, 0
    step_size = lr / (2.0 * largest)
    target = tol * math.sqrt(max(float(g.sum()), 0.0))
    for t in range(steps):
        if math.sqrt(max(float(w @ g @ w), 0.0)) <= target:
            return w, t
        updated = (w - step_size * 2.0 * (g @ w)).clamp_(0.0, 1.0)
        if torch.equal(updated, w):
            return w, t
        w = updated
    return w, steps


@dataclass
class EquilibriumStep:
    """What one iteration decided: ``d_k = g_inv + M[k] @ S`` for the residual matrix ``S``, plus diagnostics."""

    combination: torch.Tensor  # M [K, K], float64
    weights: torch.Tensor  # w [K]
    fired: torch.Tensor  # [K, K] bool, projections that fired
    pgd_updates: int
    residual_norm: float  # ||sum_k w_k s~_k||
    specific_norm: float  # mean_k ||s_k||
    max_cosine: float  # max over pairs of cos(s_i, s_j): how close the residuals came to the threshold alpha
    shift: float  # ||mean_k d_k - g_inv||, the summed update's distance from the plain mean gradient (unnormalised)

    @property
    def projection_rate(self) -> float:
        k = self.fired.shape[0]
        return float(self.fired.sum()) / (k * (k - 1))


def equilibrium_step(
    residual_gram: torch.Tensor,
    alpha: float = 0.5,
    adjust: bool = True,
    reweight_weights: bool = True,
    residual: str = "adjusted",
    project_test: str = "original",
    pgd_init: float | torch.Tensor = 1.0,
    pgd_steps: int = 100,
    pgd_lr: float = 1.0,
    pgd_tol: float = 1e-3,
) -> EquilibriumStep:
    """Steps 3-5 on the Gram matrix ``S @ S.T`` of the residuals: the per-domain update coefficients.

    ``adjust=False`` skips the projection (``s~ = s``), ``reweight_weights=False`` fixes ``w = 1`` (the paper's
    Table 6 ablations; both off is plain gradient averaging). ``pgd_init`` may be the previous iteration's ``w``
    (``weights='persistent'``, Algorithm 1 initialising w once, before its loop). ``residual`` is the reading of Eq. 9:
    ``"adjusted"`` subtracts ``w_k s~_k`` (the paper's symbols), ``"original"`` subtracts ``w_k s_k``.
    """
    k = residual_gram.shape[0]
    # The residuals sum to zero by construction; re-centring their Gram matrix keeps float32 rounding of S from
    # breaking that, so that with no projection w = 1 stays exactly optimal.
    center = torch.eye(k, dtype=torch.float64) - 1.0 / k
    g = center @ residual_gram.double().cpu() @ center
    if adjust:
        coefficients, fired = adjust_residuals(g, alpha, project_test)
    else:
        coefficients, fired = torch.eye(k, dtype=torch.float64), torch.zeros(k, k, dtype=torch.bool)
    adjusted_gram = coefficients @ g @ coefficients.T
    if reweight_weights:
        w, updates = reweight(adjusted_gram, pgd_init, pgd_steps, pgd_lr, pgd_tol)
    else:
        w, updates = torch.ones(k, dtype=torch.float64), 0
    subtracted = coefficients if residual == "adjusted" else torch.eye(k, dtype=torch.float64)
    combination = torch.eye(k, dtype=torch.float64) - w[:, None] * subtracted
    mean_coefficients = combination.mean(dim=0)
    norms = g.diagonal().clamp_min(0).sqrt()
    cosines = g / (norms[:, None] * norms[None, :]).clamp_min(1e-300)
    return EquilibriumStep(
        combination=combination,
        weights=w,
        fired=fired,
        pgd_updates=updates,
        residual_norm=math.sqrt(max(float(w @ adjusted_gram @ w), 0.0)),
        specific_norm=float(norms.mean()),
        max_cosine=float(cosines[~torch.eye(k, dtype=torch.bool)].max()),
        shift=math.sqrt(max(float(mean_coefficients @ g @ mean_coefficients), 0.0)),
    )


def equilibrium_updates(grads: torch.Tensor, **options: Any) -> tuple[torch.Tensor, EquilibriumStep]:
    """The K per-domain updates ``d_k`` as a ``[K, P]`` matrix (a readable reference; the algorithm streams them)."""
    mean = grads.mean(dim=0)
    residuals = grads - mean
    decided = equilibrium_step(gram(residuals), **options)
    return mean + decided.combination.to(grads) @ residuals, decided


@register_algorithm
class Equilibrium(DomainGradientAlgorithm):
    """Domain Gradient Equilibrium: decompose, adjust, reweight, then step once per domain."""

    name = "equilibrium"
    title = "Domain Gradient Equilibrium"
    paper = "Zhang et al., ACM MM 2024"
    citation = _CITATION
    HPARAMS = {
        **DomainGradientAlgorithm.HPARAMS,
        # The values the paper ablates: the number of RandAugment operations and the cosine threshold.
        "random_ops": replace(DomainGradientAlgorithm.HPARAMS["random_ops"], search=Choice((1, 2, 3))),
        "alpha": HParam(
            0.5,
            "cosine threshold: a domain-specific gradient is projected off another whose cosine "
            "with it is strictly above alpha (the paper: 0.5)",
            minimum=-1.0,
            maximum=1.0,
            search=Choice((0.3, 0.5, 0.7)),
        ),
        "adjust": HParam(
            True, "project similar domain-specific gradients apart (Eq. 5); false is the paper's 'Grad Adjust' ablation"
        ),
        "reweight": HParam(
            True,
            "reweight domain-specific gradients toward equilibrium (Eq. 7-8); false fixes "
            "w = 1 (the 'Grad Weight' ablation; with adjust=false: plain gradient averaging)",
        ),
        "project_test": HParam(
            "original",
            "whose cosine decides a projection: 'original' (cos(s_i, s_j), the "
            "research note's reading) or 'adjusted' (the running s~_i, as PCGrad) "
            "[assumption: the paper is ambiguous]",
            choices=("original", "adjusted"),
        ),
        "pgd_init": HParam(
            1.0,
            "initial weight of every domain [assumption: w = 1 is already the equilibrium when "
            "no projection fired; w = 0 would never move]",
            minimum=0.0,
            maximum=1.0,
        ),
        "pgd_lr": HParam(
            1.0,
            "PGD step in units of 1/(2 lambda_max(G)) [assumption: scale-free, cannot overshoot "
            "the quadratic; the paper gives no value]; PGD diverges from 2 on",
            minimum=0.0,
            maximum=2.0,
        ),
        "pgd_steps": HParam(100, "maximum PGD iterations [assumption; small values leave w unconverged]", minimum=0),
        "pgd_tol": HParam(1e-3, "stop PGD once ||sum w_k s~_k|| <= pgd_tol * ||sum s~_k|| [assumption]", minimum=0.0),
        "residual": HParam(
            "adjusted",
            "Eq. 9 reading: d_k = g_k - w_k s~_k ('adjusted', the paper's symbols) or "
            "g_k - w_k s_k ('original') [assumption]",
            choices=("adjusted", "original"),
        ),
        "weights": HParam(
            "reset",
            "'reset': PGD starts from w = pgd_init at every iteration; 'persistent': from "
            "the previous iteration's w (Algorithm 1 initialises w once, before its loop) "
            "[a reading: docs/equilibrium.md]",
            choices=("reset", "persistent"),
        ),
        "domain_loss": HParam(
            "mean",
            "each domain's loss L_k: the 'mean' cross-entropy of its M samples (as ERM's "
            "loss) or their 'sum' (Eq. 1 as written: M times the gradient at one lr) "
            "[a reading: docs/equilibrium.md]",
            choices=("mean", "sum"),
        ),
        "updates": HParam(
            "sequential",
            "'sequential': K optimizer steps per iteration, one per domain, all "
            "computed at the iteration's weights (the literal reading); 'recompute': "
            "recompute the gradients before each domain's step (K times the cost); "
            "'mean': one step on the mean of the d_k [assumption: the paper says "
            "'sequentially' only]",
            choices=("sequential", "recompute", "mean"),
        ),
    }

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.totals: dict[str, float] = {}
        self.weights: torch.Tensor | None = None  # the last iteration's w (weights=persistent)
        self.erm_norm = 0.0  # this iteration's ||mean_k g_k|| over the mean-loss gradients (step=matched)

    def setup(self) -> None:
        super().setup()
        self.mean = self.flat.empty()
        self.update_vector = self.flat.empty()

    def decide(
        self, domains: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, EquilibriumStep, dict[str, float]]:
        """Gradients at the current weights -> ``(g_inv [P], S [K, P], decision, metrics)``."""
        grads, losses = self.domain_gradients(domains)
        h = self.hparams
        torch.mean(grads, dim=0, out=self.mean)
        self.erm_norm = vector_norm(self.mean)  # ERM's gradient: the mean of the per-domain mean-loss gradients
        if h["domain_loss"] == "sum":  # gradient of the summed loss = M_k x that of the mean (M_k: global count)
            for k, (_, y) in enumerate(domains):
                grads[k].mul_(len(y) * self.runtime.num_processes)
            torch.mean(grads, dim=0, out=self.mean)
        residuals = grads.sub_(self.mean)  # in place: the buffer now holds S
        init: float | torch.Tensor = h["pgd_init"]
        if h["weights"] == "persistent" and self.weights is not None and len(self.weights) == len(domains):
            init = self.weights
        decided = equilibrium_step(
            gram(residuals),
            h["alpha"],
            h["adjust"],
            h["reweight"],
            h["residual"],
            h["project_test"],
            init,
            h["pgd_steps"],
            h["pgd_lr"],
            h["pgd_tol"],
        )
        self.weights = decided.weights
        mean_norm = float(self.mean.norm())
        metrics = {
            "loss": losses.mean().item(),
            "projection_rate": decided.projection_rate,
            "projected": float(decided.fired.any()),
            "max_cosine": decided.max_cosine,
            "residual_norm": decided.residual_norm,
            "specific_norm": decided.specific_norm,
            "update_vs_mean": decided.shift / max(mean_norm, 1e-12),
            "pgd_iters": float(decided.pgd_updates),
            "w_deviation": float((decided.weights - 1).abs().mean()),
            **{f"w_{k}": float(w) for k, w in enumerate(decided.weights)},
        }
        return self.mean, residuals, decided, metrics

    def apply_update(self, mean: torch.Tensor, residuals: torch.Tensor, coefficients: torch.Tensor) -> None:
        """One optimizer step on ``g_inv + coefficients @ S``."""
        if bool(coefficients.any()):
            self.flat.assign_grad(torch.addmv(mean, residuals.T, coefficients.to(residuals), out=self.update_vector))
        else:  # the common case of no projection and w = 1: d_k is the mean gradient itself
            self.flat.assign_grad(mean)
        self.optimizer.step()

    def matched(self, mean: torch.Tensor, residuals: torch.Tensor, coefficients: torch.Tensor) -> None:
        """step=matched: one optimizer step on ``mean_k d_k`` at the norm of ``g_inv`` (ERM's gradient)."""
        direction = torch.addmv(mean, residuals.T, coefficients.to(residuals), out=self.update_vector)
        match_norm(direction, self.erm_norm)
        self.flat.assign_grad(direction)
        self.optimizer.step()

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        domains = self.domains(minibatches)
        mean, residuals, decided, metrics = self.decide(domains)
        if self.hparams["step"] == "matched":
            self.matched(mean, residuals, decided.combination.mean(dim=0))
        elif self.hparams["updates"] == "mean":
            self.apply_update(mean, residuals, decided.combination.mean(dim=0))
        elif self.hparams["updates"] == "sequential":
            for k in range(len(domains)):
                self.apply_update(mean, residuals, decided.combination[k])
        else:
            recomputed = [metrics]
            self.apply_update(mean, residuals, decided.combination[0])
            for k in range(1, len(domains)):
                mean, residuals, decided, metrics = self.decide(domains)
                self.apply_update(mean, residuals, decided.combination[k])
                recomputed.append(metrics)
            metrics = {key: sum(m[key] for m in recomputed) / len(recomputed) for key in recomputed[0]}
        for key, value in metrics.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        self.totals["steps"] = self.totals.get("steps", 0.0) + 1
        return metrics

    def summary(self) -> dict[str, Any]:
        """Run means of the per-step diagnostics: did projections fire, where did w go, how far from averaging."""
        steps = self.totals.get("steps", 0.0)
        if not steps:
            return {}
        means = {key: value / steps for key, value in self.totals.items() if key not in ("steps", "loss")}
        return {"steps": int(steps), "projected_steps": means.pop("projected"), **means}

    def diagnostics(self) -> dict[str, float]:
        """Does DGE act: how often projections fired, how far w moved from 1, how far the summed update is from
        the plain mean gradient (0 = gradient averaging), and optimizer steps per iteration."""
        summary = self.summary()
        if not summary:
            return {}
        steps = 1 if self.hparams["step"] == "matched" or self.hparams["updates"] == "mean" else self.num_gradients
        return {
            "projection_rate": summary["projection_rate"],
            "w_deviation": summary.get("w_deviation", 0.0),
            "update_vs_mean": summary["update_vs_mean"],
            "optimizer_steps_per_iteration": float(steps),
        }

    def extra_state(self) -> dict[str, Any]:
        return {
            "totals": dict(self.totals),
            "weights": None if self.weights is None else [float(w) for w in self.weights],
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.totals = dict(state.get("totals", {}))
        weights = state.get("weights")
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)
