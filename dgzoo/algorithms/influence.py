"""Influence-function estimates behind IU's unlearning score (Koh & Liang, 2017).

For every training sample ``x`` IU needs two numbers (research note ``iu.md`` §3.1 and A2):

* the *generalisation score* ``G_x = sum_z grad L(z)^T H^-1 grad L(x)`` over the source validation set ``z``:
  the predicted rise of the validation loss if ``x`` were removed (higher = more helpful);
* the *complexity score* ``C_x = ||H^-1 grad L(x)||``: how far the parameters would move without ``x``.

``H`` is the Hessian of the mean training loss, damped as ``H + damping * I``. Two estimators:

* :func:`kfac_head_influence` (``iu.mode=fast``): parameters = the linear classifier head, Hessian = its
  Kronecker factorisation ``A (x) B`` (features second moment (x) softmax curvature), damped exactly in its
  eigenbasis. Closed form per sample, so the cost is one forward pass to get features plus two small
  eigendecompositions.
* :func:`lissa` (``iu.mode=faithful``): LiSSA (Agarwal et al., 2017) on any parameter set of the network, with
  exact Hessian-vector products on stochastic minibatches, one inverse-HVP per training sample, vectorised with
  ``torch.func`` through :class:`FunctionalLoss`. This is the paper's estimator; its cost is what the paper's
  Table 11 reports (hours per epoch on DomainNet).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from ..errors import DGZooError


def lissa(
    hvp: Callable[[torch.Tensor, int], torch.Tensor],
    vectors: torch.Tensor,
    depth: int,
    scale: float,
    damping: float,
    repeats: int = 1,
) -> torch.Tensor:
    """Approximate ``(H + damping I)^-1 v`` for every row ``v`` of ``vectors`` ``[m, P]`` with LiSSA.

    The recursion ``u_0 = v, u_{j+1} = v + (I - (H_j + damping I) / scale) u_j`` (``H_j`` the Hessian of
    minibatch ``j``, supplied as ``hvp(u, j) -> H_j u`` row-wise) converges to ``scale (H + damping I)^-1 v``
    when ``scale`` exceeds the largest eigenvalue of ``H + damping I``; the estimate is ``u_depth / scale``,
    averaged over ``repeats`` independent recursions. Raises DGZooError when the recursion diverges, since
    the scores would then be meaningless.
    """
    estimate = torch.zeros_like(vectors)
    for r in range(repeats):
        u = vectors.clone()
        for j in range(depth):
            u = vectors + u - (hvp(u, r * depth + j) + damping * u) / scale
        if not torch.isfinite(u).all() or u.norm() > 1e6 * scale * vectors.norm().clamp_min(1e-30):
            raise DGZooError(
                f"LiSSA diverged (iu.lissa_scale={scale:g} is below the Hessian's largest eigenvalue "
                f"or the Hessian has large negative curvature); raise iu.lissa_scale or iu.damping"
            )
        estimate += u / scale
    return estimate / repeats


def largest_eigenvalue(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    numel: int,
    iterations: int = 20,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> float:
    """Power-iteration estimate of the largest-magnitude eigenvalue of the matrix behind ``hvp`` (``[1, P]`` rows).

    LiSSA needs a scale above it; the estimate approaches it from below, so callers add a margin. The start
    vector comes from a seeded generator, so every process gets the same estimate.
    """
    v = torch.randn(1, numel, generator=torch.Generator().manual_seed(seed)).to(device)
    v /= v.norm()
    value = 0.0
    for _ in range(iterations):
        hv = hvp(v)
        value = (hv * v).sum().item()
        v = hv / hv.norm().clamp_min(1e-30)
    return abs(value)


def kfac_head_influence(
    features: torch.Tensor,
    probs: torch.Tensor,
    labels: torch.Tensor,
    val_features: torch.Tensor,
    val_probs: torch.Tensor,
    val_labels: torch.Tensor,
    damping: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G [N], C [N])`` for a linear head ``logits = W phi + b`` under a Kronecker-factored Hessian.

    The per-sample head gradient is the rank-one ``delta phi~^T`` (``delta = p - onehot(y)``, ``phi~ = [phi, 1]``
    so the bias is included). The head's Hessian (equal to its Gauss-Newton matrix, the head being linear) is
    approximated by ``A (x) B`` with ``A = E[phi~ phi~^T]`` and ``B = E[diag(p) - p p^T]`` over the training
    samples. In the eigenbases ``A = Qa La Qa^T``, ``B = Qb Lb Qb^T`` the damped inverse is exact:
    ``(A (x) B + damping I)^-1`` scales coordinate ``(i, j)`` by ``1 / (Lb_i La_j + damping)``, the same damping
    as LiSSA's ``H + damping I``. With ``b = Qb^T delta_x``, ``a = Qa^T phi~_x`` and ``S = Lb La^T + damping``:
    ``C_x^2 = sum_ij b_i^2 a_j^2 / S_ij^2`` and ``G_x = sum_ij Ghat'_ij b_i a_j / S_ij`` with
    ``Ghat' = Qb^T (sum_z delta_z phi~_z^T) Qa`` over the validation set. Cost: O(N x classes x features).
    """
    phi = _with_bias(features.double())
    delta = probs.double() - F.one_hot(labels, probs.shape[1]).double()
    p = probs.double()
    eig_a, basis_a = torch.linalg.eigh(phi.T @ phi / len(phi))
    eig_b, basis_b = torch.linalg.eigh(torch.diag(p.mean(0)) - p.T @ p / len(p))
    inverse = 1.0 / (eig_b.clamp_min(0)[:, None] * eig_a.clamp_min(0)[None, :] + damping)
    a, b = phi @ basis_a, delta @ basis_b
    complexity = (((b**2) @ inverse**2) * a**2).sum(1).sqrt()
    val_delta = val_probs.double() - F.one_hot(val_labels, val_probs.shape[1]).double()
    g_hat = basis_b.T @ (val_delta.T @ _with_bias(val_features.double())) @ basis_a
    generalisation = ((b @ (g_hat * inverse)) * a).sum(1)
    return generalisation.float(), complexity.float()


