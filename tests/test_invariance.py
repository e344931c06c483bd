"""IRM, V-REx, IB-ERM, IB-IRM, EQRM, Fishr and RDM: hand-computed penalties, the anneal schedules (weights,
optimizer resets, learning-rate switches), and identities with ERM while a penalty is off."""

import math

import pytest
import torch
import torch.nn.functional as F

from dgzoo.algorithms import Composition, HParam, Runtime, create_algorithm
from dgzoo.algorithms.invariance import (
    RDM_GAMMAS,
    AnnealedPenalty,
    information_bottleneck,
    irm_penalty,
    kde_quantile,
    per_sample_head_gradients,
    rbf_mmd,
    risk_variance,
)
from dgzoo.errors import DGZooError
from dgzoo.models import create_backbone

LR = 1e-2


def make_batches(seed=0, k=3, b=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 5, (b,), generator=g)) for _ in range(k)]


def build(spec, hparams=None, seed=0, domains=3):
    torch.manual_seed(seed)
    network = create_backbone("test_resnet", num_classes=5)
    return create_algorithm(
        spec, network, domains, hparams or {}, make_optimizer=lambda groups: torch.optim.Adam(groups, lr=LR)
    )


def flat(algorithm):
    return torch.cat([p.detach().reshape(-1) for p in algorithm.host.network.parameters()])


def adam_steps(algorithm):
    return {int(s["step"]) for s in algorithm.host.optimizer.state.values()}


def domain_logits(algorithm, minibatches):
    x = torch.cat([x for x, _ in minibatches])
    features, logits = algorithm.host.features_and_logits(x)
    sizes = [len(x) for x, _ in minibatches]
    return features.split(sizes), logits.split(sizes)


def assert_same_update_as_erm(spec, hparams=None):
    batches = make_batches()
    erm, other = build("erm"), build(spec, hparams)
    for step in range(2):
        erm.update(batches, step)
        other.update(batches, step)
    assert torch.allclose(flat(erm), flat(other), atol=1e-6, rtol=0)


# -- IRM


def test_irm_penalty_by_hand():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    s1, s2 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-2))
    # d/ds CE(s z, y) at s=1 is sum_c p_c z_c - z_y; even rows (0, 2), odd rows (1, 3).
    grad_even = ((s1 - 1) + 2 * s2) / 2
    grad_odd = (s1 + 0.0) / 2
    assert torch.allclose(irm_penalty(logits, y), torch.tensor(grad_even * grad_odd))


def test_irm_weights_and_optimizer_reset():
    batches = make_batches()
    irm = build("irm", {"irm_lambda": 10.0, "irm_penalty_anneal_iters": 1})
    for step, weight in ((0, 1.0), (1, 10.0)):
        loss, metrics = irm.host.loss(batches, step)
        _, logits = domain_logits(irm, batches)
        nll = sum(F.cross_entropy(z, y) for z, (_, y) in zip(logits, batches)) / 3
        penalty = sum(irm_penalty(z, y) for z, (_, y) in zip(logits, batches)) / 3
        assert torch.allclose(loss, nll + weight * penalty, atol=1e-6)
        irm.update(batches, step)
    assert adam_steps(irm) == {1}  # the step where the penalty switched on started a fresh Adam


def test_an_annealed_host_that_writes_only_its_penalised_loss_is_reset_where_its_penalty_switches_on():
    class Annealed(AnnealedPenalty):  # not registered: a host a contributor would add
        name = "annealed_for_test"
        HPARAMS = {"anneal_iters": HParam(1, "steps before the penalty")}
        RESET_AT = ("anneal_iters",)

        def penalised_loss(self, minibatches, step):
            return F.cross_entropy(
                self.predict(torch.cat([x for x, _ in minibatches])), torch.cat([y for _, y in minibatches])
            ), {}

    torch.manual_seed(0)
    host = Annealed(create_backbone("test_resnet", num_classes=5), 5, 3, {"anneal_iters": 1})
    host.attach(Runtime(), {"main": torch.optim.Adam(host.parameters(), lr=LR)})
    algorithm = Composition(host, [], {"annealed_for_test": {"anneal_iters": 1}})
    batches = make_batches()
    for step in range(3):
        algorithm.update(batches, step)
    assert adam_steps(algorithm) == {2}  # the Adam state restarted at step 1: two steps since, not three


