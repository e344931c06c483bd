"""Gradient-Guided Annealing (Ballas & Diou, CVPR 2025) as add-ons that compose with any host algorithm.

Over 500 lines for one job: GGA and GGA-L are one paper's two variants and share the agreement score, the scoring
groups and the extra-pass guard; the file reads against docs/gga.md top to bottom.

``host+gga`` runs, before the host's own update at every step of an early window (default steps 100..200,
inclusive; optionally a second window too, the official ``--extra_search``), the search of the official
``ERM_GGA.update_simulated_annealing`` in its corrected form (the first
release never perturbed the weights and was plain ERM; see docs/gga.md)::

    s0, l0 = score(theta0)            # min pairwise cosine of the per-domain CE gradients; pooled CE
    theta = theta0
    repeat K times:
        theta += U(-rho, rho) on every featurizer tensor        # the classifier head is never perturbed
        s, l = score(theta)
        if s > s_best and l - l_best < tau:                      # strict gain, bounded loss rise
            theta_best, s_best, l_best = theta, s, l
            theta = theta0                                       # an accept restarts the walk at theta0
        # a rejected candidate is kept: the noise accumulates as a random walk around theta0
    theta = theta_best                                           # theta0 when nothing was accepted

``host+gga_l`` is GGA-L, the per-step variant of the paper's corrected version: at every step, noise scaled by
``gamma * (1 - mean pairwise cosine of the per-domain gradients)`` is added to the gradient of every parameter
just before each of the host's optimizer steps (a step pre-hook on its optimizer, so no host can skip it).

Both are add-ons rather than algorithms so that ``equilibrium+gga`` or ``pcgrad+gga_l`` need no new class, as
the paper's "X + GGA" tables require. The agreement score always uses plain per-domain cross-entropy gradients
of every trainable parameter (head included), whatever the host optimises.

Everything random in the search is drawn from generators seeded with (run seed, step), inside a forked RNG, so
the same seed gives the same accepted candidates, every process of a distributed run applies the same
perturbation and takes the same decision, and the host's own random stream (dropout, augmentation) is the same
as without the add-on: ``gga.rho=0`` or ``gga_l.gamma=0`` trains exactly the host.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import DGZooError
from ..hparams import HParam, Uniform
from ..models import featurizer_parameters
from .base import AddOn, Algorithm, FirstAction, Minibatches, Recipe, Schedule, StepContext
from .gradients import (
    GRADIENT_METHODS,
    FlatParams,
    check_mixed_precision,
    check_precision,
    pairwise_cosine,
    per_domain_gradients,
    split_views,
)
from .registry import register_addon
from .runtime import Runtime
from .seeding import derive_seed, private_rng, run_seed, seed_rng

logger = logging.getLogger("dgzoo")

CITATION = """@inproceedings{ballas2025gradient,
  title={Gradient-Guided Annealing for Domain Generalization},
  author={Ballas, Aristotelis and Diou, Christos},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={20558--20568},
  year={2025},
  note={Corrected version: arXiv:2502.20162}
}"""

# Independent random streams derived from the run seed (each mixed with the step).
_GGA_NOISE, _GGA_DROPOUT, _GGAL_NOISE, _GGAL_DROPOUT = range(4)


_SHARED_HPARAMS = {
    "batchnorm": HParam(
        "restore",
        "BatchNorm during the extra forward passes: 'restore' normalises with batch statistics as the "
        "host's training forward does, and puts the running statistics back afterwards so the passes leave no "
        "trace; 'eval' normalises with the running statistics. Identical under --freeze-bn (the paper's setting)",
        choices=("restore", "eval"),
    ),
    "parts": HParam(
        2,
        "single-source training without augmented views: the batch is dealt into this many interleaved parts "
        "whose gradients stand in for the domains' (a dgzoo extension: the paper has no single-source GGA; with "
        "views, as in single-source equilibrium, the views are the domains)",
        minimum=2,
    ),
    "grad_engine": HParam(
        "loop",
        "per-domain gradient path of dgzoo.algorithms.gradients: 'loop' (one backward per domain; fastest "
        "on CPU) or 'vmap' (torch.func, one vectorised backward; needs groups of equal size)",
        choices=GRADIENT_METHODS,
    ),
}


def scoring_groups(minibatches: Minibatches, parts: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The minibatches whose gradients GGA compares: one per source domain.

    Multi-view batches (``x`` of shape ``[B, V, C, H, W]``) are pooled into their domain's batch. With a single
    source domain there is nothing to compare, so its views are the groups when it has several (the
    single-source convention of the per-domain gradient engine), else its batch is dealt into ``parts``
    interleaved groups. Dealing (sample ``i`` to group ``i % parts``) keeps the groups the same on N processes as
    on one whenever each process's share of the batch is a multiple of ``parts``.
    """
    if len(minibatches) == 1:
        x, y = minibatches[0]
        if x.dim() == 5 and x.shape[1] > 1:
            return split_views(minibatches)
        x, y = _pool_views(x, y)
        if len(y) < parts:
            raise DGZooError(
                f"single-source GGA deals each batch into gga.parts={parts} groups, but a process "
                f"holds only {len(y)} images; raise --batch-size or lower the parts hparam"
            )
        return [(x[i::parts], y[i::parts]) for i in range(parts)]
    return [_pool_views(x, y) for x, y in minibatches]


