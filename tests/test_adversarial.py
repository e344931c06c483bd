"""DANN and CDANN: the gradient penalty and the class-balanced discriminator loss by hand, the turn schedule, the
lambda=0 generator step against ERM."""

import copy
import math

import torch

import dgzoo.algorithms.adversarial as adversarial
from dgzoo.algorithms import ALGORITHMS, create_algorithm, resolve_hparams
from dgzoo.models import create_backbone


def make_batches(k=3, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 5, (b,), generator=g)) for _ in range(k)]


def make_net(seed=0):
    torch.manual_seed(seed)
    return create_backbone("test_resnet", num_classes=5)


def adam(groups):
    return torch.optim.Adam(groups, lr=1e-3)


def test_gradient_penalty_by_hand():
    # Identity discriminator at z = 0: p = (1/2, 1/2), so d CE / d z = p - e_y = (-1/2, 1/2) (label 0), norm^2 1/2.
    z = torch.zeros(3, 2, requires_grad=True)
    domains = torch.tensor([0, 1, 0])
    loss, penalty = adversarial.discriminator_loss(z @ torch.eye(2), z, domains, None, penalty_weight=2.0)
    assert torch.allclose(penalty, torch.tensor(0.5))
    assert torch.allclose(loss, torch.tensor(math.log(2) + 2.0 * 0.5))
    # Scaled logits 3z at z = 0: the gradient is 3 (p - e_y), norm^2 9/2; the penalty is differentiable in W.
    w = torch.tensor(3.0, requires_grad=True)
    _, penalty = adversarial.discriminator_loss(w * z, z, domains, None, penalty_weight=1.0)
    assert torch.allclose(penalty, torch.tensor(4.5))
    (grad_w,) = torch.autograd.grad(penalty, [w])  # d(w^2 / 2)/dw = w
    assert torch.allclose(grad_w, torch.tensor(3.0))
    _, skipped = adversarial.discriminator_loss(z @ torch.eye(2), z, domains, None, penalty_weight=0.0)
    assert float(skipped) == 0.0


def test_class_balanced_discriminator_loss_by_hand():
    y = torch.tensor([0, 0, 2])
    counts = torch.bincount(y, minlength=5).float()
    # DomainBed: one_hot(y) has 3 columns (largest label 2, + 1), counts (2, 0, 1): weights 1/(2*3), 1/(2*3), 1/(1*3).
    weights = adversarial.class_balance_weights(y, counts)
    assert torch.allclose(weights, torch.tensor([1 / 6, 1 / 6, 1 / 3]))
    logits = torch.tensor([[0.0, math.log(3)], [0.0, 0.0], [math.log(3), 0.0]])  # CE: log 4, log 2, log 4/3
    domains = torch.tensor([0, 1, 0])
    loss, _ = adversarial.discriminator_loss(logits, logits, domains, weights, 0.0)
    assert torch.allclose(loss, torch.tensor(math.log(4) / 6 + math.log(2) / 6 + math.log(4 / 3) / 3))


def test_turn_schedule_and_which_optimizer_steps():
    assert [adversarial.is_discriminator_turn(n, 1) for n in range(1, 7)] == [False, True] * 3
    assert [adversarial.is_discriminator_turn(n, 2) for n in range(1, 7)] == [True, False, True] * 2
    algorithm = create_algorithm("cdann", make_net(), 3, {"d_steps_per_g_step": 2}, make_optimizer=adam)
    host, stepped = algorithm.host, []
    for name in ("main", "discriminator"):
        host.hook_optimizer_step(lambda name=name: stepped.append(name), name)
    batches = make_batches()
    for step in range(6):
        before = copy.deepcopy(host.state_dict())
        metrics = algorithm.update(batches, step)
        after = host.state_dict()
        disc_changed = not torch.equal(before["discriminator.input.weight"], after["discriminator.input.weight"])
        emb_changed = not torch.equal(before["class_embeddings.weight"], after["class_embeddings.weight"])
        net_changed = not torch.equal(before["network.fc.weight"], after["network.fc.weight"])
        disc_turn = stepped[-1] == "discriminator"
        assert (disc_changed, emb_changed, net_changed) == (disc_turn, disc_turn, not disc_turn)
        assert ("disc_loss" in metrics) == disc_turn and ("gen_loss" in metrics) != disc_turn
    assert stepped == ["discriminator", "main", "discriminator"] * 2
    assert int(host.update_count) == 6 and "update_count" in host.state_dict()


def test_optimizer_groups_carry_domainbed_settings():
    hparams = {"beta1": 0.0, "lr_d": 3e-4, "weight_decay_d": 1e-3}
    host = create_algorithm("cdann", make_net(), 3, hparams, make_optimizer=adam).host
    main, disc = host.optimizers["main"].param_groups[0], host.optimizers["discriminator"].param_groups[0]
    assert main["betas"] == (0.0, 0.9) and main["lr"] == 1e-3 and main["weight_decay"] == 0
    assert disc["betas"] == (0.0, 0.9) and disc["lr"] == 3e-4 and disc["weight_decay"] == 1e-3
    assert {id(p) for p in main["params"]} == {id(p) for p in host.network.parameters()}
    adversary = [*host.discriminator.parameters(), *host.class_embeddings.parameters()]
    assert {id(p) for p in disc["params"]} == {id(p) for p in adversary}
    assert host.discriminator.input.in_features == host.network.num_features
    assert resolve_hparams("dann", {}, small_images=True)["dann"]["lr_d"] == 1e-3
    assert "adrmx" not in ALGORITHMS and "urm" not in ALGORITHMS  # not exportable as plain timm (module docstring)


def test_lambda_zero_generator_step_is_erm_step():
    net = make_net()
    batches = make_batches()
    dann = create_algorithm("dann", copy.deepcopy(net), 3, {"lambda": 0.0, "grad_penalty": 1.0}, make_optimizer=adam)
    erm = create_algorithm(
        "erm", copy.deepcopy(net), 3, {}, make_optimizer=lambda g: torch.optim.Adam(g, lr=1e-3, betas=(0.5, 0.9))
    )
    disc_before = copy.deepcopy(dann.host.discriminator.state_dict())
    torch.manual_seed(1)
    metrics = dann.update(batches, 0)  # update 1 with d_steps_per_g_step=1: a generator turn
    torch.manual_seed(1)
    erm.update(batches, 0)
    assert "gen_loss" in metrics
    for (name, a), b in zip(dann.host.network.state_dict().items(), erm.host.network.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)
    for key, value in dann.host.discriminator.state_dict().items():
        assert torch.equal(value, disc_before[key])