# -- V-REx


def test_vrex_penalty_and_loss():
    assert torch.allclose(risk_variance(torch.tensor([1.0, 2.0, 3.0])), torch.tensor(2 / 3))
    batches = make_batches()
    vrex = build("vrex", {"vrex_lambda": 7.0, "vrex_penalty_anneal_iters": 0})
    loss, _ = vrex.host.loss(batches, 0)
    _, logits = domain_logits(vrex, batches)
    risks = torch.stack([F.cross_entropy(z, y) for z, (_, y) in zip(logits, batches)])
    assert torch.allclose(loss, risks.mean() + 7.0 * ((risks - risks.mean()) ** 2).mean(), atol=1e-6)
    loss_anneal, _ = build("vrex", {"vrex_lambda": 7.0}).host.loss(batches, 0)  # weight 1.0 during the anneal
    assert torch.allclose(loss_anneal, risks.mean() + ((risks - risks.mean()) ** 2).mean(), atol=1e-6)


# -- IB-ERM, IB-IRM


def test_information_bottleneck_by_hand():
    features = torch.tensor([[0.0, 0.0], [2.0, 4.0]])  # unbiased variances 2 and 8
    assert torch.allclose(information_bottleneck(features), torch.tensor(5.0))


def test_ib_erm_is_erm_during_the_anneal():
    assert_same_update_as_erm("ib_erm")


def test_ib_erm_and_ib_irm_losses_after_the_anneal():
    batches = make_batches()
    ib_erm = build("ib_erm", {"ib_lambda": 3.0, "ib_penalty_anneal_iters": 0})
    loss, _ = ib_erm.host.loss(batches, 0)
    features, logits = domain_logits(ib_erm, batches)
    nll = sum(F.cross_entropy(z, y) for z, (_, y) in zip(logits, batches)) / 3
    ib = sum(f.var(0).mean() for f in features) / 3
    irm = sum(irm_penalty(z, y) for z, (_, y) in zip(logits, batches)) / 3
    assert torch.allclose(loss, nll + 3.0 * ib, atol=1e-6)
    ib_irm = build(
        "ib_irm", {"ib_lambda": 3.0, "ib_penalty_anneal_iters": 1, "irm_lambda": 20.0, "irm_penalty_anneal_iters": 2}
    )
    for step, (irm_weight, ib_weight) in enumerate([(1.0, 0.0), (1.0, 3.0), (20.0, 3.0)]):
        loss, _ = ib_irm.host.loss(batches, step)
        if step == 0:
            assert torch.allclose(loss, nll + irm, atol=1e-6)
        features, logits = domain_logits(ib_irm, batches)
        expected = (
            sum(F.cross_entropy(z, y) for z, (_, y) in zip(logits, batches)) / 3
            + irm_weight * sum(irm_penalty(z, y) for z, (_, y) in zip(logits, batches)) / 3
            + ib_weight * sum(f.var(0).mean() for f in features) / 3
        )
        assert torch.allclose(loss, expected, atol=1e-5)
        ib_irm.update(batches, step)
        assert adam_steps(ib_irm) == {1}  # after step 0, and after the resets at step 1 (IB on) and 2 (IRM on)


# -- EQRM


