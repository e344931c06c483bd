"""Weight averaging as add-ons: SWAD (Cha et al., NeurIPS 2021) and an exponential moving average (EMA).

Both keep a copy of the host's timm network holding the averaged weights and return it from
:meth:`~dgzoo.algorithms.base.AddOn.evaluated_network`, so the average is what the engine evaluates, selects and
exports (plain timm keys: the copy is the same architecture). The host trains its own weights unchanged.

``host+swad`` follows the official ``LossValley`` rule of khanrc/swad: the host's weights after every step are
averaged densely into a *segment* that ends at each evaluation, where the online model's source-validation loss
is read (:meth:`SWAD.on_evaluate`). Training has *converged* at the first evaluation where the oldest of the last
``n_converge`` segments has the lowest loss; the threshold is then ``(1 + tolerance_ratio)`` times their mean
loss, and segments join the average while the smallest loss of the ``n_tolerance`` segments from them on stays
under it: a segment is admitted ``n_tolerance - 1`` evaluations late, once the losses after it are known, and the
valley is *dead* (the average is final) once all ``n_tolerance`` are above. The segments averaged, and how often
each counts, are the official code's on every loss sequence (its two queues admit some segments twice or more;
``tests/data/swad_lossvalley_reference.json`` holds its weights on 31 sequences). BatchNorm statistics of the
average are recomputed on source training batches (``bn_steps`` of them), as SWAD's ``update_bn``. See
docs/averaging_and_sharpness.md for the rule step by step and where dgzoo differs.

``host+ema`` keeps ``average = d * average + (1 - d) * weights`` after every step, over parameters and
floating-point buffers alike, with timm's ``ModelEmaV3`` warm-up of the decay by default: at the ``k``-th update
``d = min(decay, 1 - k'^-warmup_power)`` with ``k' = 1 + (k - 1) / warmup_gamma`` (0 at the first update, which
copies the weights), so a run shorter than the decay's horizon averages its own weights rather than keeping its
initial ones. ``ema.warmup=false`` is the constant decay of timm's ``ModelEmaV2`` (dgzoo's behaviour up to 0.2.0),
where ``ema.decay=0`` is exactly the host.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..hparams import HParam
from ..models.backbones import batchnorm_frozen
from .base import AddOn, Algorithm, EvalContext, FirstAction, Schedule, StepContext
from .registry import register_addon
from .runtime import Runtime

logger = logging.getLogger("dgzoo")

SWAD_CITATION = """@inproceedings{cha2021swad,
  title={SWAD: Domain Generalization by Seeking Flat Minima},
  author={Cha, Junbum and Chun, Sanghyuk and Lee, Kyungjae and Cho, Han-Cheol and Park, Seunghyun and Lee, Yunsung
          and Park, Sungrae},
  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
  year={2021}
}"""


def averaging_copy(network: nn.Module) -> nn.Module:
    """A copy of ``network`` to hold averaged weights: no gradients, evaluation mode, same timm keys."""
    average = copy.deepcopy(network)
    for p in average.parameters():
        p.requires_grad_(False)
    return average.eval()


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Reset every BatchNorm layer's running statistics and re-estimate them as the plain mean over ``batches``
    (momentum None), in training mode: SWAD's ``update_bn``. Returns the number of batches seen."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return seen


@dataclass
class Segment:
    """The dense average of the host's weights over the steps ``start..end`` (1-based, inclusive), and the online
    model's source-validation loss at its end."""

    params: list[torch.Tensor]
    start: int
    end: int
    loss: float

    def state(self) -> dict[str, Any]:
        return {"params": [p.clone() for p in self.params], "start": self.start, "end": self.end, "loss": self.loss}

    @classmethod
    def of(cls, state: dict[str, Any], device: torch.device) -> Segment:
        return cls(
            [p.to(device) for p in state["params"]], int(state["start"]), int(state["end"]), float(state["loss"])
        )