def _with_bias(features: torch.Tensor) -> torch.Tensor:
    return torch.cat([features, torch.ones_like(features[:, :1])], dim=1)


class FunctionalLoss:
    """Cross-entropy of ``module`` as a function of a chosen subset of its parameters, for ``torch.func``.

    Gives per-sample gradients (``vmap(grad)``), summed gradients and batched Hessian-vector products
    (forward-over-reverse ``jvp(grad)`` under ``vmap``) on flat ``[P]`` vectors. The module must be in eval
    mode: BatchNorm then uses its running statistics, so per-sample and minibatch losses are well defined.
    """

    def __init__(self, module: nn.Module, names: list[str]):
        named = dict(module.named_parameters())
        self.module, self.names = module, list(names)
        self.params = {n: named[n].detach() for n in self.names}
        self.frozen = {
            **{n: p.detach() for n, p in named.items() if n not in self.params},
            **dict(module.named_buffers()),
        }
        self.shapes = [p.shape for p in self.params.values()]
        self.numels = [p.numel() for p in self.params.values()]
        self.numel = sum(self.numels)

    def _loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with _math_attention():
            logits = functional_call(self.module, (params, self.frozen), (x,))
        return F.cross_entropy(logits.float(), y)

    def flatten(self, tensors: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        lead = next(iter(tensors.values())).shape[:batch_dims]
        return torch.cat([tensors[n].reshape(*lead, -1).float() for n in self.names], dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[m, P]`` rows as a dict of ``[m, *shape]`` tensors."""
        chunks = flat.split(self.numels, dim=-1)
        return {n: c.reshape(*flat.shape[:-1], *s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def per_sample_grads(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[n, P]``: the gradient of each sample's own loss."""

        def one(params, xi, yi):
            return self._loss(params, xi[None], yi[None])

        return self.flatten(vmap(grad(one), in_dims=(None, 0, 0))(self.params, x, y), batch_dims=1)

    def grad_sum(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[P]``: the gradient of the summed loss over the batch."""
        return self.flatten(grad(lambda p: self._loss(p, x, y) * len(y))(self.params))

    def hvp(self, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """``[m, P]``: ``H v`` for every row ``v``, with ``H`` the Hessian of the batch's mean loss."""

        def one(tangent):
            return jvp(grad(lambda p: self._loss(p, x, y)), (self.params,), (tangent,))[1]

        with warnings.catch_warnings():
            # torch's first forward-mode call registers its own decompositions through torch.jit.script, which
            # warns that TorchScript is deprecated: torch's internals, nothing a user of dgzoo can act on.
            warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
            return self.flatten(vmap(one)(self.unflatten(vectors)), batch_dims=1)


def _math_attention() -> contextlib.AbstractContextManager:
    """Fused attention kernels have no forward-mode derivative; the math kernel computes the same function."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``size`` items."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