def test_kde_quantile_values_and_gradient():
    assert torch.allclose(kde_quantile(torch.tensor([1.0, 2.0, 3.0]), 0.5), torch.tensor(2.0), atol=1e-6)
    risks = torch.tensor([0.3, 1.1, 0.7, 2.0], dtype=torch.float64, requires_grad=True)
    q = kde_quantile(risks, 0.75)
    data = risks.detach()
    bandwidth = 1.06 * data.std() * 4**-0.2
    assert abs(float(torch.special.ndtr((q.detach() - data) / bandwidth).mean()) - 0.75) < 1e-6  # the KDE's CDF
    (gradient,) = torch.autograd.grad(q, risks)
    # Translation and scale equivariance of the bisection between its bounds: sum of the gradient is 1 and
    # risks . gradient is the quantile (Euler), DomainBed's gradient through the bounds and the bandwidth.
    assert torch.allclose(gradient.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose((risks.detach() * gradient).sum(), q.detach())
    assert float(kde_quantile(torch.tensor([1.0, 2.0]), -3.0)) == pytest.approx(
        1.5 + 1.06 * math.sqrt(0.5) * 2**-0.2 * math.sqrt(6), rel=1e-6
    )


def test_eqrm_burn_in_then_quantile_with_reset_and_its_lr():
    batches = make_batches()
    eqrm = build("eqrm", {"eqrm_burnin_iters": 1, "eqrm_lr": 1e-3})
    risks = torch.stack([F.cross_entropy(eqrm.host.predict(x), y) for x, y in batches])
    loss, _ = eqrm.host.loss(batches, 0)
    assert torch.allclose(loss, risks.mean(), atol=1e-6)
    eqrm.update(batches, 0)
    risks = torch.stack([F.cross_entropy(eqrm.host.predict(x), y) for x, y in batches])
    loss, _ = eqrm.host.loss(batches, 1)
    assert torch.allclose(loss, kde_quantile(risks, 0.75), atol=1e-6)
    assert_switched_lr_step(eqrm, batches, 1, 1e-3)


def test_eqrm_checks():
    with pytest.raises(DGZooError, match="eqrm_quantile"):
        build("eqrm", {"eqrm_quantile": 1.0})
    with pytest.raises(DGZooError, match="at least 2"):
        build("eqrm", domains=1)


def assert_switched_lr_step(algorithm, batches, step, lr):
    """The step at the switch is a fresh Adam's first step at ``lr`` (|update| = lr wherever the gradient is not
    tiny), and the recipe's lr is back in the optimizer afterwards."""
    before = flat(algorithm)
    algorithm.update(batches, step)
    assert adam_steps(algorithm) == {1}
    assert float((flat(algorithm) - before).abs().max()) == pytest.approx(lr, rel=0.02)
    assert algorithm.host.optimizer.param_groups[0]["lr"] == LR


# -- Fishr


def test_per_sample_head_gradients_are_the_closed_form_and_differentiable():
    head = torch.nn.Linear(3, 4)
    g = torch.Generator().manual_seed(1)
    features = torch.randn(5, 3, generator=g, requires_grad=True)
    y = torch.randint(0, 4, (5,), generator=g)
    grads = per_sample_head_gradients(head, features, y)
    residual = torch.softmax(head(features), 1) - F.one_hot(y, 4)  # dCE/dlogits of each sample
    closed = torch.cat([(residual[:, :, None] * features[:, None, :]).reshape(5, -1), residual], 1)
    assert torch.allclose(grads, closed, atol=1e-6)
    weights = torch.randn(5, 16, generator=g)
    got = torch.autograd.grad((grads * weights).sum(), [features, head.weight])
    want = torch.autograd.grad((closed * weights).sum(), [features, head.weight])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))


