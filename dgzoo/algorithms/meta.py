"""Update hosts with inner optimisation loops, from DomainBed: MLDG, Fish and TRM.

Each takes its own steps. What makes N processes equal one process on the global batch (each domain's global
batch being the processes' equal shares), up to the backbone's BatchNorm, whose batch statistics are those of
each process's share:

- MLDG computes its inner gradients with ``autograd.grad`` on a bare clone of the network and averages every one
  over processes (``runtime.all_reduce_mean``) before the clone steps and before they are accumulated into the
  outer gradient, so every clone, and the outer step, is the one of the global batch.
- Fish's inner steps are forward passes through the DDP-prepared module, whose backward averages the gradients;
  its meta step is then the same arithmetic on the same weights on every process.
- TRM's network step goes through DDP; its per-domain heads are fitted and its Hessian-vector products formed
  with gradients averaged over processes, and its domain weights ``alpha`` are updated with averaged losses.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DGZooError
from ..hparams import Choice, HParam, Uniform
from ..models import feature_dim
from .base import Metrics, Minibatches, Recipe, UpdateHost
from .erm import pooled
from .gradients import FlatParams, check_mixed_precision, check_precision
from .registry import register_algorithm
from .seeding import derive_seed, run_seed

_MLDG = """@inproceedings{li2018learning,
  title={Learning to Generalize: Meta-Learning for Domain Generalization},
  author={Li, Da and Yang, Yongxin and Song, Yi-Zhe and Hospedales, Timothy M.}, booktitle={AAAI}, year={2018}}"""
_FISH = """@inproceedings{shi2022gradient,
  title={Gradient Matching for Domain Generalization},
  author={Shi, Yuge and Seely, Jeffrey and Torr, Philip H. S. and Siddharth, N. and Hannun, Awni and Usunier,
          Nicolas and Synnaeve, Gabriel}, booktitle={ICLR}, year={2022}}"""
_TRM = """@article{xu2021learning,
  title={Learning Representations that Support Robust Transfer of Predictors},
  author={Xu, Yilun and Jaakkola, Tommi},
  journal={arXiv preprint arXiv:2110.09940}, year={2021}}"""


def _require_domains(name: str, recipe: Recipe, needed: int, why: str) -> None:
    if recipe.num_domains < needed:
        raise DGZooError(
            f"{name} needs at least {needed} source domains ({why}), got {recipe.num_domains}; train "
            f"on more source domains or use erm"
        )


# ---------------------------------------------------------------------- MLDG


def meta_train_test_pairs(num_domains: int, num_meta_test: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """DomainBed's ``split_meta_train_test``: a random permutation of the domains, whose last ``num_meta_test`` are
    meta-test domains; each meta-train domain is paired with the meta-test domains in turn (cycling), so there
    are ``num_domains - num_meta_test`` pairs (and a meta-test domain may be left unpaired)."""
    order = torch.randperm(num_domains, generator=generator).tolist()
    cut = num_domains - num_meta_test
    return list(zip(order[:cut], itertools.cycle(order[cut:])))


@register_algorithm
class MLDG(UpdateHost):
    """First-order MLDG. For every (meta-train i, meta-test j) pair of a random split of the domains, a clone of
    the network takes one step of a fresh Adam on domain i's loss (gradient ``G_i``); at the clone's new weights
    the gradient ``G_j`` of domain j's loss is taken. The network then steps once with ``sum (G_i + beta G_j) / K``
    (``K`` the number of domains); second derivatives are not computed (DomainBed's FOMAML version).

    As DomainBed: the inner optimizer is ``torch.optim.Adam`` (fresh at every pair) at the recipe's current
    learning rate and weight decay (those of the main optimizer's first group); each pair's two batches are cut to
    the smaller size; the reported loss is ``sum (L_i + beta L_j) / K``.

    Deliberate differences from DomainBed: only the clones run forward passes, so the network's BatchNorm running
    statistics become the mean of the clones' after each step (DomainBed never updates them: its backbones keep
    BatchNorm frozen, and with ``--freeze-bn`` nothing changes here either); the split is drawn from a generator
    seeded with (run seed, step), the same on every process and after a resume; the inner gradients are averaged
    over processes; fp16 mixed precision is refused (the outer gradient is written into ``.grad``, which its loss
    scaler would unscale again; bf16 works); as many source domains as ``n_meta_test`` are refused (no meta-train
    domain is left).
    """

    name = "mldg"
    title = "Meta-Learning Domain Generalization"
    paper = "Li et al., AAAI 2018"
    citation = _MLDG
    HPARAMS = {
        "mldg_beta": HParam(1.0, "weight of the meta-test gradient", minimum=0.0, search=Uniform(-1, 1, base=10)),
        "n_meta_test": HParam(2, "number of meta-test domains per step", minimum=1, search=Choice((1, 2))),
    }

    def __init__(self, network: nn.Module, num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(network, num_classes, num_domains, hparams)
        self.flat = FlatParams.of(self.network)

    @classmethod
    def check_recipe(cls, hparams: dict[str, Any], recipe: Recipe) -> None:
        check_mixed_precision(recipe.mixed_precision)
        _require_domains(
            cls.name,
            recipe,
            hparams["n_meta_test"] + 1,
            f"n_meta_test={hparams['n_meta_test']} meta-test domains and at least one meta-train one",
        )

    def setup(self) -> None:
        check_precision(self.runtime)
        self.seed = run_seed(self.runtime)

    def clone_gradient(
        self, clone: nn.Module, params: FlatParams, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flat gradient, loss)`` of the clone's cross-entropy on ``(x, y)``, both averaged over processes."""
        with self.runtime.autocast():
            loss = F.cross_entropy(clone(x), y)
        grads = torch.autograd.grad(loss, params.tensors, allow_unused=True)
        return self.runtime.all_reduce_mean(params.flatten(grads)), self.runtime.all_reduce_mean(loss.detach().float())

    def update(self, minibatches: Minibatches, step: int) -> Metrics:
        beta, k = self.hparams["mldg_beta"], len(minibatches)
        group = self.optimizer.param_groups[0]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, step))
        total = torch.zeros(self.flat.numel, device=self.flat.tensors[0].device)
        objective = 0.0
        statistics: list[list[torch.Tensor]] = []
        for i, j in meta_train_test_pairs(k, self.hparams["n_meta_test"], generator):
            (xi, yi), (xj, yj) = minibatches[i], minibatches[j]
            n = min(len(xi), len(xj))
            clone = copy.deepcopy(self.network)
            params = FlatParams.of(clone)
            inner = torch.optim.Adam(params.tensors, lr=group["lr"], weight_decay=group["weight_decay"])
            grad_i, loss_i = self.clone_gradient(clone, params, xi[:n], yi[:n])
            params.assign_grad(grad_i)
            inner.step()  # the clone is now at theta - Adam(G_i)
            grad_j, loss_j = self.clone_gradient(clone, params, xj[:n], yj[:n])
            total.add_(grad_i / k).add_(beta * grad_j / k)  # DomainBed's order of operations
            objective += float(loss_i) + beta * float(loss_j)
            statistics.append([b.detach() for b in clone.buffers()])
        self.optimizer.zero_grad(set_to_none=True)
        self.flat.assign_grad(total)
        self.optimizer.step()
        self._keep_batch_statistics(statistics)
        return {"loss": objective / k}

    @torch.no_grad()
    def _keep_batch_statistics(self, statistics: list[list[torch.Tensor]]) -> None:
        """The network's buffers become the mean of the clones' (BatchNorm running statistics; counters take the
        largest). DomainBed never updates them, since its backbones keep BatchNorm frozen at pretrained statistics;
        a network trained from scratch would otherwise be evaluated with its initial statistics."""
        for index, buffer in enumerate(self.network.buffers()):
            values = torch.stack([clone[index] for clone in statistics])
            buffer.copy_(
                values.float().mean(0).to(buffer.dtype) if buffer.is_floating_point() else values.max(0).values
            )

    def extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state.get("seed", self.seed))


