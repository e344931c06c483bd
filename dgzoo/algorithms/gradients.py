"""The per-domain gradient engine shared by every gradient-manipulating algorithm.

Given a model and K per-domain minibatches, :func:`per_domain_gradients` returns a ``[K, P]`` matrix whose row
``k`` is the flattened gradient of domain ``k``'s mean cross-entropy, averaged across processes, without
touching ``.grad``. :meth:`FlatParams.assign_grad` writes one combined ``[P]`` gradient back into ``.grad`` so
the algorithm's optimizer can step. Because the per-domain gradients are already averaged across processes,
that write-back needs no further synchronisation.

Speed. The physical floor is one forward and one backward over the step's images, what ERM pays. Two paths
compute the K gradients:

- ``"loop"`` (the default and the reference): one forward and one ``autograd.grad`` per domain, each gradient
  copied into its row of the ``[K, P]`` matrix. Pass ``out=`` a reused buffer: a fresh one (134 MB for ResNet-18
  and K = 3) costs more in page faults than the copies. From 64 px up a ResNet-18 step is then at the floor; at
  32 px K separate passes cost 1.3 pooled ones on CPU (weight-bound deep layers), and the copies add ~0.1
  (``benchmarks/results/gradient_step.md``).
- ``"vmap"``: ``torch.func.vmap(grad(...))`` over the domain axis with ``functional_call``, i.e. one batched
  forward and backward for all domains. It removes K-1 sets of per-layer calls, which may pay on accelerators
  where launch overheads dominate; on CPU it measured 1.5-2x slower than the loop, for ResNet-18 and the tiny
  test_resnet alike (vmap turns K weight gradients into one grouped convolution). Results equal the loop's within float
  tolerance, including the BatchNorm running statistics. It needs equal batch sizes and full precision
  (vmap's BatchNorm rule rejects a bf16 input with float32 statistics).

BatchNorm. Each domain is normalised with its own batch statistics (one forward per domain, as DomainBed's
per-domain algorithms do), and a training-mode BatchNorm updates its running statistics once per domain, in
domain order. Frozen BatchNorm (``freeze_bn``, eval-mode layers) uses and keeps its running statistics.

Distributed. Every process computes the gradients of its share of each domain's batch; the ``[K, P]`` matrix
and the losses are then averaged across processes, so every process compares and combines the same global
per-domain gradients (equal to one process on the global batch, up to BatchNorm's per-process batch statistics).

Mixed precision. Forward passes run under ``runtime.autocast()``; parameters and their gradients stay float32,
so bf16 needs nothing more (loop path). fp16 needs loss scaling, whose scaler lives in the optimizer wrapper and
would unscale gradients written back here a second time, so :func:`check_precision` refuses fp16 with a
one-line error pointing to bf16.

Single-source training. When an algorithm's "domains" are K augmented views of the one source domain,
:class:`RandAugmentViews` makes the views and :func:`split_views` turns a step's ``[B, K, C, H, W]`` minibatches
into K pseudo-domains. :class:`DomainGradientAlgorithm` bundles all of the above for algorithms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from ..errors import DGZooError
from ..hparams import HParam
from .base import Minibatches, Recipe, UpdateHost
from .runtime import Runtime

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GRADIENT_METHODS = ("loop", "vmap")
_GRAM_CHUNK = 1 << 16  # float32 partial sums over 65k entries, accumulated in float64: ~1e-6 relative error


class FlatParams:
    """A fixed list of trainable tensors seen as one flat vector (DGvGS's whole-model flattening)."""

    def __init__(self, params: Iterable[nn.Parameter]):
        self.tensors = [p for p in params if p.requires_grad]
        self.numels = [p.numel() for p in self.tensors]
        self.numel = sum(self.numels)

    @classmethod
    def of(cls, module: nn.Module) -> FlatParams:
        return cls(module.parameters())

    def flatten(self, tensors: Sequence[torch.Tensor | None], out: torch.Tensor | None = None) -> torch.Tensor:
        """Concatenate per-tensor values (None = zeros, for parameters a loss does not reach) into ``[P]``.

        With ``out`` (a float ``[P]`` tensor, e.g. a row of a reused ``[K, P]`` buffer) the values are copied
        straight into it, which avoids allocating a new vector.
        """
        if out is None:
            return torch.cat(
                [
                    (t if t is not None else torch.zeros_like(p)).reshape(-1).float()
                    for t, p in zip(tensors, self.tensors)
                ]
            )
        for chunk, t in zip(out.split(self.numels), tensors):
            if t is None:
                chunk.zero_()
            else:
                chunk.copy_(t.reshape(-1))
        return out

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """View a ``[P]`` vector as tensors shaped like the parameters."""
        return [chunk.view_as(p) for chunk, p in zip(flat.split(self.numels), self.tensors)]

    def assign_grad(self, flat: torch.Tensor) -> None:
        """Set every parameter's ``.grad`` from a ``[P]`` vector (cast to the parameter's dtype)."""
        for p, g in zip(self.tensors, self.split(flat)):
            p.grad = g.to(p.dtype).clone()

    def values(self) -> torch.Tensor:
        """The current parameter values as one ``[P]`` vector."""
        return torch.cat([p.detach().reshape(-1).float() for p in self.tensors])

    def empty(self, *leading: int) -> torch.Tensor:
        """An uninitialised float32 ``[*leading, P]`` tensor on the parameters' device (for ``out=`` buffers)."""
        return torch.empty(*leading, self.numel, device=self.tensors[0].device)


def per_domain_gradients(
    module: nn.Module,
    minibatches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    params: FlatParams,
    runtime: Runtime | None = None,
    loss_fn: LossFn = F.cross_entropy,
    *,
    out: torch.Tensor | None = None,
    method: str = "loop",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(grads [K, P], losses [K])``: each domain's mean-loss gradient, averaged across processes.

    ``module`` is the bare model (not the DDP wrapper: the averaging here replaces DDP's). ``out``, a float32
    ``[K, P]`` tensor, receives the gradients instead of a new allocation (reuse one across steps for speed;
    it is overwritten). ``method`` is ``"loop"`` (reference: one forward/backward per domain) or ``"vmap"``
    (one vectorised forward/backward over the domain axis; needs equal batch sizes), see the module docstring.
    ``.grad`` is never touched.
    """
    runtime = runtime or Runtime()
    k = len(minibatches)
    if out is None:
        out = params.empty(k)
    elif out.shape != (k, params.numel) or out.dtype != torch.float32:
        raise ValueError(
            f"out must be a float32 tensor of shape {(k, params.numel)}, got {tuple(out.shape)} {out.dtype}"
        )
    if method == "loop":
        losses = _loop_gradients(module, minibatches, params, runtime, loss_fn, out)
    elif method == "vmap":
        losses = _vmap_gradients(module, minibatches, params, runtime, loss_fn, out)
    else:
        raise ValueError(f"unknown per-domain gradient method {method!r}; use one of {GRADIENT_METHODS}")
    runtime.all_reduce_mean(out)
    runtime.all_reduce_mean(losses)
    return out, losses


def _loop_gradients(
    module: nn.Module,
    minibatches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    params: FlatParams,
    runtime: Runtime,
    loss_fn: LossFn,
    out: torch.Tensor,
) -> torch.Tensor:
    losses = torch.empty(len(minibatches), device=out.device)
    for k, (x, y) in enumerate(minibatches):
        with runtime.autocast():
            loss = loss_fn(module(x), y)
        params.flatten(torch.autograd.grad(loss, params.tensors, allow_unused=True), out=out[k])
        losses[k] = loss.detach().float()
    return losses


def _vmap_gradients(
    module: nn.Module,
    minibatches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    params: FlatParams,
    runtime: Runtime,
    loss_fn: LossFn,
    out: torch.Tensor,
) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    if len({x.shape for x, _ in minibatches}) != 1:
        raise ValueError("method='vmap' needs minibatches of equal shape; use method='loop'")
    if _autocast_dtype(runtime) is not None:
        raise ValueError(
            "method='vmap' does not support mixed precision (vmap's BatchNorm rule rejects a "
            "low-precision input with float32 statistics); use method='loop'"
        )
    k = len(minibatches)
    names = {id(p): name for name, p in module.named_parameters()}
    weights = {names[id(p)]: p.detach() for p in params.tensors}
    norms = [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]
    # One copy of the running statistics per domain, updated in place inside vmap with momentum 1, so copy k ends
    # up holding domain k's batch statistics; the K updates are then replayed in domain order, as the loop makes them.
    before = {f"{n}.{s}": b.detach().clone() for n, m in norms for s, b in m.named_buffers(recurse=False)}
    stats = {key: value.unsqueeze(0).repeat(k, *[1] * value.dim()) for key, value in before.items()}
    momenta = [m.momentum for _, m in norms]

    def domain_loss(w: dict[str, torch.Tensor], s: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        logits = functional_call(module, (w, s), (x,), strict=False)
        loss = loss_fn(logits, y)
        return loss, loss.detach()

    xs = torch.stack([x for x, _ in minibatches])
    ys = torch.stack([y for _, y in minibatches])
    try:
        for _, m in norms:
            m.momentum = 1.0
        grads, losses = vmap(grad(domain_loss, has_aux=True), in_dims=(None, 0, 0, 0), randomness="different")(
            weights, stats, xs, ys
        )
    finally:
        for (_, m), momentum in zip(norms, momenta):
            m.momentum = momentum
    for p, chunk in zip(params.tensors, out.split(params.numels, dim=1)):
        chunk.copy_(grads[names[id(p)]].reshape(k, -1))
    with torch.no_grad():
        for name, m in norms:
            if not m.training:  # eval mode (or frozen by a forward pre-hook): statistics were used, not updated
                continue
            count = before.get(f"{name}.num_batches_tracked")
            for stat in ("running_mean", "running_var"):
                getattr(m, stat).copy_(
                    _replay_updates(before[f"{name}.{stat}"], stats[f"{name}.{stat}"], m.momentum, count)
                )
            if count is not None:
                m.num_batches_tracked.copy_(count + k)
    return losses.float()


def _replay_updates(
    start: torch.Tensor, batch_stats: torch.Tensor, momentum: float | None, count: torch.Tensor | None
) -> torch.Tensor:
    """A running statistic after BatchNorm's updates with each of the K batch statistics, in order.

    The update is BatchNorm's: an exponential average with ``momentum``, or with None the cumulative average
    over the ``count`` batches seen before plus these.
    """
    value = start.clone()
    for i, stat in enumerate(batch_stats):
        factor = momentum if momentum is not None else 1.0 / (int(count or 0) + 1 + i)
        value = (1.0 - factor) * value + factor * stat
    return value


def _autocast_dtype(runtime: Runtime) -> torch.dtype | None:
    """The low-precision dtype of ``runtime.autocast()``, or None when it does not autocast."""
    device = runtime.device.type
    with runtime.autocast():
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def gram(grads: torch.Tensor) -> torch.Tensor:
    """The ``[K, K]`` float64 Gram matrix ``grads @ grads.T`` of a ``[K, P]`` matrix.

    Accumulated in float64 over chunks of the parameter axis: a single float32 dot product over millions of
    entries is only good to about 1e-3, which matters once residuals that nearly cancel are compared.
    """
    total = torch.zeros(grads.shape[0], grads.shape[0], dtype=torch.float64, device=grads.device)
    for chunk in grads.split(_GRAM_CHUNK, dim=1):
        total += (chunk @ chunk.T).double()
    return total


def pairwise_cosine(grads: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The ``[K, K]`` matrix of cosine similarities between the rows of ``grads``."""
    g = gram(grads)
    norms = g.diagonal().sqrt().clamp_min(eps)
    return (g / norms[:, None] / norms[None, :]).to(grads.dtype)


def vector_norm(vector: torch.Tensor) -> float:
    """The Euclidean norm of a ``[P]`` vector, accumulated in float64 as in :func:`gram`."""
    return math.sqrt(max(float(gram(vector[None])[0, 0]), 0.0))


def match_norm(direction: torch.Tensor, norm: float) -> float:
    """Rescale ``direction`` in place to Euclidean norm ``norm`` (ERM's gradient's); return the factor applied.

    A zero direction stays zero (the factor returned is then 0: there is nothing to rescale).
    """
    current = vector_norm(direction)
    if current == 0.0:
        return 0.0
    direction.mul_(norm / current)
    return norm / current


def check_mixed_precision(mixed_precision: str, method: str = "loop") -> None:
    """Refuse, with a one-line DGZooError naming the fix, a ``mixed_precision`` ('no', 'bf16', 'fp16') under
    which per-domain gradients cannot be computed with the gradient path ``method``.

    fp16 is refused (its loss scaler lives in the optimizer wrapper and would unscale the written-back gradient
    a second time); bf16 is fine with the loop path, not with vmap (see :func:`per_domain_gradients`).
    """
    if mixed_precision == "fp16":
        raise DGZooError(
            "per-domain gradient algorithms do not support --mixed-precision fp16 (its loss scaler "
            "would unscale the combined gradient twice); use --mixed-precision bf16 or no"
        )
    if mixed_precision != "no" and method == "vmap":
        raise DGZooError("hparam grad_engine=vmap does not support mixed precision; use grad_engine=loop")


def check_precision(runtime: Runtime, method: str = "loop") -> None:
    """:func:`check_mixed_precision` for the precision ``runtime`` actually autocasts to."""
    check_mixed_precision(runtime.mixed_precision(), method)


# ---------------------------------------------------------------------- augmented views as domains


class RandAugmentViews:
    """Transform one image into K independent RandAugment views, each finished by ``base`` (a tensor transform).

    The data loader seeds every sample's transform, so the views are the same whatever the number of processes
    or workers, and differ from each other because each view draws its own operations.
    """

    def __init__(self, base: Callable, views: int, num_ops: int, magnitude: int):
        from ..data.transforms import ToRGB

        self.views = views
        self.augment = T.Compose([ToRGB(), T.RandAugment(num_ops=num_ops, magnitude=magnitude)])
        self.base = base

    def __call__(self, image: Any) -> list[torch.Tensor]:
        return [self.base(self.augment(image)) for _ in range(self.views)]

    def __repr__(self) -> str:
        return f"RandAugmentViews(views={self.views}, augment={self.augment}, base={self.base})"


def split_views(minibatches: Minibatches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Turn per-source ``(x [B, K, C, H, W], y)`` minibatches into K pseudo-domains, view k of every source."""
    views = minibatches[0][0].shape[1]
    y = torch.cat([y for _, y in minibatches])
    return [(torch.cat([x[:, v] for x, _ in minibatches]), y) for v in range(views)]


class DomainGradientAlgorithm(UpdateHost):
    """Base of algorithms that combine per-domain gradients (equilibrium, agr_sum, agr_rand, pcgrad).

    It decides what a domain is (the source domains, or K RandAugment views of every image when training on a
    single source, as the single-source papers do), owns a reused ``[K, P]`` gradient buffer, and computes the
    per-domain gradients with the engine above.
    """

    HPARAMS: ClassVar[dict[str, HParam]] = {
        "domains": HParam(
            "auto",
            "what a domain is: 'sources' (the source domains), 'views' (K RandAugment views "
            "of every image are K pseudo-domains), or 'auto' (views when training on one "
            "source domain, else sources)",
            choices=("auto", "sources", "views"),
        ),
        "views": HParam(3, "K, the number of RandAugment views per image in views mode (the DGE paper: 3)", minimum=2),
        "random_ops": HParam(2, "RandAugment operations per view (the DGE paper's random_ops: 2)", minimum=1),
        "magnitude": HParam(
            9, "RandAugment magnitude (torchvision's default 9 of 31 bins; the paper is silent)", minimum=0, maximum=30
        ),
        "grad_engine": HParam(
            "loop",
            "per-domain gradient path: 'loop' (one backward per domain; fastest on "
            "CPU) or 'vmap' (torch.func, one vectorised backward)",
            choices=GRADIENT_METHODS,
        ),
        "step": HParam(
            "faithful",
            "'faithful': the method's own update (a sum over domains, or K optimizer steps "
            "per iteration); 'matched': one optimizer step on the method's combined "
            "direction rescaled to the norm of the mean per-domain gradient, ERM's gradient, "
            "so that a comparison with ERM at one lr compares directions, not step sizes",
            choices=("faithful", "matched"),
        ),
    }

    def __init__(self, network: nn.Module, num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(network, num_classes, num_domains, hparams)
        self.use_views = self.uses_views(hparams, num_domains)
        self.num_gradients = hparams["views"] if self.use_views else num_domains
        self.flat = FlatParams.of(self.network)
        self._buffer: torch.Tensor | None = None

    def setup(self) -> None:
        check_precision(self.runtime, self.hparams["grad_engine"])

    @staticmethod
    def uses_views(hparams: dict[str, Any], num_sources: int) -> bool:
        """Whether the domains are augmented views (``domains=views``, or ``auto`` with one source domain)."""
        return hparams["domains"] == "views" or (hparams["domains"] == "auto" and num_sources == 1)

    @classmethod
    def check_recipe(cls, hparams: dict[str, Any], recipe: Recipe) -> None:
        check_mixed_precision(recipe.mixed_precision, hparams["grad_engine"])
        views = cls.uses_views(hparams, recipe.num_domains)
        if (hparams["views"] if views else recipe.num_domains) < 2:
            raise DGZooError(
                f"{cls.name} needs at least 2 domains to compare, got {recipe.num_domains}; train on "
                f"several source domains or use views (hparam domains=views views=3)"
            )
        if views and recipe.augment == "randaugment":
            raise DGZooError(
                f"{cls.name} already makes RandAugment views of every image; use --augment none (or "
                f"domainbed) so the views are not augmented twice"
            )

    @classmethod
    def train_transform(
        cls, preprocessing: dict[str, Any], augment: str, hparams: dict[str, Any], num_sources: int
    ) -> Callable | None:
        """In views mode, K RandAugment views of every image, each finished by the recipe's training transform."""
        if not cls.uses_views(hparams, num_sources):
            return None
        from ..data.transforms import train_transform

        return RandAugmentViews(
            train_transform(preprocessing, augment), hparams["views"], hparams["random_ops"], hparams["magnitude"]
        )

    def domains(self, minibatches: Minibatches) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The step's domains: the source minibatches, or their K views as pseudo-domains."""
        if self.use_views:
            if minibatches[0][0].dim() != 5:
                raise DGZooError(
                    f"{self.name} expects K views per image (x of shape [B, K, C, H, W]); build its "
                    f"data with {type(self).__name__}.train_transform"
                )
            return split_views(minibatches)
        return list(minibatches)

    def domain_gradients(
        self, domains: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grads [K, P], losses [K])`` of the given domains, in the reused buffer (overwritten every call)."""
        if self._buffer is None or self._buffer.shape[0] != len(domains):
            self._buffer = self.flat.empty(len(domains))
        return per_domain_gradients(
            self.network, domains, self.flat, self.runtime, out=self._buffer, method=self.hparams["grad_engine"]
        )