class RunningMean:
    """An equal-weight running mean of lists of tensors (SWAD's ``AveragedModel.update_parameters``)."""

    def __init__(self, params: list[torch.Tensor] | None = None, count: int = 0):
        self.params, self.count = params, count

    @torch.no_grad()
    def add(self, values: Iterable[torch.Tensor]) -> None:
        values = [v.detach() for v in values]
        if self.params is None or self.count == 0:
            self.params = [v.clone() for v in values]
        else:
            for mean, v in zip(self.params, values):
                mean.add_(v - mean, alpha=1.0 / (self.count + 1))
        self.count += 1

    def copy(self) -> RunningMean:
        return RunningMean(None if self.params is None else [p.clone() for p in self.params], self.count)


def admit(mean: RunningMean, window: tuple[int, int], segment: Segment) -> tuple[int, int]:
    """Average ``segment`` into ``mean`` (the official ``update_parameters``: a segment admitted again counts again);
    the new window, the first and last step of the segments admitted so far."""
    mean.add(segment.params)
    if window[0] < 0:
        return segment.start, segment.end
    return min(window[0], segment.start), max(window[1], segment.end)


@register_addon
class SWAD(AddOn):
    """Dense weight averaging over the source-validation loss valley; the average is evaluated and exported."""

    name = "swad"
    title = "SWAD"
    paper = "Cha et al., NeurIPS 2021"
    citation = SWAD_CITATION
    HPARAMS = {
        "n_converge": HParam(
            3,
            "convergence window, in evaluations: training has converged when the oldest of the "
            "last n_converge segments has the lowest validation loss (official default 3)",
            minimum=1,
        ),
        "n_tolerance": HParam(
            6,
            "smoothing window, in evaluations: a segment joins the average while the smallest "
            "loss of the n_tolerance segments from it on stays under the threshold (official 6)",
            minimum=1,
        ),
        "tolerance_ratio": HParam(
            0.3,
            "threshold = (1 + tolerance_ratio) x the mean loss of the convergence window (official 0.3)",
            minimum=0.0,
        ),
        "bn_steps": HParam(
            500,
            "training batches (one minibatch per source domain each) over which the average's "
            "BatchNorm statistics are recomputed whenever it changes (official 500, once at the end); "
            "0 copies the host's statistics instead",
            minimum=0,
        ),
    }

    @classmethod
    def first_action(cls, hparams: dict[str, Any], schedule: Schedule) -> FirstAction | None:
        """The valley can be found at the ``n_converge``-th evaluation at the earliest."""
        n = hparams["n_converge"]
        if len(schedule.evaluations) >= n:
            return None
        last = schedule.evaluations[-1] - (schedule.evaluations[-2] if len(schedule.evaluations) > 1 else 0)
        return FirstAction(
            n * schedule.eval_every,
            f"its loss valley can be found at its {n}th evaluation at the earliest (swad.n_converge="
            f"{n}, --eval-every {schedule.eval_every}: step {n * schedule.eval_every})",
            f"lower --eval-every to {max(1, schedule.steps // n)}",
            otherwise=f"it exports the average of the last {last} steps, as the official code does "
            f"when the valley was not found",
        )

    def __init__(self, host: Algorithm, hparams: dict[str, Any], runtime: Runtime):
        super().__init__(host, hparams, runtime)
        self.params = [p for p in host.network.parameters()]
        self.average = averaging_copy(host.network)
        self.segment, self.segment_start = RunningMean(), 0
        self.queue: deque[Segment] = deque(maxlen=max(hparams["n_converge"], hparams["n_tolerance"]))
        self.converge_step: int | None = None
        self.threshold = float("nan")
        self.dead = False
        # The valley's average: segments admitted so far. ``placeholder`` is the converged segment, which stands in
        # until the first admission (as the official AveragedModel built from it, with nothing averaged yet).
        self.final = RunningMean()
        self.placeholder: Segment | None = None
        self.window = (-1, -1)  # first and last step of the admitted segments
        self.ended = False  # the run's last evaluation has happened: the official get_final_model applies
        self.loaded: tuple[Any, ...] | None = None  # what self.average holds now

    # -- events

    def after_update(self, context: StepContext) -> dict[str, float]:
        if self.segment.count == 0:
            self.segment_start = context.step + 1
        self.segment.add(self.params)
        return {}

    def on_evaluate(self, context: EvalContext) -> dict[str, float]:
        self.ended = context.last
        if self.segment.count == 0:  # an evaluation with no step since the last one
            return {}
        loss = float(context.source_val_loss(self.host.network))
        assert self.segment.params is not None  # count > 0: add() has set them
        segment = Segment(self.segment.params, self.segment_start, context.step, loss)
        self.segment = RunningMean()
        self.observe(segment)
        if self.exported() is not None:
            self.materialise(context)
        return {
            "val_loss": loss,
            "converged": float(self.converge_step is not None),
            "dead": float(self.dead),
            "window_start": float(self.window[0]),
            "window_end": float(self.window[1]),
        }

    def observe(self, segment: Segment) -> None:
        """The official ``LossValley.update_and_evaluate`` on one finished segment."""
        if self.dead:
            return
        self.queue.append(segment)
        n_converge, n_tolerance = self.hparams["n_converge"], self.hparams["n_tolerance"]
        converging = list(self.queue)[-n_converge:]
        smoothing = list(self.queue)[-n_tolerance:]
        if self.converge_step is None:
            if len(self.queue) < n_converge:
                return
            losses = [s.loss for s in converging]
            if min(range(len(losses)), key=losses.__getitem__) != 0:
                return
            self.converge_step = converging[0].end
            self.threshold = sum(losses) / len(losses) * (1.0 + self.hparams["tolerance_ratio"])
            self.placeholder = converging[0]
            if n_tolerance < n_converge:
                for s in converging[1 : 1 + n_converge - n_tolerance]:
                    self._admit(s)
            elif n_tolerance > n_converge:
                # The official slice of the tolerance queue: once it is full, the converged segment and the
                # n_tolerance - n_converge before it. The average starts two after the last of them above the
                # threshold (the official loop's Q[start_idx + 1:]).
                before = smoothing[: n_tolerance - n_converge + 1]
                start = next((i + 1 for i in reversed(range(len(before))) if before[i].loss > self.threshold), 0)
                for s in before[start + 1 :]:
                    self._admit(s)
            if self.runtime.is_main_process:
                logger.info(
                    "swad: converged at step %d, window from step %d, threshold %.4f",
                    self.converge_step,
                    self.window[0] if self.final.count else self.placeholder.start,
                    self.threshold,
                )
            return
        if smoothing[0].end < self.converge_step:
            return
        if min(s.loss for s in smoothing) > self.threshold:
            self.dead = True
            if self.runtime.is_main_process:
                logger.info("swad: the loss valley ended at step %d; the average is final", self.window[1])
            return
        self._admit(smoothing[0])

    def _admit(self, segment: Segment) -> None:
        self.window = admit(self.final, self.window, segment)

    def exported(self) -> tuple[list[torch.Tensor], tuple[int, int]] | None:
        """The parameters to evaluate and their step window, or None for the host's own network: the valley's
        average once converged; at the run's end without convergence the last segment's average (the official
        ``get_final_model`` returns it, with an error in the log)."""
        if self.converge_step is not None:
            return self.valley(self.ended)
        if self.ended and self.queue:
            last = self.queue[-1]
            return last.params, (last.start, last.end)
        return None

    def valley(self, last: bool) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """The averaged parameters and their step window; at the run's end (``last``) also the segments still
        waiting for their tolerance window, admitted as the official ``get_final_model`` does, without consuming
        them (a resumed run that trains further goes on from the same state)."""
        final, window = self.final, self.window
        if last and not self.dead:
            final = self.final.copy()
            pending = list(self.queue)[-self.hparams["n_tolerance"] :][1:]
            while pending and min(s.loss for s in pending) <= self.threshold:
                window = admit(final, window, pending.pop(0))
        if final.count == 0:
            assert self.placeholder is not None  # converged: convergence sets it, and the resumable state keeps it
            return self.placeholder.params, (self.placeholder.start, self.placeholder.end)
        assert final.params is not None  # count > 0: add() has set them
        return final.params, window

    @torch.no_grad()
    def materialise(self, context: EvalContext | None = None) -> None:
        """Load :meth:`exported` into ``self.average``, with BatchNorm statistics recomputed (or copied)."""
        exported = self.exported()
        assert exported is not None
        params, window = exported
        key = (window, self.ended, self.converge_step is not None, self.final.count)
        if self.loaded == key:
            return
        for target, value in zip(self.average.parameters(), params):
            target.copy_(value)
        steps = self.hparams["bn_steps"]
        if context is None or steps == 0 or batchnorm_frozen(self.host.network):
            for target, value in zip(self.average.buffers(), self.host.network.buffers()):
                target.copy_(value)
        else:
            recompute_batchnorm(self.average, context.source_batches(steps))
        self.average.eval()
        self.loaded = key

    def evaluated_network(self) -> nn.Module | None:
        """The valley's average once training has converged; the host's network before (at the run's end, the last
        segment's average)."""
        if self.exported() is None:
            return None
        if self.loaded is None:  # resumed from a checkpoint: no batches at hand until the next evaluation
            self.materialise()
        return self.average

    # -- resumable state

    def extra_state(self) -> dict[str, Any]:
        return {
            "segment": None if self.segment.count == 0 else [p.clone() for p in self.segment.params or ()],
            "segment_count": self.segment.count,
            "segment_start": self.segment_start,
            "queue": [s.state() for s in self.queue],
            "converge_step": self.converge_step,
            "threshold": self.threshold,
            "dead": self.dead,
            "final": None if self.final.count == 0 else [p.clone() for p in self.final.params or ()],
            "final_count": self.final.count,
            "window": list(self.window),
            "placeholder": None if self.placeholder is None else self.placeholder.state(),
            "ended": self.ended,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        device = self.params[0].device
        to = lambda ps: None if ps is None else [p.to(device) for p in ps]  # noqa: E731
        self.segment = RunningMean(to(state["segment"]), int(state["segment_count"]))
        self.segment_start = int(state["segment_start"])
        self.queue.clear()
        self.queue.extend(Segment.of(s, device) for s in state["queue"])
        self.converge_step = state["converge_step"]
        self.threshold, self.dead = float(state["threshold"]), bool(state["dead"])
        self.final = RunningMean(to(state["final"]), int(state["final_count"]))
        self.window = (int(state["window"][0]), int(state["window"][1]))
        self.placeholder = None if state["placeholder"] is None else Segment.of(state["placeholder"], device)
        self.ended = bool(state.get("ended", False))
        self.loaded = None

    def diagnostics(self) -> dict[str, float]:
        """Whether the loss valley was found, and how many steps the exported average spans (0: the online model;
        without convergence, the last segment's steps once the run has ended)."""
        exported = self.exported() if self.converge_step is None else self.valley(last=True)
        if exported is None:
            return {"converged": 0.0, "averaged_steps": 0.0}
        start, end = exported[1]
        return {"converged": float(self.converge_step is not None), "averaged_steps": float(end - start + 1)}

    def summary(self) -> dict[str, Any]:
        if self.converge_step is None:
            out: dict[str, Any] = {"converged": False, "segments_queued": len(self.queue)}  # bounded by the windows
            if self.queue:  # what the official code returns instead: the last segment's average
                out["last_segment_start"], out["last_segment_end"] = self.queue[-1].start, self.queue[-1].end
            return out
        _, window = self.valley(last=True)
        return {
            "converged": True,
            "converge_step": self.converge_step,
            "threshold": self.threshold,
            "dead_valley": self.dead,
            "window_start": window[0],
            "window_end": window[1],
            "segments_averaged": self.valley_count(last=True),
        }

    def valley_count(self, last: bool) -> int:
        """How many segment averages the valley's average is the mean of (a segment admitted twice counts twice;
        0: the converged segment alone, as the official placeholder)."""
        count = self.final.count
        if last and not self.dead:
            pending = list(self.queue)[-self.hparams["n_tolerance"] :][1:]
            while pending and min(s.loss for s in pending) <= self.threshold:
                pending.pop(0)
                count += 1
        return count


@register_addon
class EMA(AddOn):
    """An exponential moving average of the host's weights, evaluated and exported instead of them."""

    name = "ema"
    title = "Exponential moving average of weights"
    paper = "Polyak & Juditsky, 1992; as timm's ModelEmaV3"
    HPARAMS = {
        "decay": HParam(
            0.999,
            "weight of the running average at each step: average = decay * average + (1 - decay) "
            "* weights, over parameters and floating-point buffers (BatchNorm statistics); with the "
            "warm-up, its ceiling",
            minimum=0.0,
            maximum=1.0,
        ),
        "warmup": HParam(
            True,
            "warm the decay up as timm's ModelEmaV3(use_warmup=True): the k-th update uses "
            "min(decay, 1 - (1 + (k - 1) / warmup_gamma)^-warmup_power), 0 at the first (a copy); "
            "false: the constant decay of ModelEmaV2, whose average of a run much shorter than "
            "1 / (1 - decay) steps is mostly the initial weights",
        ),
        "warmup_power": HParam(
            2 / 3, "exponent of the warm-up (timm's default 2/3; 3/4 reaches the ceiling sooner)", minimum=0.0
        ),
        "warmup_gamma": HParam(1.0, "inverse step scale of the warm-up (timm's default 1)", minimum=1e-12),
    }
    INITIAL_SHARE = 0.1  # the weight left on the initial weights above which a constant decay is warned about

    @classmethod
    def schedule_warnings(cls, hparams: dict[str, Any], schedule: Schedule) -> list[str]:
        """Without the warm-up, the initial weights keep a weight of decay^steps in the exported average."""
        share = hparams["decay"] ** schedule.steps
        if hparams["warmup"] or share <= cls.INITIAL_SHARE:
            return []
        horizon = math.ceil(math.log(cls.INITIAL_SHARE) / math.log(hparams["decay"]))
        return [
            f"ema hardly acts in this run: with ema.warmup=false and ema.decay={hparams['decay']} the exported "
            f"average keeps {share:.0%} of the initial weights after {schedule.steps} steps; set ema.warmup=true, "
            f"lower ema.decay to {cls.INITIAL_SHARE ** (1 / schedule.steps):.3g} or raise --steps to {horizon}"
        ]

    def decay(self) -> float:
        """The decay of the next update (timm's ``ModelEmaV3.get_decay`` at step ``updates + 1``)."""
        if not self.hparams["warmup"]:
            return self.hparams["decay"]
        if self.updates == 0:
            return 0.0
        warm = 1.0 - (1.0 + self.updates / self.hparams["warmup_gamma"]) ** -self.hparams["warmup_power"]
        return max(min(warm, self.hparams["decay"]), 0.0)

    def __init__(self, host: Algorithm, hparams: dict[str, Any], runtime: Runtime):
        super().__init__(host, hparams, runtime)
        self.average = averaging_copy(host.network)
        self.pairs = list(zip(self.average.state_dict().values(), host.network.state_dict().values()))
        self.updates = 0

    @torch.no_grad()
    def after_update(self, context: StepContext) -> dict[str, float]:
        decay = self.decay()
        for average, value in self.pairs:
            if average.is_floating_point():
                average.mul_(decay).add_(value.detach(), alpha=1.0 - decay)
            else:
                average.copy_(value)
        self.updates += 1
        return {}

    def evaluated_network(self) -> nn.Module | None:
        return self.average

    def extra_state(self) -> dict[str, Any]:
        return {"average": {k: v.clone() for k, v in self.average.state_dict().items()}, "updates": self.updates}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state:
            self.average.load_state_dict(state["average"])
            self.updates = int(state.get("updates", 0))

    def summary(self) -> dict[str, Any]:
        return {"updates": self.updates} if self.updates else {}