# ---------------------------------------------------------------------- Fish


@register_algorithm
class Fish(UpdateHost):
    """Fish: starting from the weights ``theta``, take one step of the inner optimizer per domain, in domain order
    (weights ``theta~``), then move to ``theta + meta_lr (theta~ - theta)``, a first-order approximation of
    maximising the inner product of the domains' gradients.

    The inner optimizer is the recipe's optimizer (DomainBed: Adam at the recipe's lr and weight decay) stepping
    the network itself: as in DomainBed, where the inner Adam's state carries over from step to step and its outer
    optimizer never steps, so the inner steps on a clone and the network's own steps are the same computation. The
    meta step applies to the whole state dict, BatchNorm statistics included (integer counters truncated, as
    DomainBed's ``load_state_dict``); the reported loss is the last domain's.

    Deliberate differences from DomainBed: none in the update. An add-on that hooks the main optimizer's steps sees
    the K inner steps of every iteration, not the meta step.
    """

    name = "fish"
    title = "Fish (gradient matching)"
    paper = "Shi et al., ICLR 2022"
    citation = _FISH
    HPARAMS = {
        "meta_lr": HParam(
            0.5,
            "step size of the meta update towards the inner loop's weights",
            minimum=0.0,
            search=Choice((0.05, 0.1, 0.5)),
        )
    }

    def update(self, minibatches: Minibatches, step: int) -> Metrics:
        start = {key: value.detach().clone() for key, value in self.network.state_dict().items()}
        for x, y in minibatches:
            loss = F.cross_entropy(self.call("predict", x), y)
            self.backward_step(loss)
        meta_lr = self.hparams["meta_lr"]
        with torch.no_grad():
            for key, value in self.network.state_dict().items():  # views of the live tensors
                value.copy_(start[key] + meta_lr * (value - start[key]))
        return {"loss": loss.item()}