def test_fishr_moving_average_and_penalty_by_hand():
    batches = make_batches()
    ema = 0.9
    fishr = build("fishr", {"ema": ema, "penalty_anneal_iters": 0, "lambda": 2.0})
    features, logits = domain_logits(fishr, batches)

    def variances():
        rows = []
        for f, z, (_, y) in zip(features, logits, batches):
            r = torch.softmax(z, 1) - F.one_hot(y, 5)
            grads = torch.cat([(r[:, :, None] * f[:, None, :]).reshape(len(f), -1), r], 1)
            rows.append(grads.var(0, unbiased=False))
        return torch.stack(rows).detach()

    def distance(v):
        return ((v - v.mean(0)) ** 2).mean(1).mean()

    v1 = variances()
    loss, metrics = fishr.host.loss(batches, 0)
    nll = F.cross_entropy(torch.cat(logits), torch.cat([y for _, y in batches]))
    assert torch.allclose(metrics["penalty"], distance(v1), rtol=1e-4)  # first update: the variances themselves
    assert torch.allclose(loss, nll + 2.0 * distance(v1), rtol=1e-4)
    assert torch.allclose(fishr.host.gradient_variances, (1 - ema) * v1, rtol=1e-4)
    _, metrics = fishr.host.loss(batches, 1)
    averaged = ema * (1 - ema) * v1 + (1 - ema) * v1
    assert torch.allclose(fishr.host.gradient_variances, averaged, rtol=1e-4)
    assert torch.allclose(metrics["penalty"], distance(averaged / (1 - ema)), rtol=1e-4)


def test_fishr_is_erm_during_the_anneal_and_resets_after():
    assert_same_update_as_erm("fishr")
    batches = make_batches()
    annealing, on = build("fishr"), build("fishr", {"penalty_anneal_iters": 0})
    annealing.host.loss(batches, 0)
    on.host.loss(batches, 0)
    # The moving averages advance during the anneal exactly as with the penalty on.
    assert annealing.host.gradient_variances.abs().sum() > 0
    assert torch.allclose(annealing.host.gradient_variances, on.host.gradient_variances)
    fishr = build("fishr", {"penalty_anneal_iters": 1})
    for step in range(2):
        fishr.update(batches, step)
    assert adam_steps(fishr) == {1}


def test_fishr_checks():
    with pytest.raises(DGZooError, match="ema"):
        build("fishr", {"ema": 1.0})


# -- RDM


def test_rdm_mmd_by_hand():
    x, y = torch.tensor([[0.0]]), torch.tensor([[1.0]])
    expected = 2 * len(RDM_GAMMAS) - 2 * sum(math.exp(-g) for g in RDM_GAMMAS)
    assert torch.allclose(rbf_mmd(x, y), torch.tensor(expected), atol=1e-5)
    assert float(rbf_mmd(x, x)) == pytest.approx(0.0, abs=1e-5)


def test_rdm_is_erm_during_the_anneal():
    assert_same_update_as_erm("rdm")


def test_rdm_loss_after_the_anneal_and_its_lr_switch():
    batches = make_batches()
    rdm = build("rdm", {"rdm_penalty_anneal_iters": 1, "rdm_lambda": 2.0, "variance_weight": 0.5, "rdm_lr": 1e-3})
    rdm.update(batches, 0)
    loss, _ = rdm.host.loss(batches, 1)
    _, logits = domain_logits(rdm, batches)
    losses = torch.stack([F.cross_entropy(z, y, reduction="none") for z, (_, y) in zip(logits, batches)])
    worst = losses[losses.mean(1).argmax()]
    expected = (
        losses.mean()
        + 2.0 * rbf_mmd(worst[:, None], losses.reshape(-1, 1))
        + 0.5 * (losses.reshape(-1).var() + worst.var())
    )
    assert torch.allclose(loss, expected, atol=1e-5)
    assert_switched_lr_step(rdm, batches, 1, 1e-3)
    # A schedule at half the recipe's lr: the switched lr is halved too, and the schedule's value comes back.
    group = rdm.host.optimizer.param_groups[0]
    group["lr"] = LR / 2
    before = flat(rdm)
    rdm.host.optimizer.state.clear()
    rdm.update(batches, 2)
    assert float((flat(rdm) - before).abs().max()) == pytest.approx(5e-4, rel=0.02)
    assert group["lr"] == LR / 2
