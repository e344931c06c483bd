"""Unlearning methods: SURE and the baselines it is compared with.

Every method is an ``nn.Module`` that owns the timm model being unlearned (``self.model``) plus any training-only
parts (SURE's domain classifier), and whose ``forward`` turns one step's named minibatches into a loss. The recipe
wraps the whole method in DDP, so every forward (several per step for SURE) goes through the wrapper and
gradients are synchronised across processes. Only ``self.model`` is ever exported: the domain classifier never
reaches the published weights.

``retrain`` (the gold standard: train from scratch on the retain set with the source run's own recipe) is not a
module here; the recipe runs the source run's DG algorithm for it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms import HParam
from ..errors import DGZooError, suggest
from ..models import classifier, features
from ..registry import Registry

Batches = dict[str, tuple[torch.Tensor, torch.Tensor]]


class GradientReversal(torch.autograd.Function):
    """DANN's gradient reversal layer: the identity forward, gradient multiplied by ``-scale`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x`` unchanged; in the backward pass, whatever flows into ``x`` is reversed and scaled by ``scale``."""
    return GradientReversal.apply(x, scale)


def dann_ramp(progress: float) -> float:
    """DANN's schedule 2 / (1 + exp(-10 p)) - 1: from 0 at the start to ~1 at the end of training."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


BN_MODES = ("batch", "train")
BN_HELP = (
    "BatchNorm on forget/validation minibatches, which hold one class or domain only: 'batch' normalises "
    "them with their own statistics but leaves the running statistics to the retain minibatches; 'train' "
    "is plain train mode, whose running statistics then drift towards the forget set's and cost accuracy "
    "everywhere (the paper does not say)"
)


@contextlib.contextmanager
def batchnorm_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Within the block, BatchNorm layers of ``model`` leave their running statistics alone if ``mode == 'batch'``."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if mode == "batch" else []
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: normalise by the batch, keep the statistics
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum


class UnlearningMethod(nn.Module):
    """Base class: set ``name``, ``title``, ``citation``, ``HPARAMS``, ``batches`` and implement ``forward``."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    HPARAMS: ClassVar[dict[str, HParam]] = {}
    # A method that is plain training of the source model on the retain set names the training algorithm here; it
    # then runs on dgzoo's training loop instead of forward().
    training_algorithm: ClassVar[str | None] = None

    def __init__(self, model: nn.Module, num_classes: int, hparams: dict[str, Any]):
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.hparams = hparams

    @classmethod
    def resolve_hparams(cls, hparams: dict[str, Any], scenario: str) -> dict[str, Any]:
        """Replace ``auto`` hyperparameters by what they mean for a forget ``scenario`` (see ForgetSpec)."""
        return dict(hparams)

    def batches(self) -> tuple[str, ...]:
        """The named minibatches each step needs, among ``retain``, ``forget`` and ``validation``."""
        raise NotImplementedError

    def forward(self, batches: Batches, progress: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise at training progress ``progress`` in [0, 1), and detached metrics."""
        raise NotImplementedError

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups (methods with extra modules give them their own learning rate)."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": lr}]


METHODS: Registry[type[UnlearningMethod]] = Registry(
    "unlearning method", describe=lambda cls: f"{cls.__module__}.{cls.__qualname__}"
)


def register_method(cls: type[UnlearningMethod], replace: bool = False) -> type[UnlearningMethod]:
    """Class decorator: make an unlearning method available by its ``name``. A name already taken is refused unless
    ``replace=True`` (``register_method(MySure, replace=True)``): replacing one silently would change what every
    later ``--method NAME`` runs."""
    METHODS.add(cls.name, cls, replace)
    return cls


_GOLATKAR = """@inproceedings{golatkar2020eternal,
  title={Eternal Sunshine of the Spotless Net: Selective Forgetting in Deep Networks},
  author={Golatkar, Aditya and Achille, Alessandro and Soatto, Stefano},
  booktitle={CVPR}, year={2020}}"""


@register_method
class SURE(UnlearningMethod):
    """Selective Unlearning via Representation Erasure (Sepahvand et al., ICLR 2025).

    The forget set and a validation set of unseen images are two domains. A domain classifier G_d learns to tell
    their penultimate features apart; the features reach it through a gradient reversal layer, so the encoder
    receives the *reversed* gradient and learns to make the forget set indistinguishable from unseen data.
    Cross-entropy on the retain set keeps the model accurate. One joint step per minibatch (DANN style)::

        L = CE(G_y(G_f(x_r)), y_r) + BCE(G_d(R_lambda(G_f([x_f; x_v]))), [1; 0])

    The paper's appendix (its exact objective and hyperparameters) was not available; everything it leaves open
    here is a hyperparameter, with the research note's proposal as default.
    """

    name = "sure"
    title = "SURE (Selective Unlearning via Representation Erasure)"
    citation = """@inproceedings{sepahvand2025selective,
  title={Selective Unlearning via Representation Erasure Using Domain Adversarial Training},
  author={Sepahvand, Nazanin Mohammadi and Triantafillou, Eleni and Larochelle, Hugo and Precup, Doina and
          Clark, James J. and Roy, Daniel M. and Dziugaite, Gintare Karolina},
  booktitle={ICLR}, year={2025}}"""
    HPARAMS = {
        "lambda": HParam(
            1.0,
            "weight of the reversed domain-classifier gradient in the encoder (DANN's lambda); "
            "the paper tuned it by Bayesian optimisation, the research note proposes a constant",
        ),
        "lambda_schedule": HParam(
            "constant",
            "constant lambda, or DANN's ramp 2/(1+exp(-10p))-1 over training; whether SURE ramps is unknown",
            choices=("constant", "dann"),
        ),
        "disc_hidden": HParam(
            256,
            "hidden width of the domain classifier MLP on penultimate features "
            "(512-256-1 in the research note for ResNet-18); 0 = a linear classifier",
        ),
        "disc_lr_scale": HParam(
            1.0,
            "the domain classifier's learning rate as a multiple of --lr (the paper "
            "tuned its learning rates; one shared rate is the plain DANN reading)",
        ),
        "validation": HParam(
            "auto",
            "SURE's second domain: 'matched' = unseen images of the forget set's classes "
            "and domains (the paper's 'same distribution'), 'retained' = unseen images of "
            "the classes kept, 'all' = every unseen image; 'auto' = retained for "
            "full-class forgetting, matched otherwise",
            choices=("auto", "matched", "retained", "all"),
        ),
        "forget_bn": HParam(
            "auto",
            "how BatchNorm treats the forget + validation batch. 'joint': one forward "
            "with the retain batch, as DANN feeds source and target together; otherwise a "
            "forward of its own, and " + BN_HELP + ". 'auto' = 'train' when the validation "
            "set mixes classes (retained/all), 'batch' when it matches a single-class forget "
            "set (measured on rotated-digits, docs/unlearning.md)",
            choices=("auto", "joint", *BN_MODES),
        ),
    }

    @classmethod
    def resolve_hparams(cls, hparams: dict[str, Any], scenario: str) -> dict[str, Any]:
        """``validation=auto``: unseen images of the kept classes for full-class forgetting, of the forget set's
        classes and domains otherwise. ``forget_bn=auto``: 'train' when that validation set mixes classes, 'batch'
        when the forget + validation batch is a single class or domain."""
        resolved = dict(hparams)
        if resolved["validation"] == "auto":
            resolved["validation"] = "retained" if scenario == "full-class" else "matched"
        if resolved["forget_bn"] == "auto":
            resolved["forget_bn"] = "batch" if resolved["validation"] == "matched" else "train"
        return resolved

    def __init__(self, model: nn.Module, num_classes: int, hparams: dict[str, Any]):
        if "auto" in (hparams["validation"], hparams["forget_bn"]):
            raise ValueError("resolve SURE's 'auto' hyperparameters with SURE.resolve_hparams(hparams, scenario)")
        super().__init__(model, num_classes, hparams)
        width = model.num_features
        hidden = hparams["disc_hidden"]
        self.discriminator = (
            nn.Linear(width, 1)
            if hidden == 0
            else nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        )

    def batches(self) -> tuple[str, ...]:
        return ("retain", "forget", "validation")

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return super().param_groups(lr) + [
            {"params": list(self.discriminator.parameters()), "lr": lr * self.hparams["disc_lr_scale"]}
        ]

    def reversal_scale(self, progress: float) -> float:
        ramp = dann_ramp(progress) if self.hparams["lambda_schedule"] == "dann" else 1.0
        return self.hparams["lambda"] * ramp

    def domain_loss(self, z: torch.Tensor, num_forget: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """BCE of the domain classifier on reversed features ``z`` (forget rows first, labelled 1; then validation,
        labelled 0), and the classifier's accuracy."""
        target = torch.cat([z.new_ones(num_forget), z.new_zeros(len(z) - num_forget)])
        logits = self.discriminator(grad_reverse(z, scale)).squeeze(1)
        accuracy = ((logits > 0).float() == target).float().mean()
        return F.binary_cross_entropy_with_logits(logits, target), accuracy.detach()

    def forward(self, batches: Batches, progress: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        (x_r, y_r), x_f, x_v = batches["retain"], batches["forget"][0], batches["validation"][0]
        # Forget and validation images always share a batch, so batch statistics cannot tell the domains apart.
        mode = self.hparams["forget_bn"]
        if mode == "joint":
            z = features(self.model, torch.cat([x_r, x_f, x_v]))
            z_retain, z_pair = z[: len(x_r)], z[len(x_r) :]
        else:
            z_retain = features(self.model, x_r)
            with batchnorm_mode(self.model, mode):
                z_pair = features(self.model, torch.cat([x_f, x_v]))
        retain_loss = F.cross_entropy(classifier(self.model)(z_retain), y_r)
        scale = self.reversal_scale(progress)
        domain_loss, domain_acc = self.domain_loss(z_pair, len(x_f), scale)
        loss = retain_loss + domain_loss
        return loss, {
            "loss": loss.detach(),
            "retain_loss": retain_loss.detach(),
            "domain_loss": domain_loss.detach(),
            "domain_acc": domain_acc,
            "lambda": torch.tensor(scale),
        }


@register_method
class Finetune(UnlearningMethod):
    """Fine-tune on the retain set only, relying on catastrophic forgetting of the forget set."""

    name = "finetune"
    title = "Fine-tuning on the retain set"
    citation = _GOLATKAR
    training_algorithm = "erm"  # cross-entropy on the retain set, on the training loop


class ForgetSetMethod(UnlearningMethod):
    """A loss on the forget set, plus ``retain_weight`` x cross-entropy on the retain set when it is non-zero."""

    def batches(self) -> tuple[str, ...]:
        return ("forget", "retain") if self.hparams["retain_weight"] else ("forget",)

    def forget_loss(self, x_f: torch.Tensor, y_f: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The method's loss on a forget batch and its metrics."""
        raise NotImplementedError

    def forward(self, batches: Batches, progress: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with batchnorm_mode(self.model, self.hparams["forget_bn"]):
            loss, metrics = self.forget_loss(*batches["forget"])
        if self.hparams["retain_weight"]:
            x_r, y_r = batches["retain"]
            retain_loss = F.cross_entropy(self.model(x_r), y_r)
            loss = loss + self.hparams["retain_weight"] * retain_loss
            metrics["retain_loss"] = retain_loss.detach()
        return loss, {"loss": loss.detach(), **metrics}


@register_method
class GradientAscent(ForgetSetMethod):
    """Gradient ascent on the forget set (NegGrad): maximise its cross-entropy."""

    name = "gradient_ascent"
    title = "Gradient ascent on the forget set (NegGrad)"
    citation = _GOLATKAR
    HPARAMS = {
        "retain_weight": HParam(
            0.0,
            "weight of gradient descent on the retain set alongside the ascent: 0 is plain "
            "gradient ascent (NegGrad), 1 is NegGrad+",
        ),
        "forget_bn": HParam("batch", BN_HELP, choices=BN_MODES),
    }

    def forget_loss(self, x_f: torch.Tensor, y_f: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        forget_loss = F.cross_entropy(self.model(x_f), y_f)
        return -forget_loss, {"forget_loss": forget_loss.detach()}


@register_method
class RandomLabels(ForgetSetMethod):
    """Train the forget set towards uniformly drawn wrong labels, with descent on the retain set."""

    name = "random_labels"
    title = "Random labels on the forget set"
    citation = """@inproceedings{graves2021amnesiac,
  title={Amnesiac Machine Learning},
  author={Graves, Laura and Nagisetty, Vineel and Ganesh, Vijay},
  booktitle={AAAI}, year={2021}}"""
    HPARAMS = {
        "retain_weight": HParam(
            1.0,
            "weight of cross-entropy on the retain set alongside the random labels "
            "(1 as in SalUn's RL baseline; 0 = relabelled forget set only)",
        ),
        "forget_bn": HParam("batch", BN_HELP, choices=BN_MODES),
    }

    def forget_loss(self, x_f: torch.Tensor, y_f: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # A wrong label for every image: the true one shifted by 1..C-1, uniformly.
        wrong = (y_f + torch.randint(1, self.num_classes, y_f.shape, device=y_f.device)) % self.num_classes
        loss = F.cross_entropy(self.model(x_f), wrong)
        return loss, {"relabelled_loss": loss.detach()}


METHOD_CHOICES = (*METHODS, "retrain")  # the built-in methods, for the command line's choices
RETRAIN_TITLE = "Retraining from scratch on the retain set (gold standard)"


def resolve_method_hparams(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """Fill and type-check a method's hyperparameters; unknown keys are one-line errors naming the valid ones."""
    known = (*METHODS, "retrain")  # the live registry: methods added with register_method count too
    if method not in known:
        raise DGZooError(
            f"unknown unlearning method '{method}'{suggest(method, known)}; choose one of: {', '.join(known)}"
        )
    declared = METHODS[method].HPARAMS if method in METHODS else {}
    if method == "retrain" and given:
        raise DGZooError(
            "--hparams do not apply to --method retrain: it repeats the source run's own recipe on the retain set"
        )
    resolved = {key: h.default for key, h in declared.items()}
    for raw_key, value in given.items():
        namespace, _, key = str(raw_key).rpartition(".")
        if namespace not in ("", method) or key not in declared:
            raise DGZooError(
                f"unknown hparam '{raw_key}' for {method}{suggest(key, declared)}; "
                f"valid: {', '.join(sorted(declared)) or 'none'}"
            )
        resolved[key] = declared[key].coerce(value, str(raw_key))
    return resolved