# ---------------------------------------------------------------------- TRM


def linear_loss(features: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a linear head given as tensors (so gradients can be taken with respect to them)."""
    return F.cross_entropy(F.linear(features, weight, bias), y)


@register_algorithm
class TRM(UpdateHost):
    """Transfer Risk Minimization: for the first ``iters`` steps, ERM; then every step

    1. fits one linear head per domain on that domain's (detached) features: 30 steps of SGD at lr 0.1 on the
       summed per-domain losses (the heads persist from step to step; ``class_balanced`` resets their weights to
       the classifier's first);
    2. for every domain Q, with head ``w_Q``: the transfer loss ``sum_{i != Q} alpha[Q, i] L_i(w_Q)`` (how well
       Q's head transfers to the other domains) minus ``cos_lambda`` times ``v . grad_w L_Q(w_Q)``, where ``v`` is
       a Neumann-series estimate of ``H_Q^{-1} grad_w sum_i alpha[Q, i] L_i(w_Q)`` (``H_Q`` the Hessian of
       ``L_Q`` in ``w_Q``); ``alpha[Q, i]`` is raised by an exponentiated-gradient step of size ``groupdro_eta``;
    3. one step of the network on the pooled ERM loss plus the mean over Q of step 2's loss.

    ``alpha`` (rows normalised at every TRM step), the step counter and the heads are buffers or frozen
    parameters of this module, so a run resumes exactly; the heads are not exported. DomainBed's featurizer and
    classifier optimizers (two Adams at the same lr and weight decay) are the recipe's one optimizer over both.

    What DomainBed's code computes, reproduced here rather than its evident intent:

    - the Neumann estimate is ``2 v_1 + v_2 + ... + v_n`` with ``v_k = (I - H) v_{k-1}``, at most 10 terms,
      stopping once an entry exceeds 10 in magnitude (its running sum aliases ``v``, so ``v_0`` is replaced by a
      second ``v_1``);
    - ``alpha[Q, i]`` is multiplied by ``exp(eta alpha[Q, i] L_i)`` (its "loss" already carries the weight), and
      the gradient of the transfer loss sees the updated ``alpha`` (DomainBed's in-place update of the weight its
      graph saved). The reported ``trm_loss`` therefore uses the updated weights, where DomainBed's uses the old.

    Deliberate differences from DomainBed: K heads instead of K + 1 (the last one was never used); a single source
    domain is refused (nothing to transfer to; DomainBed fails once ``iters`` is reached).
    """

    name = "trm"
    title = "Transfer Risk Minimization"
    paper = "Xu & Jaakkola, arXiv 2021"
    citation = _TRM
    HPARAMS = {
        "cos_lambda": HParam(
            1e-4,
            "weight of the gradient-alignment term of the transfer risk",
            minimum=0.0,
            search=Uniform(-5, 0, base=10),
        ),
        "iters": HParam(
            200, "ERM steps before the transfer risk is added", minimum=0, search=Uniform(0, 4, base=10, integer=True)
        ),
        "groupdro_eta": HParam(
            1e-2,
            "step size of the exponentiated-gradient ascent on the transfer weights alpha",
            minimum=0.0,
            search=Uniform(-3, -1, base=10),
        ),
        "class_balanced": HParam(
            False,
            "reset every domain head's weights to the classifier's before it is fitted "
            "(DomainBed: for stability under label imbalance across domains)",
        ),
    }
    HEAD_STEPS, HEAD_LR = 30, 0.1
    NEUMANN_TERMS, NEUMANN_LIMIT = 10, 10.0

    def __init__(self, network: nn.Module, num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(network, num_classes, num_domains, hparams)
        width = feature_dim(network)
        # Fitted by hand (plain SGD has no state); frozen so that neither DDP nor the main optimizer takes them.
        self.heads = nn.ModuleList(nn.Linear(width, num_classes) for _ in range(num_domains)).requires_grad_(False)
        self.register_buffer("alpha", torch.ones(num_domains, num_domains) - torch.eye(num_domains))
        self.register_buffer("update_count", torch.zeros((), dtype=torch.long))

    @classmethod
    def check_recipe(cls, hparams: dict[str, Any], recipe: Recipe) -> None:
        _require_domains(cls.name, recipe, 2, "a domain's head is scored on the others")
        if (
            hparams["class_balanced"]
            and recipe.network is not None
            and not isinstance(recipe.network.get_classifier(), nn.Linear)
        ):
            raise DGZooError(
                "trm class_balanced=true copies the classifier's weights into the domain heads, but "
                "this backbone's classifier is not one linear layer; set class_balanced=false"
            )

    def fit_heads(self, features: list[torch.Tensor], labels: list[torch.Tensor]) -> None:
        """Step 1: SGD on every head's cross-entropy on its domain's features, gradients averaged over processes."""
        for _ in range(self.HEAD_STEPS):
            leaves = [[p.detach().requires_grad_() for p in (h.weight, h.bias)] for h in self.heads]
            loss = sum(linear_loss(f, y, w, b) for f, y, (w, b) in zip(features, labels, leaves))
            flat = FlatParams([p for pair in leaves for p in pair])
            grads = self.runtime.all_reduce_mean(flat.flatten(torch.autograd.grad(loss, flat.tensors)))
            with torch.no_grad():
                for param, grad in zip(self.heads.parameters(), flat.split(grads)):
                    param.add_(grad, alpha=-self.HEAD_LR)

    def hessian_vector(self, head: nn.Linear, features: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``H v``, ``H`` the Hessian of the head's cross-entropy in its weight (process average)."""
        weight = head.weight.detach().requires_grad_()
        (grad,) = torch.autograd.grad(linear_loss(features, y, weight, head.bias), weight, create_graph=True)
        (product,) = torch.autograd.grad(grad.reshape(-1) @ v, weight)
        return self.runtime.all_reduce_mean(product.reshape(-1))

    def neumann(self, head: nn.Linear, features: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """DomainBed's estimate of ``H^{-1} v`` (see the class docstring for its exact terms)."""
        estimate = v
        for term in range(self.NEUMANN_TERMS):
            v = v - self.hessian_vector(head, features, y, v)
            estimate = v + v if term == 0 else v + estimate
            if estimate.abs().max() > self.NEUMANN_LIMIT:  # diverging: DomainBed returns the sum so far
                break
        return estimate

    def transfer_loss(self, features: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
        """Step 2, summed over the domains Q; updates ``alpha``."""
        h, k = self.hparams, len(features)
        total = features[0].new_zeros(())
        for q in range(k):
            head = self.heads[q]
            weight = head.weight.detach().requires_grad_()
            others = [i for i in range(k) if i != q]
            (grad_q,) = torch.autograd.grad(
                linear_loss(features[q], labels[q], weight, head.bias), weight, create_graph=True
            )
            losses = torch.stack([linear_loss(features[i], labels[i], weight, head.bias) for i in others])
            weights = self.alpha[q, others]  # advanced indexing: a copy, safe from the update below
            (grad_p,) = torch.autograd.grad((losses * weights).sum(), weight, retain_graph=True)
            v = self.neumann(
                head, features[q].detach(), labels[q], self.runtime.all_reduce_mean(grad_p.reshape(-1).detach().clone())
            )
            with torch.no_grad():
                weighted = self.runtime.all_reduce_mean(losses.detach() * weights)
                self.alpha[q, others] = weights * torch.exp(h["groupdro_eta"] * weighted)
            total = total + (losses * self.alpha[q, others]).sum() - h["cos_lambda"] * (v @ grad_q.reshape(-1))
        return total

    def update(self, minibatches: Minibatches, step: int) -> Metrics:
        x, y = pooled(minibatches)
        features, logits = self.call("features_and_logits", x)
        loss = F.cross_entropy(logits, y)
        total = loss
        if int(self.update_count) >= self.hparams["iters"]:
            if self.hparams["class_balanced"]:
                with torch.no_grad():
                    for head in self.heads:
                        head.weight.copy_(self.network.get_classifier().weight)
            self.alpha.div_(self.alpha.sum(1, keepdim=True))
            per_domain = list(features.float().split([len(b) for b, _ in minibatches]))
            labels = [b for _, b in minibatches]
            self.fit_heads([f.detach() for f in per_domain], labels)
            total = loss + self.transfer_loss(per_domain, labels) / len(minibatches)
        self.backward_step(total)
        self.update_count += 1
        return {"loss": total.item(), "nll": loss.item(), "trm_loss": total.item() - loss.item()}