def _pool_views(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() == 5:
        return x.flatten(0, 1), y.repeat_interleave(x.shape[1])
    return x, y


def domain_agreement(
    module: nn.Module,
    groups: Sequence[tuple[torch.Tensor, torch.Tensor]],
    params: FlatParams,
    runtime: Runtime,
    buffer: torch.Tensor | None = None,
    method: str = "loop",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(pairwise cosines [G(G-1)/2], pooled loss)`` of the groups' cross-entropy gradients.

    The pooled loss is the size-weighted mean of the per-group mean losses: exactly the pooled cross-entropy
    the official code recomputes with an extra forward pass, read here from the passes already made.
    ``buffer`` is a reused ``[G, P]`` float32 tensor for the gradients (see :func:`per_domain_gradients`).
    """
    grads, losses = per_domain_gradients(module, groups, params, runtime, out=buffer, method=method)
    i, j = torch.triu_indices(len(groups), len(groups), offset=1, device=grads.device)
    sizes = torch.tensor([float(len(y)) for _, y in groups], device=losses.device)
    return pairwise_cosine(grads)[i, j], (losses * sizes).sum() / sizes.sum()


@contextlib.contextmanager
def extra_passes(module: nn.Module, batchnorm: str) -> Iterator[None]:
    """Make forward passes that must not change the model's state: buffers are saved and restored.

    With ``batchnorm='eval'`` the BatchNorm layers also normalise with their running statistics meanwhile.
    """
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in norms]
    if batchnorm == "eval":
        for m in norms:
            m.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for m, mode in zip(norms, modes):
            m.train(mode)


@register_addon
class GGA(AddOn):
    """Search weight perturbations where the per-domain gradients agree, early in training, then the host's step."""

    name = "gga"
    title = "Gradient-Guided Annealing"
    paper = "Ballas & Diou, CVPR 2025"
    citation = CITATION
    HPARAMS = {
        "start": HParam(
            100,
            "first annealed step (0-based, inclusive); the paper anneals only early in training, "
            "where it argues conflicting domain gradients pick the basin",
            minimum=0,
        ),
        "end": HParam(
            200,
            "last annealed step, inclusive: 100..200 is the paper's 101 annealed steps (the "
            "official CLI default of 150 was not used for the paper)",
            minimum=0,
        ),
        "extra_search": HParam(
            False,
            "also anneal in a second window gga.extra_start..gga.extra_end (inclusive), "
            "as the official --extra_search y; off in every paper command",
        ),
        "extra_start": HParam(
            0,
            "first step of the second annealing window (the official --extra_search_start; "
            "the first README listed 1500 for PACS)",
            minimum=0,
        ),
        "extra_end": HParam(
            0,
            "last step of the second annealing window, inclusive (--extra_search_end; the first "
            "README listed 1550 for PACS)",
            minimum=0,
        ),
        "candidates": HParam(
            250, "perturbations searched per annealed step (hard-coded 250 in the official code)", minimum=1
        ),
        "rho": HParam(
            1e-5,
            "half-width of the uniform noise added to every featurizer weight per candidate, in "
            "absolute units (paper: 1e-5 PACS/OfficeHome/TerraIncognita/DomainNet, 1e-6 VLCS)",
            minimum=0.0,
            search=Uniform(-6, -4, base=10),
        ),
        "tau": HParam(
            0.1,
            "largest rise of the pooled cross-entropy over the last accepted point that an "
            "accepted candidate may have, in CE units (hard-coded 0.1 in the official code)",
        ),
        "fix_dropout": HParam(
            False,
            "score every candidate of a step under the same dropout masks, so that "
            "acceptances reflect the weights rather than lucky masks; off reproduces the "
            "official code, which redraws the masks at every pass",
        ),
        **_SHARED_HPARAMS,
    }

    @classmethod
    def check_hparams(cls, hparams: dict[str, Any]) -> None:
        if hparams["end"] < hparams["start"]:
            raise DGZooError(
                f"gga.end={hparams['end']} is before gga.start={hparams['start']}; the annealing "
                f"window start..end is inclusive, e.g. gga.start=100 gga.end=200"
            )
        if hparams["extra_search"] and hparams["extra_end"] < hparams["extra_start"]:
            raise DGZooError(
                f"gga.extra_end={hparams['extra_end']} is before gga.extra_start="
                f"{hparams['extra_start']}; the second window is inclusive, e.g. gga.extra_search=true "
                f"gga.extra_start=1500 gga.extra_end=1550"
            )

    @classmethod
    def first_action(cls, hparams: dict[str, Any], schedule: Schedule) -> FirstAction | None:
        """The first annealed step (the windows are 0-based; the run's steps are counted from 1)."""
        start = min([hparams["start"], *([hparams["extra_start"]] if hparams["extra_search"] else [])])
        return FirstAction(
            start + 1,
            f"its annealing window starts at step {start + 1} (gga.start={start}, 0-based)",
            "lower gga.start and gga.end",
        )

    @classmethod
    def check_recipe(cls, hparams: dict[str, Any], recipe: Recipe) -> None:
        if recipe.network is not None and not any(True for _ in featurizer_parameters(recipe.network)):
            raise DGZooError(
                "GGA perturbs the featurizer, but the backbone has no trainable parameter outside its "
                "classifier head; unfreeze the backbone"
            )
        # Refused when planned, not when built: fp16's scaler and vmap's autocast (see check_mixed_precision).
        check_mixed_precision(recipe.mixed_precision, hparams["grad_engine"])

    def __init__(self, host: Algorithm, hparams: dict[str, Any], runtime: Runtime):
        super().__init__(host, hparams, runtime)
        self.perturbed = [p for _, p in featurizer_parameters(host.network)]
        self.numels = [p.numel() for p in self.perturbed]
        self.scored = FlatParams.of(host.network)
        self.seed = run_seed(runtime)
        self.history: list[dict[str, float]] = []

    def annealed(self, step: int) -> bool:
        """Whether ``step`` is in the annealing window, or in the second one when ``extra_search`` is on (the
        official trainer's test: either window, both inclusive)."""
        hp = self.hparams
        return hp["start"] <= step <= hp["end"] or (hp["extra_search"] and hp["extra_start"] <= step <= hp["extra_end"])

    def before_update(self, context: StepContext) -> dict[str, float]:
        step = context.step
        if not self.annealed(step):
            return {}
        stats = self.anneal(scoring_groups(context.minibatches, self.hparams["parts"]), step)
        self.history.append({"step": step, **stats})
        if step == self.hparams["end"] or (self.hparams["extra_search"] and step == self.hparams["extra_end"]):
            summary = self.summary()
            logger.info(
                "gga: annealed steps up to %d accepted %d of %d candidates (%d steps with an accept)",
                step,
                summary["accepted"],
                summary["candidates_evaluated"],
                summary["steps_with_accept"],
            )
        return stats

    @torch.no_grad()
    def _perturb(self, generator: torch.Generator, noise: torch.Tensor) -> None:
        """Add U(-rho, rho) to every featurizer weight, drawn into the reused flat buffer ``noise``."""
        noise.uniform_(-self.hparams["rho"], self.hparams["rho"], generator=generator)
        for p, n in zip(self.perturbed, noise.split(self.numels)):
            p.add_(n.view_as(p))

    def _score(self, groups: Sequence[tuple[torch.Tensor, torch.Tensor]], buffer: torch.Tensor) -> tuple[float, float]:
        """(min pairwise cosine, pooled loss) at the current weights, as process 0 computed them.

        The values are already averaged across processes; broadcasting them as well makes every process take
        the same decision even if a reduction rounded differently somewhere.
        """
        cosines, loss = domain_agreement(
            self.host.network, groups, self.scored, self.runtime, buffer, self.hparams["grad_engine"]
        )
        score_loss = self.runtime.broadcast(torch.stack([cosines.min(), loss]).float())
        score, loss_value = score_loss.tolist()
        return score, loss_value

    def anneal(self, groups: Sequence[tuple[torch.Tensor, torch.Tensor]], step: int) -> dict[str, float]:
        """Run the search of one annealed step on ``groups`` and leave the model at the best point found."""
        module, device = self.host.network, self.perturbed[0].device
        tau, fix_dropout = self.hparams["tau"], self.hparams["fix_dropout"]
        theta0 = [p.detach().clone() for p in self.perturbed]
        best: list[torch.Tensor] | None = None
        generator = torch.Generator(device).manual_seed(derive_seed(self.seed, step, _GGA_NOISE))
        # Reused across candidates: fresh 100 MB tensors cost more in page faults than the work done in them.
        noise = torch.empty(sum(self.numels), device=device)
        buffer = self.scored.empty(len(groups))
        dropout_seed = derive_seed(self.seed, step, _GGA_DROPOUT)
        accepted = 0
        with extra_passes(module, self.hparams["batchnorm"]), private_rng(device, dropout_seed):
            score0, loss0 = score_best, loss_best = self._score(groups, buffer)
            for _ in range(self.hparams["candidates"]):
                self._perturb(generator, noise)
                if fix_dropout:
                    seed_rng(device, dropout_seed)
                score, loss = self._score(groups, buffer)
                if score > score_best and loss - loss_best < tau:
                    score_best, loss_best, accepted = score, loss, accepted + 1
                    best = _copy_into(best, self.perturbed)
                    _assign(self.perturbed, theta0)
            _assign(self.perturbed, best if best is not None else theta0)
        shift = 0.0
        if best is not None:
            shift = math.sqrt(sum(float((b - t).double().pow(2).sum()) for b, t in zip(best, theta0)))
        return {
            "accepted": float(accepted),
            "score_before": score0,
            "score_after": score_best,
            "loss_before": loss0,
            "loss_after": loss_best,
            "shift": shift,
        }

    def extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "history": [dict(h) for h in self.history]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state.get("seed", self.seed))
        self.history = [dict(h) for h in state.get("history", [])]

    def summary(self) -> dict[str, Any]:
        """Acceptance statistics of the whole window, and every annealed step's record, for results.json."""
        if not self.history:
            return {}
        n, k = len(self.history), self.hparams["candidates"]
        accepted = [int(h["accepted"]) for h in self.history]
        return {
            "annealed_steps": n,
            "candidates_evaluated": n * k,
            "accepted": sum(accepted),
            "acceptance_rate": sum(accepted) / (n * k),
            "steps_with_accept": sum(a > 0 for a in accepted),
            "mean_score_gain": sum(h["score_after"] - h["score_before"] for h in self.history) / n,
            "mean_loss_change": sum(h["loss_after"] - h["loss_before"] for h in self.history) / n,
            "steps": [dict(h) for h in self.history],
        }

    def diagnostics(self) -> dict[str, float]:
        """Does the search act: the share of candidates accepted, of annealed steps that moved the weights, and
        the mean gain of the min pairwise cosine per annealed step."""
        if not self.history:
            return {}
        summary = self.summary()
        return {
            "annealed_steps": float(summary["annealed_steps"]),
            "acceptance_rate": summary["acceptance_rate"],
            "moved_fraction": summary["steps_with_accept"] / summary["annealed_steps"],
            "mean_agreement_gain": summary["mean_score_gain"],
        }


@register_addon
class GGAL(AddOn):
    """GGA-L: gradient noise scaled by the per-domain gradient disagreement, at every optimizer step."""

    name = "gga_l"
    title = "Gradient-Guided Annealing, per-step noise (GGA-L)"
    paper = "Ballas & Diou, CVPR 2025"
    citation = CITATION
    HPARAMS = {
        "gamma": HParam(
            1e-3,
            "noise intensity: the noise added to every gradient is gamma * (1 - mean pairwise "
            "cosine of the per-domain gradients) * xi (official default; no per-dataset value is "
            "published)",
            minimum=0.0,
            search=Uniform(-4.5, -2.5, base=10),
        ),
        "noise": HParam(
            "gaussian",
            "distribution of xi: 'gaussian' N(0, 1) as the official code; 'uniform' "
            "U(0, 1) as the paper's algorithm box states",
            choices=("gaussian", "uniform"),
        ),
        **_SHARED_HPARAMS,
    }

    @classmethod
    def check_recipe(cls, hparams: dict[str, Any], recipe: Recipe) -> None:
        # per-domain gradients of fp16 passes underflow unscaled; vmap's passes run outside autocast
        check_mixed_precision(recipe.mixed_precision, hparams["grad_engine"])

    def __init__(self, host: Algorithm, hparams: dict[str, Any], runtime: Runtime):
        super().__init__(host, hparams, runtime)
        check_precision(runtime)
        self.scored = FlatParams.of(host.network)
        self.seed = run_seed(runtime)
        self.scale: float | None = None  # set for the duration of one update
        self.generator: torch.Generator | None = None
        self.buffers: dict[str, torch.Tensor] = {}  # the [G, P] gradients and the [P] noise, reused every step
        self.totals = {"steps": 0, "similarity": 0.0, "noise_scale": 0.0}
        host.hook_optimizer_step(self._add_noise)

    def before_update(self, context: StepContext) -> dict[str, float]:
        step, device = context.step, self.scored.tensors[0].device
        groups = scoring_groups(context.minibatches, self.hparams["parts"])
        with (
            extra_passes(self.host.network, self.hparams["batchnorm"]),
            private_rng(device, derive_seed(self.seed, step, _GGAL_DROPOUT)),
        ):
            cosines, _ = domain_agreement(
                self.host.network,
                groups,
                self.scored,
                self.runtime,
                self._buffer("grads", len(groups), self.scored.numel),
                self.hparams["grad_engine"],
            )
        similarity = float(self.runtime.broadcast(cosines.mean().float().reshape(1)).item())
        self.scale = self.hparams["gamma"] * (1.0 - similarity)
        self.generator = torch.Generator(device).manual_seed(derive_seed(self.seed, step, _GGAL_NOISE))
        self.totals["steps"] += 1
        self.totals["similarity"] += similarity
        self.totals["noise_scale"] += self.scale
        return {"similarity": similarity, "noise_scale": self.scale}

    def after_update(self, context: StepContext) -> dict[str, float]:
        self.scale = self.generator = None
        return {}

    def _buffer(self, name: str, *shape: int) -> torch.Tensor:
        if name not in self.buffers or self.buffers[name].shape != shape:
            self.buffers[name] = torch.empty(*shape, device=self.scored.tensors[0].device)
        return self.buffers[name]

    @torch.no_grad()
    def _add_noise(self) -> None:
        """Optimizer pre-step hook: add ``scale * xi`` to every gradient (head included, as the official code),
        identically on every process, before each optimizer step the host takes in this update."""
        if self.scale is None or self.generator is None:
            return
        xi = self._buffer("noise", self.scored.numel)
        if self.hparams["noise"] == "gaussian":
            xi.normal_(generator=self.generator)
        else:
            xi.uniform_(generator=self.generator)
        for p, chunk in zip(self.scored.tensors, self.scored.split(xi)):
            if p.grad is not None:
                p.grad.add_(chunk.to(p.grad.dtype), alpha=self.scale)

    def extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "totals": dict(self.totals)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state.get("seed", self.seed))
        self.totals.update(state.get("totals", {}))

    def summary(self) -> dict[str, Any]:
        steps = self.totals["steps"]
        if not steps:
            return {}
        return {
            "steps": steps,
            "mean_similarity": self.totals["similarity"] / steps,
            "mean_noise_scale": self.totals["noise_scale"] / steps,
        }

    def diagnostics(self) -> dict[str, float]:
        """Does the noise act: its mean scale (0 = the host alone) and the mean agreement that set it."""
        summary = self.summary()
        return {k: float(summary[k]) for k in ("mean_noise_scale", "mean_similarity")} if summary else {}


def _assign(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def _copy_into(buffer: list[torch.Tensor] | None, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copy ``params`` into ``buffer`` (allocated on the first accept only, since most steps accept none)."""
    if buffer is None:
        return [p.detach().clone() for p in params]
    _assign(buffer, params)
    return buffer
