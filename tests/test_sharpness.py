"""SAM, GSAM and SAGM steps against the two-pass update computed by hand on a linear classifier."""

import pytest
import torch
from torch import nn

from dgzoo.algorithms import create_algorithm
from dgzoo.models import create_backbone

LR, RHO, ALPHA = 0.5, 0.05, 0.3


def linear_ce_grad(w, b, x, y):
    """Gradient of the mean cross-entropy of ``x @ w.T + b`` by hand: (softmax - onehot)^T x / N."""
    delta = torch.softmax(x @ w.T + b, dim=1) - nn.functional.one_hot(y, w.shape[0]).double()
    return delta.T @ x / len(y), delta.mean(0)


def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(2)]


def step(spec, hparams):
    torch.manual_seed(0)
    network = nn.Linear(4, 3).double()
    w0, b0 = network.weight.detach().clone(), network.bias.detach().clone()
    algorithm = create_algorithm(
        spec, network, 2, hparams, num_classes=3, make_optimizer=lambda groups: torch.optim.SGD(groups, lr=LR)
    )
    minibatches = [(x.double(), y) for x, y in data()]
    algorithm.update(minibatches, 0)
    x = torch.cat([x for x, _ in minibatches])
    y = torch.cat([y for _, y in minibatches])
    return algorithm, (w0, b0), x, y, (network.weight.detach(), network.bias.detach())


def norm(*tensors):
    return torch.sqrt(sum((t**2).sum() for t in tensors))


def test_sam_step_is_the_gradient_at_the_perturbed_weights():
    _, (w, b), x, y, after = step("sam", {"rho": RHO})
    gw, gb = linear_ce_grad(w, b, x, y)
    scale = RHO / norm(gw, gb)
    pw, pb = linear_ce_grad(w + scale * gw, b + scale * gb, x, y)
    assert torch.allclose(after[0], w - LR * pw, atol=1e-10) and torch.allclose(after[1], b - LR * pb, atol=1e-10)
    # and not the plain gradient step
    assert not torch.allclose(after[0], w - LR * gw, atol=1e-6)


def test_gsam_step_removes_alpha_times_the_orthogonal_part():
    _, (w, b), x, y, after = step("gsam", {"rho": RHO, "alpha": ALPHA})
    gw, gb = linear_ce_grad(w, b, x, y)
    scale = RHO / norm(gw, gb)
    pw, pb = linear_ce_grad(w + scale * gw, b + scale * gb, x, y)
    projection = ((gw * pw).sum() + (gb * pb).sum()) / norm(pw, pb) ** 2  # <g, g_p> / |g_p|^2
    dw = pw - ALPHA * (gw - projection * pw)
    db = pb - ALPHA * (gb - projection * pb)
    assert torch.allclose(after[0], w - LR * dw, atol=1e-10) and torch.allclose(after[1], b - LR * db, atol=1e-10)


def test_sagm_step_averages_the_gradients_at_a_shrunk_perturbation():
    _, (w, b), x, y, after = step("sagm", {"rho": RHO, "alpha": ALPHA})
    gw, gb = linear_ce_grad(w, b, x, y)
    scale = RHO / norm(gw, gb) - ALPHA
    pw, pb = linear_ce_grad(w + scale * gw, b + scale * gb, x, y)
    assert torch.allclose(after[0], w - LR * (gw + pw) / 2, atol=1e-10)
    assert torch.allclose(after[1], b - LR * (gb + pb) / 2, atol=1e-10)


@pytest.mark.parametrize("spec", ["sam", "gsam", "sagm"])
def test_rho_zero_is_erm_up_to_the_combination(spec):
    _, (w, b), x, y, after = step(spec, {"rho": 0.0, **({"alpha": 0.0} if spec != "sam" else {})})
    gw, gb = linear_ce_grad(w, b, x, y)
    assert torch.allclose(after[0], w - LR * gw, atol=1e-10) and torch.allclose(after[1], b - LR * gb, atol=1e-10)


@pytest.mark.parametrize("spec, moves", [("sam", True), ("gsam", False), ("sagm", False)])
def test_second_pass_batchnorm_statistics_follow_the_reference(spec, moves):
    torch.manual_seed(0)
    network = create_backbone("test_resnet", num_classes=10)
    initial = {k: v.clone() for k, v in network.state_dict().items()}
    algorithm = create_algorithm(spec, network, 2)
    g = torch.Generator().manual_seed(0)
    minibatches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    algorithm.update(minibatches, 0)
    reference = create_backbone("test_resnet", num_classes=10)
    reference.load_state_dict(initial)
    reference.train()(torch.cat([x for x, _ in minibatches]))  # one training pass at the initial weights
    first = reference.bn1.running_mean
    assert torch.allclose(network.bn1.running_mean, first, atol=1e-6) != moves
    # Both passes count, for all three: the official GSAM/SAGM second pass runs in training mode with momentum 0.
    counters = [int(b) for k, b in network.state_dict().items() if k.endswith("num_batches_tracked")]
    assert counters and set(counters) == {2}


def test_optimizer_step_hooks_see_the_combined_gradient_once_per_step():
    torch.manual_seed(0)
    network = nn.Linear(4, 3).double()
    algorithm = create_algorithm(
        "sam", network, 2, {"rho": RHO}, num_classes=3, make_optimizer=lambda groups: torch.optim.SGD(groups, lr=LR)
    )
    seen = []
    algorithm.host.hook_optimizer_step(lambda: seen.append(network.weight.grad.clone()))
    w, b = network.weight.detach().clone(), network.bias.detach().clone()
    minibatches = [(x.double(), y) for x, y in data()]
    algorithm.update(minibatches, 0)
    x, y = torch.cat([x for x, _ in minibatches]), torch.cat([y for _, y in minibatches])
    gw, gb = linear_ce_grad(w, b, x, y)
    scale = RHO / norm(gw, gb)
    pw, _ = linear_ce_grad(w + scale * gw, b + scale * gb, x, y)
    assert len(seen) == 1 and torch.allclose(seen[0], pw, atol=1e-10)
