"""Identify and Unlearn (IU, IUE): post-epoch domain-specific gradient ascent that composes with any algorithm.

Over 500 lines for one job: IU's three phases share each call's passes (rules, pools, anatomy live elsewhere).

Zhao et al., "Unlearning During Training: Domain-Specific Gradient Ascent for Domain Generalization"
(ICLR 2026). After every epoch of the host algorithm (whose loss is never changed), with the network in eval
mode so BatchNorm statistics stay put (research note ``iu.md`` A7):

1. **USS** — score every source training sample with influence functions: generalisation ``G_x`` (against the
   source validation split, A3) and complexity ``C_x`` (:mod:`.influence`), ``U_x = G_x^alpha / C_x`` (A2);
   the lower-tail MAD outliers ``U_x < median - k MAD`` form the unlearning set ``D_u``. IUE thresholds an
   exponential moving average of ``U_x`` per sample instead (A8).
2. **DSCS** — per channel of the chosen layer (default: the features the classifier reads, A4), the variance
   across source domains of the per-domain activation variances (IDV, A5); the upper-tail MAD outliers form
   the domain-specific channels ``C_spc`` (A6).
3. **DSGA** — plain gradient *ascent* on the cross-entropy of ``D_u`` that moves only the parameter slices
   writing the channels in ``C_spc`` (A9, A10); the host optimizer's state is untouched. Its size is
   ``iu.ascent``: by default one step whose length a line search sets so that the ``D_u`` loss rises by
   ``iu.target_rise``, within ``iu.max_val_drop`` of source-validation accuracy (the paper's unit step and the
   note's fixed ``eta_u`` are the other two choices). Each call records the ``D_u`` loss, the IDV of ``C_spc``
   on source validation and source-validation accuracy before and after, and warns when it changed nothing.

Every choice the paper leaves open is a hyperparameter below, named after the note's assumption. Under
several processes every forward pass is sharded and gathered, and scores are broadcast from process 0, so the
selections and the ascent are identical on every process.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DGZooError
from ..hparams import Choice, HParam, Uniform
from ..models import ChannelLayer, ChannelSlice, ResNetTail, classifier, features, masked_ascent
from .base import AddOn, EpochContext, FirstAction, Recipe, Schedule, StepContext
from .influence import FunctionalLoss, chunks, kfac_head_influence, largest_eigenvalue, lissa
from .iu_pools import ImageCache, Pass, Pool, accuracy, load_batch
from .iu_rules import inter_domain_variance, mad_outliers, mean_idv, outlier_scale, unlearning_scores
from .registry import register_addon

logger = logging.getLogger("dgzoo")

CITATION = """@inproceedings{zhao2026iclr-unlearning,
  title     = {{Unlearning During Training: Domain-Specific Gradient Ascent for Domain Generalization}},
  author    = {Zhao, Di and Zhang, Jingfeng and Hu, Hongsheng and Fournier-Viger, Philippe and Dobbie, Gillian and Koh, Yun Sing},
  booktitle = {International Conference on Learning Representations},
  year      = {2026},
  url       = {https://mlanthology.org/iclr/2026/zhao2026iclr-unlearning/}
}"""


@register_addon
class IU(AddOn):
    """Identify and Unlearn after every epoch (or every ``iu.every`` steps) of any host algorithm."""

    name = "iu"
    title = "Identify and Unlearn"
    paper = "Zhao et al., ICLR 2026"
    citation = CITATION
    HPARAMS = {
        "every": HParam(
            0,
            "run every N training steps; 0 = after every DomainBed epoch, ceil(min source-domain "
            "train size / batch size) steps (note A11)",
            minimum=0,
        ),
        "start_step": HParam(
            0, "no IU call before this step; the first call is at the end of epoch 1 (A11)", minimum=0
        ),
        "mode": HParam(
            "fast",
            "influence estimator: fast = closed-form Kronecker-factored influence on the "
            "classifier head; faithful = LiSSA inverse-HVPs with exact Hessian-vector products "
            "over iu.influence_params (A1)",
            choices=("fast", "faithful"),
        ),
        "influence_params": HParam(
            "all",
            "faithful mode's parameter set: every trainable parameter, or the classifier head (A1)",
            choices=("all", "head"),
        ),
        "damping": HParam(0.01, "Hessian damping lambda in H + lambda I, both modes (A1)", minimum=0.0),
        "lissa_depth": HParam(100, "LiSSA recursion depth T (A1; Koh & Liang use 100-1000)", minimum=1),
        "lissa_scale": HParam(
            0.0,
            "LiSSA scale s, which must exceed the Hessian's largest eigenvalue; 0 = 1.5 x "
            "(a 20-step power-iteration estimate on the first Hessian minibatch + damping). "
            "A1's s=25 diverges on networks as soon as they fit (A1)",
            minimum=0.0,
        ),
        "lissa_batch": HParam(256, "training samples per LiSSA Hessian minibatch (A1: 256-512)", minimum=1),
        "lissa_repeats": HParam(1, "independent LiSSA recursions averaged (A1)", minimum=1),
        "lissa_chunk": HParam(
            0,
            "vectors per vectorised LiSSA recursion (memory/speed only, results unchanged); "
            "0 = 512 for the head, 8 for the whole network",
            minimum=0,
        ),
        "score_fraction": HParam(
            1.0,
            "fraction of each source domain's training samples scored per call, a fresh "
            "seeded draw each call; 1 = every sample, every epoch, as the paper (subsampling "
            "is the reviewers' suggestion to cut the cost)",
            maximum=1.0,
        ),
        "alpha": HParam(
            2.0,
            "exponent on G in U = G^alpha / C, against score-equivalence bias (A2: value not given by the paper)",
            minimum=0.0,
            search=Choice((0.5, 1.0, 2.0, 3.0)),
        ),
        "g_transform": HParam(
            "minmax",
            "make G usable under the power: minmax = rescale to [1e-6, 1] over the "
            "training set; signed = sign(G)|G|^alpha (A2)",
            choices=("minmax", "signed"),
        ),
        "k": HParam(2.0, "MAD multiplier of both thresholds (stated: 2)", minimum=0.0),
        "score_scale": HParam(
            "log",
            "scale on which the lower-tail MAD rule reads U: log = median - k MAD of log U "
            "(the same ranking; U is a ratio with a long right tail, on whose linear scale "
            "median - k MAD is below every score); linear = on U itself, as the rule is "
            "written (A13)",
            choices=("log", "linear"),
        ),
        "layer": HParam(
            "auto",
            "layer whose channels DSCS ranks and DSGA edits: auto = the features the classifier "
            "reads (A4), or a stage/block name (layer3, blocks.5, features.denseblock3)",
        ),
        "channel_score": HParam(
            "idv",
            "idv = variance across domains of per-domain channel variances (paper); "
            "idv+means also adds the variance of the per-domain means (a reviewer's "
            "extension)",
            choices=("idv", "idv+means"),
        ),
        "ascent": HParam(
            "calibrated",
            "how large the DSGA step is: calibrated = one step along the masked "
            "gradient of the mean D_u loss, its size found by line search so that the "
            "D_u loss rises by iu.target_rise, within iu.max_val_drop of source-val "
            "accuracy; literal = the paper's theta_c <- theta_c + grad L, unit steps on "
            "each minibatch's summed loss; fixed = steps of iu.lr on each minibatch's "
            "mean loss (A10)",
            choices=("calibrated", "literal", "fixed"),
        ),
        "target_rise": HParam(
            1.1,
            "calibrated ascent: the factor by which the D_u loss must rise in one call "
            "(docs/iu.md: chosen from a measured sweep)",
            minimum=1.0,
            search=Choice((1.1, 1.25, 1.5, 2.0)),
        ),
        "max_val_drop": HParam(
            0.01,
            "calibrated ascent: the largest drop of source-validation accuracy (a "
            "fraction, 0.01 = one point) a call may cause; the step is halved until it "
            "fits",
            minimum=0.0,
            maximum=1.0,
        ),
        "search_steps": HParam(
            12, "calibrated ascent: loss evaluations of the line search (bracketing, then bisection)", minimum=1
        ),
        "cache_mb": HParam(
            1024,
            "memory (MiB) for keeping the eval-transformed source images, and the inputs of "
            "the first edited ResNet stage, across calls (speed only; 0 = decode and run "
            "the whole network every time)",
            minimum=0,
        ),
        "lr": HParam(
            1e-3,
            "iu.ascent=fixed: DSGA step size eta_u (A10: tune in 1e-4..1e-2)",
            minimum=0.0,
            search=Uniform(-4, -2, base=10),
        ),
        "passes": HParam(1, "iu.ascent=fixed/literal: DSGA passes over the unlearning set (A10)", minimum=1),
        "batch_size": HParam(0, "DSGA minibatch size; 0 = the recipe's per-domain batch size (A10)", minimum=0),
        "include_head": HParam(False, "DSGA also edits the classifier's columns of the selected channels (A9 variant)"),
        "val_after": HParam(
            True,
            "measure source-val accuracy and the D_u loss again after the ascent (diagnostics "
            "only; one more forward pass over the validation split)",
        ),
        "samples": HParam(
            "unlearning_set",
            "ascend on the unlearning set, or on all training samples (the paper's DSCS-only ablation)",
            choices=("unlearning_set", "all"),
        ),
        "params": HParam(
            "channels",
            "ascend on the selected channels' parameter slices, or on every trainable "
            "parameter (the paper's USS-only ablation)",
            choices=("channels", "all"),
        ),
    }

    @classmethod
    def check_hparams(cls, hparams: dict[str, Any]) -> None:
        """score_fraction is a fraction in (0, 1]: a zero would score no sample and select nothing, silently."""
        if not 0 < hparams["score_fraction"] <= 1:
            raise DGZooError(
                f"hparam {cls.name}.score_fraction={hparams['score_fraction']} must be in (0, 1]; "
                f"use 1 to score every sample"
            )
        if hparams["score_scale"] == "log" and hparams["g_transform"] == "signed":
            raise DGZooError(
                f"{cls.name}.g_transform=signed gives negative scores, which have no log; use "
                f"{cls.name}.score_scale=linear with it, or {cls.name}.g_transform=minmax"
            )

    @classmethod
    def first_action(cls, hparams: dict[str, Any], schedule: Schedule) -> FirstAction | None:
        """The first IU call: the first epoch's end at or after ``start_step``, or with ``every`` the first multiple
        of it after the first epoch's end (when the source data arrive) and at or after ``start_step``."""
        every, epoch, start = hparams["every"], schedule.steps_per_epoch, hparams["start_step"]
        if every:
            first = every * math.ceil(max(epoch + 1, start) / every)
            return FirstAction(
                first,
                f"its first call is at step {first} ({cls.name}.every={every}, after the "
                f"first epoch of {epoch} steps" + (f", {cls.name}.start_step={start}" if start else "") + ")",
                f"lower {cls.name}.every" + (f" or {cls.name}.start_step" if start else ""),
            )
        first = epoch * max(1, math.ceil(start / epoch))
        return FirstAction(
            first,
            f"its first call is at the end of epoch {first // epoch} (step {first}, "
            f"{epoch} steps per epoch" + (f", {cls.name}.start_step={start}" if start else "") + ")",
            f"set {cls.name}.every to {max(1, schedule.steps // 3)} to call it every so many steps",
        )

    @classmethod
    def check_recipe(cls, hparams: dict[str, Any], recipe: Recipe) -> None:
        """The channel layer must exist in the backbone and the head must be linear (checked on the meta-device
        network, before anything is written)."""
        if recipe.network is None:
            return
        ChannelLayer(recipe.network, hparams["layer"], hparams["include_head"])
        if not isinstance(classifier(recipe.network), nn.Linear):
            raise DGZooError(
                f"+{cls.name} needs a linear classifier head; {type(recipe.network).__name__}'s is "
                f"{type(classifier(recipe.network)).__name__}"
            )

    def __init__(self, host: Any, hparams: dict[str, Any], runtime: Any):
        super().__init__(host, hparams, runtime)
        self.module = host.network
        self.layer = ChannelLayer(self.module, hparams["layer"], hparams["include_head"])
        trainable = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        if (
            hparams["mode"] == "faithful"
            and hparams["influence_params"] == "all"
            and trainable > 1_000_000
            and runtime.is_main_process
        ):
            # Measured (benchmarks/results/iu_cost.md): ~5 days per call for ResNet-18 on a CPU. Allowed, since it
            # is the paper's estimator, but nobody should find out from a call that never ends.
            logger.warning(
                "%s.mode=faithful over all %.1f M trainable parameters runs 100s of LiSSA steps of "
                "exact Hessian-vector products per call: hours to days per epoch. %s.influence_params=head "
                "(the classifier head) costs about 10 ERM epochs per call, %s.mode=fast under one",
                self.name,
                trainable / 1e6,
                self.name,
                self.name,
            )
        self.context: EpochContext | None = None
        # The latest call's scores and choices, for inspection: dataset rows of D_u, channel indices of C_spc.
        self.selected_rows: list[int] = []
        self.selected_channels: list[int] = []
        self.scores: torch.Tensor | None = None  # U (IUE: its average) of every training sample, by dataset row:
        self.score_rows: list[int] = []  # ... the rows, in the same order
        self.timings: dict[str, float] = {}  # the latest call's seconds per phase
        self.calls = 0
        self.ema: dict[int, float] = {}
        self.history: list[dict[str, float]] = []
        self.cache = ImageCache(hparams["cache_mb"] << 20) if hparams["cache_mb"] else None
        self.tail = ResNetTail.of(self.module, self.layer) if hparams["params"] == "channels" and self.cache else None

    # -- events

    def after_update(self, context: StepContext) -> dict[str, float]:
        every, done = self.hparams["every"], context.step + 1
        # The source data arrive with the first epoch's end, so step-based calls start after epoch 1 (A11).
        if every and done % every == 0 and done >= self.hparams["start_step"] and self.context is not None:
            return self.unlearn(self.context, done)
        return {}

    def on_epoch_end(self, context: EpochContext) -> dict[str, float]:
        self.context = context
        if self.hparams["every"] or context.step < self.hparams["start_step"]:
            return {}
        return self.unlearn(context, context.step)

    # -- one IU call

    def unlearn(self, context: EpochContext, step: int) -> dict[str, float]:
        """Run USS, DSCS and DSGA once on the model as it is now; return this call's diagnostics."""
        was_training = self.module.training
        self.context, self.timings = context, {}
        tick = time.perf_counter()
        self.module.eval()
        try:
            metrics = self._unlearn(context, tick)
        finally:
            self.module.train(was_training)
        self.calls += 1
        metrics["seconds"] = time.perf_counter() - tick
        self.history.append({"step": step, **metrics})
        if not self.runtime.is_main_process:
            return metrics
        if "skipped" in metrics:
            logger.warning(
                "%s call %d (step %d) skipped: the model's outputs are not finite (the host diverged, or "
                "an earlier ascent did: lower %s.target_rise or %s.lr)",
                self.name,
                self.calls,
                step,
                self.name,
                self.name,
            )
            return metrics
        edited = "all parameters" if "channels" not in metrics else len(self.selected_channels)
        after = f" -> {metrics['val_acc_after']:.4f}" if "val_acc_after" in metrics else ""
        rise = f", D_u loss x{metrics['unlearn_loss_rise']:.3f}" if "unlearn_loss_rise" in metrics else ""
        logger.info(
            "%s call %d (step %d): |D_u| %d, |C_spc| %s, source val %.4f%s%s, %.1f s",
            self.name,
            self.calls,
            step,
            len(self.selected_rows),
            edited,
            metrics["val_acc_before"],
            after,
            rise,
            metrics["seconds"],
        )
        if not metrics["acted"]:
            logger.warning(
                "%s call %d (step %d) did nothing measurable: %s",
                self.name,
                self.calls,
                step,
                _inaction(metrics, self.name),
            )
        return metrics

    def _unlearn(self, context: EpochContext, tick: float) -> dict[str, float]:
        hp = self.hparams
        train = Pool.of(context.source_train, hp["score_fraction"], seed=self.calls, cache=self.cache)
        val = Pool.of(context.source_val, cache=self.cache)
        # No-grad passes afford larger batches than training steps: fewer, fuller batches cost less per image.
        batch = max(context.batch_size * len(context.source_domains), 256)
        seen, val_seen = self._forward(train, batch, keep=True), self._forward(val, batch, keep=True)
        self._lap("forward", tick)
        if not (torch.isfinite(seen.logits).all() and torch.isfinite(val_seen.logits).all()):
            self.selected_rows, self.selected_channels = [], []
            return {"skipped": 1.0}
        chosen, channels, metrics = self._select(train, val, seen, val_seen)
        self._lap("select", tick)
        device = seen.logits.device
        metrics["val_acc_before"] = accuracy(val_seen.logits, val.labels)
        if channels is not None and channels.any():
            metrics["idv_before"] = mean_idv(val_seen.activations, val.domain, channels)
        if len(chosen):
            metrics["unlearn_loss_before"] = F.cross_entropy(
                seen.logits[chosen.to(device)], train.labels[chosen].to(device)
            ).item()
        ascend = len(chosen) and (channels is None or channels.any())
        if ascend and hp["ascent"] == "calibrated":
            metrics.update(self._calibrated(train, chosen, channels, seen, val, val_seen, batch))
            self._lap("ascent", tick)
        elif ascend:
            self._ascend(train, chosen, channels, hp["batch_size"] or context.batch_size)
            self._lap("ascent", tick)
            if hp["val_after"]:
                metrics.update(self._after(train, chosen, channels, seen, val, val_seen, batch))
                self._lap("after", tick)
        elif hp["val_after"]:
            metrics["val_acc_after"] = metrics["val_acc_before"]
        if "unlearn_loss_after" in metrics:
            metrics["unlearn_loss_rise"] = metrics["unlearn_loss_after"] / max(metrics["unlearn_loss_before"], 1e-12)
        if "idv_before" in metrics and "idv_after" in metrics and metrics["idv_before"] > 0:
            drop = 1.0 - metrics["idv_after"] / metrics["idv_before"]
            if math.isfinite(drop):  # results.json stays strict JSON after a diverged (e.g. literal) ascent
                metrics["idv_drop"] = drop
        rise = metrics.get("unlearn_loss_rise")  # None: not measured (iu.val_after=false)
        metrics["acted"] = float(bool(ascend) and (rise is None or abs(rise - 1.0) >= _MEASURABLE))
        # A diverged ascent (e.g. the literal step) can leave infinite losses: records stay strict JSON.
        return {k: v for k, v in metrics.items() if math.isfinite(v)}

    def _lap(self, phase: str, tick: float) -> None:
        """Seconds since ``tick`` minus the phases already timed (the benchmark's cost breakdown)."""
        self.timings[phase] = time.perf_counter() - tick - sum(self.timings.values())

    def _select(
        self, train: Pool, val: Pool, seen: Pass, val_seen: Pass
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """USS and DSCS: dataset positions of D_u, the channel mask of C_spc (None: no mask), and diagnostics.

        Both come out of process 0, so every process ascends on the same samples and channels.
        """
        hp, device, metrics = self.hparams, seen.logits.device, {}
        if hp["samples"] == "all":
            unlearn = torch.ones(len(train), dtype=torch.bool, device=device)
        else:
            if hp["mode"] == "fast":
                g, c = kfac_head_influence(
                    seen.features,
                    seen.logits.softmax(1),
                    train.labels.to(device),
                    val_seen.features,
                    val_seen.logits.softmax(1),
                    val.labels.to(device),
                    hp["damping"],
                )
            else:
                g, c, metrics["lissa_scale"] = self._lissa_influence(train, val, seen, val_seen)
            scores = self.runtime.broadcast(unlearning_scores(g, c, hp["alpha"], hp["g_transform"]))
            self.scores, self.score_rows = self._smooth(scores, train.rows), train.rows.tolist()
            unlearn = mad_outliers(outlier_scale(self.scores, hp["score_scale"]), hp["k"], "lower")
        chosen = self.runtime.broadcast(unlearn.to(torch.uint8)).bool().nonzero().flatten().cpu()
        self.selected_rows = train.rows[chosen.numpy()].tolist()
        metrics["unlearn_samples"] = float(len(chosen))
        if hp["params"] == "all":
            self.selected_channels = []
            return chosen, None, metrics
        domain = train.domain.to(device)
        assert seen.activations is not None  # _forward always sets them
        idv = inter_domain_variance(
            [seen.activations[domain == d] for d in range(int(train.domain.max()) + 1)],
            with_means=hp["channel_score"] == "idv+means",
        )
        channels = self.runtime.broadcast(mad_outliers(idv, hp["k"], "upper").to(torch.uint8)).bool()
        self.selected_channels = channels.nonzero().flatten().tolist()
        metrics["channels"] = float(len(self.selected_channels))
        return chosen, channels, metrics

    def _smooth(self, scores: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Plain IU: the scores themselves. IUE overrides this with a per-sample moving average."""
        return scores

    # -- faithful influence (LiSSA)

    def _lissa_influence(
        self, train: Pool, val: Pool, seen: Pass, val_seen: Pass
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(G, C, scale)`` by LiSSA over the chosen parameters; training samples are sharded across processes."""
        hp, device = self.hparams, seen.logits.device
        on_head = hp["influence_params"] == "head"
        if on_head:
            head = classifier(self.module)
            loss = FunctionalLoss(head, [n for n, p in head.named_parameters() if p.requires_grad])

            def inputs(pool: Pool, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                feats = seen.features if pool is train else val_seen.features
                return feats[index.to(device)], pool.labels[index].to(device)
        else:
            loss = FunctionalLoss(self.module, [n for n, p in self.module.named_parameters() if p.requires_grad])

            def inputs(pool: Pool, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return load_batch(pool.dataset, index, device)

        chunk = hp["lissa_chunk"] or (512 if on_head else 8)
        # The Hessian minibatches: one seeded draw per call, the same on every process and for every chunk.
        generator = torch.Generator().manual_seed(self.calls)
        hessian = torch.randint(
            len(train), (hp["lissa_depth"] * hp["lissa_repeats"], hp["lissa_batch"]), generator=generator
        )

        def hvp(vectors: torch.Tensor, j: int) -> torch.Tensor:
            return loss.hvp(*inputs(train, hessian[j]), vectors)

        scale = hp["lissa_scale"] or 1.5 * (
            largest_eigenvalue(lambda v: hvp(v, 0), loss.numel, seed=self.calls, device=device) + hp["damping"]
        )

        def inverse_hvp(vectors: torch.Tensor) -> torch.Tensor:
            return lissa(hvp, vectors, hp["lissa_depth"], scale, hp["damping"], hp["lissa_repeats"])

        world, rank = self.runtime.num_processes, self.runtime.process_index
        g_val = torch.zeros(loss.numel, device=device)
        for part in chunks(len(val), chunk):
            index = torch.arange(part.start, part.stop)[rank::world]
            if len(index):
                g_val += loss.grad_sum(*inputs(val, index))
        s_val = inverse_hvp(self.runtime.all_reduce_mean(g_val).mul_(world)[None])[0]

        mine = torch.arange(len(train))[rank::world]
        generalisation, complexity = torch.zeros(len(train), device=device), torch.zeros(len(train), device=device)
        for part in chunks(len(mine), chunk):
            index = mine[part]
            grads = loss.per_sample_grads(*inputs(train, index))
            generalisation[index.to(device)] = grads @ s_val
            complexity[index.to(device)] = inverse_hvp(grads).norm(dim=1)
        return (
            self.runtime.all_reduce_mean(generalisation).mul_(world),
            self.runtime.all_reduce_mean(complexity).mul_(world),
            scale,
        )

    # -- passes over the data

    @torch.no_grad()
    def _forward(self, pool: Pool, batch_size: int, entries: torch.Tensor | None = None, keep: bool = False) -> Pass:
        """Eval-mode features, logits and layer activations of every sample: each process does its share.

        With the tail and ``keep``, the inputs of its first stage are kept (this process's rows, while the cache
        has room); given ``entries`` from an earlier pass, only the tail runs (the layers before it are unedited).
        """
        world, rank = self.runtime.num_processes, self.runtime.process_index
        mine = torch.arange(len(pool))[rank::world]
        captured: list[torch.Tensor] = []
        hooks = (
            [self.layer.module.register_forward_hook(lambda m, i, out: captured.append(self.layer.reduce(out)))]
            if self.layer.module is not None
            else []
        )
        kept: list[torch.Tensor] | None = None
        if self.tail is not None and entries is None and keep:
            assert self.cache is not None  # the tail exists only with a cache (__init__)
            budget = self.cache.budget - self.cache.used
            kept = []

            def keep_input(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                nonlocal budget
                budget -= inputs[0].numel() * inputs[0].element_size()
                if kept is not None and budget >= 0:
                    kept.append(inputs[0].detach())

            hooks.append(self.tail.entry.register_forward_pre_hook(keep_input))
        head = classifier(self.module)
        feats, logits = [], []
        try:
            for part in chunks(len(mine), batch_size):
                with self.runtime.autocast():
                    if entries is not None:
                        assert self.tail is not None  # entries are the tail's inputs, kept by an earlier pass
                        f = self.tail.features(entries[part])
                    else:
                        x = pool.load(mine[part], self.runtime.device)[0]
                        f = features(self.module, x)
                    logits.append(head(f).float())
                feats.append(f.float())
        finally:
            for hook in hooks:
                hook.remove()
        seen = Pass(
            self._gather(feats, mine, len(pool), head.in_features),
            self._gather(logits, mine, len(pool), head.out_features),
            None,
        )
        seen.activations = (
            self._gather(captured, mine, len(pool), self.layer.num_channels)
            if self.layer.module is not None
            else seen.features
        )
        if entries is not None:
            seen.entries = entries
        elif kept is not None and budget >= 0:
            seen.entries = torch.cat(kept) if kept else None
        return seen

    def _gather(self, local: list[torch.Tensor], index: torch.Tensor, total: int, dim: int) -> torch.Tensor:
        """Place this process's rows at their positions; sum over processes (the other rows are zero)."""
        full = torch.zeros(total, dim, device=self.runtime.device)
        if local:
            full[index.to(full.device)] = torch.cat(local)
        return self.runtime.all_reduce_mean(full).mul_(self.runtime.num_processes)

    def _edited(self, channels: torch.Tensor | None) -> tuple[list[nn.Parameter], list[ChannelSlice] | None]:
        """The parameters DSGA moves, and the slices of them it writes (None: all of every parameter)."""
        if channels is None:
            return [p for p in self.module.parameters() if p.requires_grad], None
        return self.layer.parameters(), self.layer.slices

    def _gradient(
        self, pool: Pool, index: torch.Tensor, params: list[nn.Parameter], batch_size: int, reduction: str
    ) -> list[torch.Tensor]:
        """The gradient of the cross-entropy over ``index`` (``'sum'`` or ``'mean'`` over it), summed over
        processes, each process taking its share of every minibatch."""
        world, rank = self.runtime.num_processes, self.runtime.process_index
        mine = index[rank::world]
        if len(mine):
            x, y = pool.load(mine, self.runtime.device)
            with self.runtime.autocast():
                logits = self.module(x)
            objective = F.cross_entropy(logits.float(), y, reduction="sum")
            if reduction == "mean":  # the sum over this process's share / the global count: summed, the mean
                objective = objective / len(index)
            grads = list(torch.autograd.grad(objective, params, allow_unused=True))
            grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
        else:
            grads = [torch.zeros_like(p) for p in params]
        if world > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            self.runtime.all_reduce_mean(flat).mul_(world)
            grads = [g.view_as(p) for g, p in zip(flat.split([p.numel() for p in params]), params)]
        return grads

    def _ascend(self, train: Pool, chosen: torch.Tensor, channels: torch.Tensor | None, batch_size: int) -> None:
        """DSGA by minibatch steps over ``chosen``, masked to ``channels``: ``literal`` adds each minibatch's
        summed-loss gradient (the paper's unit step), ``fixed`` adds ``iu.lr`` times its mean-loss gradient."""
        hp = self.hparams
        params, slices = self._edited(channels)
        literal = hp["ascent"] == "literal"
        for _ in range(hp["passes"]):
            for part in chunks(len(chosen), batch_size):
                grads = self._gradient(train, chosen[part], params, batch_size, "sum" if literal else "mean")
                masked_ascent(params, grads, slices, channels, 1.0 if literal else hp["lr"])

    def _calibrated(
        self,
        train: Pool,
        chosen: torch.Tensor,
        channels: torch.Tensor | None,
        seen: Pass,
        val: Pool,
        val_seen: Pass,
        batch_size: int,
    ) -> dict[str, float]:
        """DSGA as one step ``theta += eta * M grad mean CE(D_u)``, ``eta`` chosen so the D_u loss rises by
        ``iu.target_rise``, then halved while source-val accuracy drops by more than ``iu.max_val_drop``.

        The search brackets ``eta`` from the first-order guess ``(target - 1) L / ||M g||^2`` (multiplying by 4
        until the target is reached), then bisects; it keeps the smallest ``eta`` found to reach the target,
        stopping once the rise is within a tenth of ``target - 1`` of it.
        """
        hp = self.hparams
        params, slices = self._edited(channels)
        grads = self._gradient(train, chosen, params, batch_size, "mean")
        saved = [p.detach().clone() for p in params]
        if slices is None:
            norm2 = sum(float(g.double().pow(2).sum()) for g in grads)
        else:
            grad_of = {id(p): g for p, g in zip(params, grads)}
            norm2 = sum(
                float(grad_of[id(sl.param)].index_select(sl.dim, sl.selected(channels)).double().pow(2).sum())
                for sl in slices
            )
        entries = train.subset(chosen)
        chosen_entries = self._entries_of(seen, chosen)

        def step_to(eta: float) -> None:
            with torch.no_grad():
                for p, v in zip(params, saved):
                    p.copy_(v)
            if eta:
                masked_ascent(params, grads, slices, channels, eta)

        def loss_at(eta: float) -> float:
            step_to(eta)
            logits = self._forward(entries, batch_size, chosen_entries).logits
            return F.cross_entropy(logits, entries.labels.to(logits.device)).item()

        loss0, target = loss_at(0.0), hp["target_rise"]
        out = {"ascent_norm": math.sqrt(norm2)}
        if norm2 <= 0 or loss0 <= 0:
            step_to(0.0)
            return {
                **out,
                "ascent_step": 0.0,
                "unlearn_loss_after": loss0,
                "val_acc_after": accuracy(val_seen.logits, val.labels),
                **self._idv_after(val_seen, val, channels),
            }
        eta, low, high, high_rise = (target - 1.0) * loss0 / norm2, 0.0, None, None
        for _ in range(hp["search_steps"]):
            rise = loss_at(eta) / loss0
            if rise >= target:
                high, high_rise = eta, rise
                if rise - target <= 0.1 * (target - 1.0):
                    break
                eta = (low + high) / 2
            else:
                low = eta
                eta = eta * 4 if high is None else (low + high) / 2
        out["target_reached"] = float(high is not None)
        eta = high if high is not None else low
        val_entries = val_seen.entries
        before = accuracy(val_seen.logits, val.labels)
        capped = 0
        while True:
            step_to(eta)
            val_after = self._forward(val, batch_size, val_entries)
            after = accuracy(val_after.logits, val.labels)
            if before - after <= hp["max_val_drop"] or capped >= hp["search_steps"]:
                break
            eta, capped = eta / 2, capped + 1
        out.update(
            {
                "ascent_step": eta,
                "val_acc_after": after,
                "val_capped": float(capped > 0),
                "unlearn_loss_after": (
                    high_rise * loss0
                    if capped == 0 and high_rise is not None
                    else self._pool_loss(entries, chosen_entries, batch_size)
                ),
                **self._idv_after(val_after, val, channels),
            }
        )
        return out

    def _after(
        self,
        train: Pool,
        chosen: torch.Tensor,
        channels: torch.Tensor | None,
        seen: Pass,
        val: Pool,
        val_seen: Pass,
        batch_size: int,
    ) -> dict[str, float]:
        """Source-val accuracy, D_u loss and IDV after a fixed/literal ascent (diagnostics only)."""
        val_after = self._forward(val, batch_size, val_seen.entries)
        entries = train.subset(chosen)
        return {
            "val_acc_after": accuracy(val_after.logits, val.labels),
            "unlearn_loss_after": self._pool_loss(entries, self._entries_of(seen, chosen), batch_size),
            **self._idv_after(val_after, val, channels),
        }

    def _entries_of(self, seen: Pass, chosen: torch.Tensor) -> torch.Tensor | None:
        """This process's tail inputs for the pool ``chosen`` (its rows ``chosen[rank::world]``), if kept.

        ``seen.entries`` holds rows ``p`` with ``p % world == rank`` of the scored pool; the chosen rows of this
        process in a sub-pool are those at positions ``rank::world`` of ``chosen``, which may live on another
        process, so the tail inputs are only reused on one process.
        """
        if seen.entries is None or self.runtime.num_processes > 1:
            return None
        return seen.entries[chosen.to(seen.entries.device)]

    def _pool_loss(self, pool: Pool, entries: torch.Tensor | None, batch_size: int) -> float:
        logits = self._forward(pool, batch_size, entries).logits
        return F.cross_entropy(logits, pool.labels.to(logits.device)).item()

    def _idv_after(self, after: Pass, val: Pool, channels: torch.Tensor | None) -> dict[str, float]:
        if channels is None or not channels.any():
            return {}
        return {"idv_after": mean_idv(after.activations, val.domain, channels)}

    # -- state and diagnostics

    def extra_state(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "history": self.history,
            "ema_rows": list(self.ema),
            "ema_values": list(self.ema.values()),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.calls = state.get("calls", 0)
        self.history = list(state.get("history", []))
        self.ema = dict(zip(state.get("ema_rows", []), state.get("ema_values", [])))

    def summary(self) -> dict[str, Any]:
        def mean(values: list[float]) -> float | None:
            return float(np.mean(values)) if values else None

        calls = [h for h in self.history if "skipped" not in h]
        out = {
            "calls": self.calls,
            "skipped": len(self.history) - len(calls),
            "mode": self.hparams["mode"],
            "mean_unlearn_samples": mean([h["unlearn_samples"] for h in calls]),
            "mean_val_acc_change": mean(
                [h["val_acc_after"] - h["val_acc_before"] for h in calls if "val_acc_after" in h]
            ),
            "seconds": float(sum(h["seconds"] for h in self.history)),
            "history": self.history,
        }
        if self.hparams["params"] == "channels":
            out["mean_channels"] = mean([h["channels"] for h in calls])
        return out

    def diagnostics(self) -> dict[str, float]:
        """Does the ascent act: the share of calls that changed something, the mean D_u loss rise per call, the
        mean relative IDV drop of C_spc on source validation, the mean source-val accuracy change."""
        calls = [h for h in self.history if "skipped" not in h]
        if not calls:
            return {}
        out = {"calls": float(len(calls)), "acted_fraction": float(np.mean([h.get("acted", 0.0) for h in calls]))}
        selected = [h["unlearn_samples"] for h in calls if "unlearn_samples" in h]
        if selected:  # how many samples IU unlearned: 0 in every call means the run was its host alone
            out["mean_unlearn_samples"] = float(np.mean(selected))
            out["calls_with_samples"] = float(sum(n > 0 for n in selected))
        for key, label in (
            ("unlearn_loss_rise", "mean_unlearn_loss_rise"),
            ("idv_drop", "mean_idv_drop"),
            ("ascent_step", "mean_ascent_step"),
        ):
            values = [h[key] for h in calls if key in h]
            if values:
                out[label] = float(np.mean(values))
        changes = [h["val_acc_after"] - h["val_acc_before"] for h in calls if "val_acc_after" in h]
        if changes:
            out["mean_val_acc_change"] = float(np.mean(changes))
        return out


@register_addon
class IUE(IU):
    """IU whose unlearning scores are smoothed per sample across calls with an exponential moving average."""

    name = "iue"
    title = "Identify and Unlearn with EMA scores"
    HPARAMS = {
        **IU.HPARAMS,
        "beta": HParam(
            0.9,
            "EMA factor: U_ema = beta U_ema + (1 - beta) U, started at a sample's first score (A8)",
            minimum=0.0,
            maximum=1.0,
            search=Choice((0.8, 0.9, 0.95)),
        ),
        "ema_normalize": HParam(
            True,
            "divide each call's scores by their median before averaging, so that the "
            "drift of C's scale over training does not let one epoch dominate (A8)",
        ),
    }

    def _smooth(self, scores: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        beta = self.hparams["beta"]
        if self.hparams["ema_normalize"]:
            scores = scores / scores.quantile(0.5).abs().clamp_min(1e-30)
        current = scores.double().cpu().tolist()
        smoothed = []
        for row, value in zip(rows.tolist(), current):
            previous = self.ema.get(row)
            self.ema[row] = value if previous is None else beta * previous + (1 - beta) * value
            smoothed.append(self.ema[row])
        return torch.tensor(smoothed, dtype=torch.float32, device=scores.device)


# A D_u loss ratio within 0.1 % of 1 counts as "did nothing": the old fixed step moved it by that much.
_MEASURABLE = 1e-3


def _inaction(metrics: dict[str, float], name: str) -> str:
    """Why a call changed nothing, in words that name the hyperparameter to change."""
    if not metrics.get("unlearn_samples"):
        return f"the unlearning set D_u is empty (lower {name}.k; with {name}.score_scale=linear, set it to log)"
    if metrics.get("channels") == 0:
        return f"no domain-specific channel was selected (lower {name}.k)"
    return (
        f"the D_u loss rose only x{metrics.get('unlearn_loss_rise', 1.0):.4f} (raise {name}.target_rise or "
        f"{name}.max_val_drop, or use {name}.ascent=calibrated)"
    )
