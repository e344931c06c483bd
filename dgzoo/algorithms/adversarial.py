"""Domain-adversarial feature learning: DANN and its class-conditional variant CDANN (DomainBed's ``AbstractDANN``).

A discriminator (an MLP on the penultimate features) learns to tell the source domains apart; the backbone learns
to classify while making the discriminator fail. Both are update hosts with two optimizers that take turns, as in
DomainBed: ``d_steps_per_g_step`` discriminator steps, then one generator step, counted by the ``update_count``
buffer (saved and restored with the model, so a resumed run keeps the schedule).

Multi-process: the domain cross-entropy and the gradient penalty are means over equal per-process shares, so DDP's
gradient average is the one-process gradient of the global batch. CDANN's class-balance weights use the class
counts of the global batch (all-reduced) and its weighted *sum* is scaled by the number of processes, so DDP's
average again gives the one-process gradient. BatchNorm statistics are per process (as for every method).

Two DomainBed methods of this family are not registered, because their prediction needs more than the timm network
(dgzoo exports ``self.network``, plain timm):

- ADRMX predicts with ``classifier_label_1``, a three-layer nonlinear head (DomainBed's
  ``Classifier(is_nonlinear=True)``) on the label featurizer; a plain timm model has a linear head, and swapping in
  a linear head would change the method (the remix loss also runs through that head).
- URM applies an output activation to the featurizer (``urm_generator_output``: tanh by default, or relu) at test
  time too, between the pooled features and the linear head; a plain timm model cannot hold it (relu would be a
  no-op only on backbones whose pooled features are non-negative, e.g. ResNets, not in general).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..hparams import Choice, HParam, Uniform
from ..models import feature_dim
from .base import Metrics, Minibatches, UpdateHost
from .erm import pooled
from .registry import register_algorithm

_DANN = """@article{ganin2016domain,
  title={Domain-Adversarial Training of Neural Networks},
  author={Ganin, Yaroslav and Ustinova, Evgeniya and Ajakan, Hana and Germain, Pascal and Larochelle, Hugo and
          Laviolette, Fran{\\c{c}}ois and Marchand, Mario and Lempitsky, Victor},
  journal={Journal of Machine Learning Research}, volume={17}, number={59}, pages={1--35}, year={2016}}"""
_CDANN = """@inproceedings{li2018deep,
  title={Deep Domain Generalization via Conditional Invariant Adversarial Networks},
  author={Li, Ya and Tian, Xinmei and Gong, Mingming and Liu, Yajing and Liu, Tongliang and Zhang, Kun and
          Tao, Dacheng},
  booktitle={ECCV}, year={2018}}"""


class MLP(nn.Module):
    """DomainBed's ``networks.MLP``: ``depth`` linear layers of ``width`` units (``depth - 2`` hidden ones), each but
    the last followed by dropout then ReLU."""

    def __init__(self, n_inputs: int, n_outputs: int, width: int, depth: int, dropout: float):
        super().__init__()
        self.input = nn.Linear(n_inputs, width)
        self.hiddens = nn.ModuleList([nn.Linear(width, width) for _ in range(depth - 2)])
        self.output = nn.Linear(width, n_outputs)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.dropout(self.input(x)))
        for hidden in self.hiddens:
            x = F.relu(self.dropout(hidden(x)))
        return self.output(x)


def domain_labels(minibatches: Minibatches) -> torch.Tensor:
    """The domain index of every row of the pooled batch (the i-th minibatch is domain i)."""
    return torch.cat(
        [torch.full((len(y),), i, dtype=torch.int64, device=y.device) for i, (_, y) in enumerate(minibatches)]
    )


def gradient_penalty(summed_loss: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the squared norm of the gradient of ``summed_loss`` with respect to each input row,
    differentiable (``create_graph``) so that the penalty itself can be minimised."""
    (grad,) = torch.autograd.grad(summed_loss, [inputs], create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean(0)


def discriminator_loss(
    logits: torch.Tensor,
    disc_input: torch.Tensor,
    domains: torch.Tensor,
    weights: torch.Tensor | None,
    penalty_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DomainBed's discriminator loss and its gradient penalty: the domain cross-entropy (the mean, or the
    ``weights``-weighted sum), plus ``penalty_weight`` x the mean squared norm of the gradient, with respect to the
    discriminator's input, of the *summed* cross-entropy. Returns (loss with penalty, penalty)."""
    if weights is None:
        loss = F.cross_entropy(logits, domains)
    else:
        loss = (weights * F.cross_entropy(logits, domains, reduction="none")).sum()
    if penalty_weight == 0:  # DomainBed computes it anyway; with weight 0 it changes neither loss nor gradient
        return loss, loss.new_zeros(())
    penalty = gradient_penalty(F.cross_entropy(logits, domains, reduction="sum"), disc_input)
    return loss + penalty_weight * penalty, penalty


def class_balance_weights(y: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """CDANN's per-example weights ``1 / (count[y] * C)`` from the batch's class ``counts``, with DomainBed's C: the
    width of ``one_hot(y)``, i.e. the largest label present + 1 (not the number of classes)."""
    width = int(counts.nonzero().max()) + 1
    return 1.0 / (counts[y] * width)


def is_discriminator_turn(update_count: int, d_steps_per_g_step: int) -> bool:
    """DomainBed's schedule, on the counter after its increment: with ``d`` discriminator steps per generator step,
    update ``n`` trains the discriminator when ``n mod (1 + d) < d`` (d=1: generator at 1, 3, ...; discriminator
    at 2, 4, ...)."""
    return update_count % (1 + d_steps_per_g_step) < d_steps_per_g_step


class AbstractDANN(UpdateHost):
    """Alternate discriminator and generator steps (DomainBed's ``AbstractDANN``).

    Discriminator turn: minimise ``disc_loss`` = domain cross-entropy of the discriminator on the pooled features
    (+ ``grad_penalty`` x the gradient penalty on its input). Generator turn: minimise class cross-entropy
    - ``lambda`` x ``disc_loss`` (penalty included, as DomainBed) over the backbone's parameters only.

    Differences from DomainBed, none of which changes an update:

    - DomainBed's ``lr_g`` is the recipe's ``--lr`` and its ``weight_decay_g`` the recipe's ``--weight-decay``
      (same defaults and search distributions as DomainBed's ``lr``/``weight_decay``); the ``main`` group carries
      DomainBed's ``betas=(beta1, 0.9)`` (used by Adam/AdamW, ignored by SGD). The ``discriminator`` optimizer
      is the recipe's optimizer kind (Adam in DomainBed) with ``lr_d``, ``weight_decay_d`` and the same betas; the
      recipe's learning-rate schedule drives only ``main``.
    - On discriminator turns the features are detached before the discriminator: DomainBed backpropagates into
      the backbone and discards those gradients; the discriminator's gradients are the same.
    - On generator turns the discriminator's gradients are dropped before the step (DomainBed leaves them until
      its next ``zero_grad``), so gradient clipping sees only the generator's.
    - The gradient penalty is skipped when ``grad_penalty`` is 0 (DomainBed computes and multiplies it by 0).
    - DANN has no class embeddings (DomainBed builds them for DANN too, unused but in the discriminator optimizer).
    """

    CONDITIONAL = False
    FIND_UNUSED_PARAMETERS = True  # the backbone is unused on discriminator turns
    HPARAMS = {
        "lambda": HParam(
            1.0,
            "weight of the negated discriminator loss in the generator loss",
            minimum=0.0,
            search=Uniform(-2, 2, base=10),
        ),
        "lr_d": HParam(
            5e-5,
            "learning rate of the discriminator (and CDANN's class embeddings)",
            minimum=0.0,
            search=Uniform(-5, -3.5, base=10),
            small_default=1e-3,
            small_search=Uniform(-4.5, -2.5, base=10),
        ),
        "weight_decay_d": HParam(
            0.0, "weight decay of the discriminator", minimum=0.0, search=Uniform(-6, -2, base=10)
        ),
        "d_steps_per_g_step": HParam(
            1, "discriminator steps per generator step", minimum=1, search=Uniform(0, 3, base=2, integer=True)
        ),
        "grad_penalty": HParam(
            0.0,
            "weight of the gradient penalty on the discriminator's input",
            minimum=0.0,
            search=Uniform(-2, 1, base=10),
        ),
        "beta1": HParam(
            0.5, "Adam's beta1 of both optimizers (beta2 is 0.9)", minimum=0.0, maximum=1.0, search=Choice((0.0, 0.5))
        ),
        "mlp_width": HParam(
            256, "width of the discriminator MLP", minimum=1, search=Uniform(6, 10, base=2, integer=True)
        ),
        "mlp_depth": HParam(3, "linear layers of the discriminator MLP", minimum=2, search=Choice((3, 4, 5))),
        "mlp_dropout": HParam(
            0.0, "dropout of the discriminator MLP", minimum=0.0, maximum=1.0, search=Choice((0.0, 0.1, 0.5))
        ),
    }

    def __init__(self, network: nn.Module, num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(network, num_classes, num_domains, hparams)
        width = feature_dim(network)
        self.discriminator = MLP(
            width, num_domains, self.hparams["mlp_width"], self.hparams["mlp_depth"], self.hparams["mlp_dropout"]
        )
        self.class_embeddings = nn.Embedding(num_classes, width) if self.CONDITIONAL else None
        self.register_buffer("update_count", torch.tensor([0]))

    def optimizer_groups(self) -> dict[str, list[dict[str, Any]]]:
        betas = (self.hparams["beta1"], 0.9)
        adversary = list(self.discriminator.parameters())
        if self.class_embeddings is not None:
            adversary += list(self.class_embeddings.parameters())
        return {
            "main": [{"params": [p for p in self.network.parameters() if p.requires_grad], "betas": betas}],
            "discriminator": [
                {
                    "params": adversary,
                    "lr": self.hparams["lr_d"],
                    "weight_decay": self.hparams["weight_decay_d"],
                    "betas": betas,
                }
            ],
        }

    def class_weights(self, y: torch.Tensor) -> torch.Tensor | None:
        """Per-example weights of the discriminator loss (None: its plain mean)."""
        return None

    def adversarial_losses(self, minibatches: Minibatches, generator_turn: bool) -> dict[str, torch.Tensor]:
        """One pass over the pooled batch: the discriminator loss (with penalty) and, on a generator turn, the class
        loss. Run through :meth:`call` so DDP synchronises the gradients."""
        x, y = pooled(minibatches)
        domains = domain_labels(minibatches)
        features = self.featurize(x)
        disc_input = features if generator_turn else features.detach().requires_grad_()
        if self.class_embeddings is not None:
            disc_input = disc_input + self.class_embeddings(y)
        disc_loss, penalty = discriminator_loss(
            self.discriminator(disc_input), disc_input, domains, self.class_weights(y), self.hparams["grad_penalty"]
        )
        losses = {"disc_loss": disc_loss, "penalty": penalty}
        if generator_turn:
            losses["class_loss"] = F.cross_entropy(self.classify(features), y)
        return losses

    def update(self, minibatches: Minibatches, step: int) -> Metrics:
        self.update_count += 1
        if is_discriminator_turn(int(self.update_count.item()), self.hparams["d_steps_per_g_step"]):
            losses = self.call("adversarial_losses", minibatches, False)
            self.backward_step(losses["disc_loss"], "discriminator")
            return {"disc_loss": float(losses["disc_loss"].detach()), "penalty": float(losses["penalty"].detach())}
        losses = self.call("adversarial_losses", minibatches, True)
        gen_loss = losses["class_loss"] - self.hparams["lambda"] * losses["disc_loss"]
        main, adversary = self.optimizers["main"], self.optimizers["discriminator"]
        main.zero_grad(set_to_none=True)
        adversary.zero_grad(set_to_none=True)
        self.runtime.backward(gen_loss)
        adversary.zero_grad(set_to_none=True)  # only the generator steps on this turn
        main.step()
        return {"gen_loss": float(gen_loss.detach()), "class_loss": float(losses["class_loss"].detach())}


@register_algorithm
class DANN(AbstractDANN):
    """Domain-Adversarial Neural Networks: the discriminator sees the features alone; its loss is the mean domain
    cross-entropy."""

    name = "dann"
    title = "Domain-Adversarial Neural Networks"
    paper = "Ganin et al., JMLR 2016"
    citation = _DANN


@register_algorithm
class CDANN(AbstractDANN):
    """Conditional DANN: the discriminator sees the features plus a learned embedding of the class, and its
    cross-entropy is class-balanced (weights ``1 / (count[y] * C)``, summed), so that the features are made
    domain-invariant within each class."""

    name = "cdann"
    title = "Conditional Domain-Adversarial Neural Networks"
    paper = "Li et al., ECCV 2018"
    citation = _CDANN
    CONDITIONAL = True

    def class_weights(self, y: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(y, minlength=self.num_classes).float()
        processes = self.runtime.num_processes
        counts = self.runtime.all_reduce_mean(counts) * processes  # the global batch's counts
        # The weighted sum is a global sum: each process's share x N, since DDP averages the gradients.
        return class_balance_weights(y, counts) * processes
