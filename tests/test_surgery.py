"""Agr-Sum, Agr-Rand and PCGrad: hand-computed results, DGvGS's semantics, and the algorithm steps they drive."""

import copy
import itertools

import pytest
import torch

from dgzoo.algorithms import create_algorithm
from dgzoo.algorithms.gradients import FlatParams, gram, per_domain_gradients
from dgzoo.algorithms.surgery import agr_rand, agr_sum, agreement_mask, pcgrad, pcgrad_coefficients
from dgzoo.models import create_backbone

# Components: agree +, all zero, agree -, sign conflict, zero in one domain only, agree + with a tiny value.
GRADS = torch.tensor(
    [[1.0, 0.0, -1.0, 2.0, 0.0, 1e-30], [2.0, 0.0, -3.0, -1.0, 4.0, 5.0], [0.5, 0.0, -0.5, 1.0, 1.0, 2.0]]
)


def test_agreement_needs_all_signs_equal_and_nonzero():
    assert agreement_mask(GRADS).tolist() == [True, False, True, False, False, True]


def test_agr_sum_sums_agreeing_components_and_zeroes_the_rest():
    assert agr_sum(GRADS).tolist() == [3.5, 0.0, -4.5, 0.0, 0.0, 7.0]


def test_agr_rand_fills_disagreement_with_noise_scaled_by_the_agreeing_mean():
    out = agr_rand(GRADS, torch.Generator().manual_seed(3))
    noise = torch.randn(3, generator=torch.Generator().manual_seed(3))  # DGvGS draws one value per disagreement
    scale = (3.5 + 4.5 + 7.0) / 3
    assert out[[0, 2, 5]].tolist() == [3.5, -4.5, 7.0]
    assert torch.allclose(out[[1, 3, 4]], noise * scale)


def test_agr_rand_edge_cases():
    conflict = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]])
    assert torch.equal(agr_rand(conflict, torch.Generator().manual_seed(0)), torch.zeros(3))  # scale 0, not NaN
    agree = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    assert torch.equal(agr_rand(agree), agr_sum(agree))


def dgvgs_pcgrad(grads, order):
    """DGvGS's loop, verbatim in meaning: project the running g_i off each original g_j it conflicts with."""
    projected = [g.clone() for g in grads]
    for i in order:
        for j in [j for j in order if j != i]:
            inner = projected[i] @ grads[j]
            if inner < 0:
                projected[i] -= inner / (grads[j] ** 2).sum() * grads[j]
    return torch.stack(projected).sum(0)


def test_pcgrad_by_hand():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    # g1 - (-1/2) g2 = (0.5, 0.5); g2 - (-1/1) g1 = (0, 1); summed, not averaged.
    assert torch.allclose(pcgrad(g, order=[0, 1]), torch.tensor([0.5, 1.5]))
    aligned = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    assert torch.allclose(pcgrad(aligned), aligned.sum(0))  # no conflict: plain sum
    with_zero = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 1.0]])
    out = pcgrad(with_zero, order=[0, 1, 2])
    assert torch.isfinite(out).all() and torch.allclose(out, torch.tensor([0.5, 1.5]))


def test_pcgrad_order_matters_and_matches_dgvgs_for_every_order():
    g = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    g[1] = -0.8 * g[0] + 0.3 * g[1]  # make conflicts
    results = {}
    for order in itertools.permutations(range(4)):
        results[order] = pcgrad(g, order=order)
        assert torch.allclose(results[order], dgvgs_pcgrad(g, order), atol=1e-5), order
    assert len({tuple(r.round(decimals=4).tolist()) for r in results.values()}) > 1
    _, projections = pcgrad_coefficients(gram(g), list(range(4)))
    assert projections > 0


def test_surgery_step_applies_the_rule_to_the_engine_gradients():
    torch.manual_seed(0)
    model = create_backbone("test_resnet", num_classes=5).eval()  # eval: the reference sees the same statistics
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(3)]
    grads, _ = per_domain_gradients(reference, batches, FlatParams.of(reference))
    before = FlatParams.of(model).values()
    for name, expected in (("agr_sum", agr_sum(grads) / 3), ("pcgrad", None)):
        net = copy.deepcopy(model)
        algorithm = create_algorithm(
            name, net, 3, make_optimizer=lambda g: torch.optim.SGD(g, lr=1.0), hparams={"reduction": "mean"}
        )
        metrics = algorithm.update(batches, step=5)
        if expected is None:  # PCGrad's order comes from the algorithm's per-step generator
            order = torch.randperm(3, generator=algorithm.host.generator(5)).tolist()
            expected = pcgrad(grads, order=order) / 3
            assert 0.0 <= metrics["conflict_rate"] <= 1.0
        else:
            assert metrics["agreement"] == pytest.approx(agreement_mask(grads).float().mean().item())
        assert torch.allclose(before - FlatParams.of(net).values(), expected, atol=1e-5), name


def test_agr_rand_is_reproducible_from_its_seed_and_step():
    torch.manual_seed(0)
    model = create_backbone("test_resnet", num_classes=5).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(2)]
    nets = [copy.deepcopy(model) for _ in range(2)]
    first = create_algorithm("agr_rand", nets[0], 2, make_optimizer=lambda g: torch.optim.SGD(g, lr=0.1), hparams={})
    second = create_algorithm("agr_rand", nets[1], 2, make_optimizer=lambda g: torch.optim.SGD(g, lr=0.1), hparams={})
    second.load_state_dict(first.state_dict())  # a resumed run continues the same random stream
    first.update(batches, step=3)
    second.update(batches, step=3)
    assert torch.equal(FlatParams.of(nets[0]).values(), FlatParams.of(nets[1]).values())


@pytest.mark.parametrize("name", ["agr_sum", "agr_rand", "pcgrad"])
def test_step_matched_surgery_is_one_erm_sized_step_along_the_rule(name):
    torch.manual_seed(0)
    model = create_backbone("test_resnet", num_classes=5).eval()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(3)]
    grads, _ = per_domain_gradients(reference, batches, FlatParams.of(reference))
    steps = {}
    for step in ("faithful", "matched"):
        net = copy.deepcopy(model)
        algorithm = create_algorithm(
            name, net, 3, make_optimizer=lambda g: torch.optim.SGD(g, lr=0.1), hparams={"step": step}
        )
        algorithm.host.seed = 7  # the same noise (agr_rand) and order (pcgrad) in both modes
        before = FlatParams.of(net).values()
        metrics = algorithm.update(batches, step=2)
        steps[step] = before - FlatParams.of(net).values()
    # matched: the faithful rule's direction, at the length of one SGD step on ERM's gradient (the mean)
    assert steps["matched"].norm().item() == pytest.approx(0.1 * grads.mean(0).norm().item(), rel=1e-4)
    assert torch.allclose(
        steps["matched"] / steps["matched"].norm(), steps["faithful"] / steps["faithful"].norm(), atol=1e-5
    )
    assert metrics["step_ratio"] == pytest.approx(
        (steps["faithful"].norm() / (0.1 * grads.mean(0).norm())).item(), rel=1e-4
    )
    acts = algorithm.host.diagnostics()
    if name == "pcgrad":
        assert acts["projected_fraction"] == metrics["conflict_rate"]
    else:
        assert acts["masked_fraction"] == pytest.approx(1 - agreement_mask(grads).float().mean().item())
