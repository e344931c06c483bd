"""GroupDRO, Mixup, SD, RSC, AND-mask, SAND-mask and IGA: hand-computed weights, masks and penalties, identities
with ERM."""

import copy
import math
import threading

import pytest
import torch
import torch.nn.functional as F

import dgzoo.algorithms.robust as robust
from dgzoo.algorithms import Recipe, Runtime, check_algorithm, create_algorithm
from dgzoo.algorithms.gradients import FlatParams, per_domain_gradients
from dgzoo.algorithms.seeding import derive_seed
from dgzoo.errors import DGZooError
from dgzoo.models import create_backbone

LR = 0.1


def make_batches(k=3, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 5, (b,), generator=g)) for _ in range(k)]


def make_net(seed=0):
    torch.manual_seed(seed)
    return create_backbone("test_resnet", num_classes=5)


def build(spec, network, hparams=None, k=3):
    return create_algorithm(spec, network, k, hparams or {}, make_optimizer=lambda g: torch.optim.SGD(g, lr=LR))


def flat_params(network):
    return torch.cat([p.detach().reshape(-1) for p in network.parameters()])


def sgd_step(network, gradient):
    """The parameters after one plain SGD step on a flat ``gradient``."""
    return flat_params(network) - LR * gradient


def mean_domain_gradient(network, batches):
    grads, _ = per_domain_gradients(network, batches, FlatParams.of(network))
    return grads.mean(0)


# ---------------------------------------------------------------------- GroupDRO


def test_groupdro_q_after_two_steps_by_hand():
    net, batches, eta = make_net(), make_batches(), 0.5
    algo = build("groupdro", net, {"groupdro_eta": eta})
    reference = copy.deepcopy(net)
    with torch.no_grad():
        first = torch.stack([F.cross_entropy(reference(x), y) for x, y in batches])
    q1 = torch.exp(eta * first) / torch.exp(eta * first).sum()  # from q = ones
    metrics = algo.update(batches, 0)
    assert torch.allclose(algo.host.q, q1, atol=1e-6)
    assert math.isclose(metrics["loss"], float(first @ q1), rel_tol=1e-5)
    assert math.isclose(metrics["q_1"], float(q1[1]), rel_tol=1e-5)
    # The step's gradient is that of sum_k q_k L_k.
    objective = sum(w * F.cross_entropy(reference(x), y) for w, (x, y) in zip(q1, batches))
    objective.backward()
    expected = sgd_step(reference, torch.cat([p.grad.reshape(-1) for p in reference.parameters()]))
    assert torch.allclose(flat_params(net), expected, atol=1e-6)
    # Second step: q keeps its history, q2 is proportional to q1 exp(eta L2).
    with torch.no_grad():
        second = torch.stack([F.cross_entropy(copy.deepcopy(net)(x), y) for x, y in batches])
    algo.update(batches, 1)
    q2 = q1 * torch.exp(eta * second)
    assert torch.allclose(algo.host.q, q2 / q2.sum(), atol=1e-6)
    assert "q" in algo.host.state_dict()  # checkpointed with the model


# ---------------------------------------------------------------------- Mixup


def test_mixup_pairs_are_a_cycle_drawn_from_the_seed():
    pairs = robust.mixup_pairs(4, 0.2, seed=7)
    assert pairs == robust.mixup_pairs(4, 0.2, seed=7)
    assert pairs != robust.mixup_pairs(4, 0.2, seed=8)
    firsts, seconds = [i for i, _, _ in pairs], [j for _, j, _ in pairs]
    assert sorted(firsts) == sorted(seconds) == [0, 1, 2, 3]
    assert all(seconds[n] == firsts[(n + 1) % 4] for n in range(4))  # each domain mixed with the next in the order
    assert all(0.0 <= lam <= 1.0 for _, _, lam in pairs)


def test_mixup_loss_by_hand(monkeypatch):
    net, batches = make_net(), make_batches()
    algo = build("mixup", net)
    drawn = robust.mixup_pairs(3, 0.2, derive_seed(algo.host.seed, 5))
    expected = 0.0
    for i, j, lam in drawn:
        (xi, yi), (xj, yj) = batches[i], batches[j]
        log_p = F.log_softmax(net(torch.lerp(xj, xi, lam)), 1)
        expected += -(lam * log_p.gather(1, yi[:, None]) + (1 - lam) * log_p.gather(1, yj[:, None])).mean()
    loss, _ = algo.host.loss(batches, 5)
    assert torch.allclose(loss, expected / 3, atol=1e-5)
    # lambda = 1 on every pair: each domain's own cross-entropy once, the mean per-domain loss.
    monkeypatch.setattr(robust, "mixup_pairs", lambda k, alpha, seed: [(i, (i + 1) % k, 1.0) for i in range(k)])
    loss, _ = algo.host.loss(batches, 5)
    assert torch.allclose(loss, sum(F.cross_entropy(net(x), y) for x, y in batches) / 3, atol=1e-6)


def test_mixup_checks():
    with pytest.raises(DGZooError, match="mixup_alpha"):
        check_algorithm("mixup", {"mixup_alpha": 0.0}, Recipe(num_domains=3, num_classes=5))
    for name in ("mixup", "groupdro", "iga"):
        with pytest.raises(DGZooError, match="at least 2 source domains"):
            check_algorithm(name, {}, Recipe(num_domains=1, num_classes=5))


# ---------------------------------------------------------------------- SD


def test_sd_penalty_by_hand_and_erm_at_zero():
    net, batches = make_net(), make_batches()
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    logits = net(x)
    loss, metrics = build("sd", net, {"sd_reg": 0.3}).host.loss(batches, 0)
    assert torch.allclose(metrics["penalty"], (logits**2).sum() / logits.numel())
    assert torch.allclose(loss, F.cross_entropy(logits, y) + 0.3 * (logits**2).mean())
    zero, _ = build("sd", net, {"sd_reg": 0.0}).host.loss(batches, 0)
    erm, _ = build("erm", net).host.loss(batches, 0)
    assert torch.equal(zero, erm)


# ---------------------------------------------------------------------- RSC


def test_rsc_masks_by_hand():
    grads = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    # 75th percentile of (1, 2, 3, 4) is 3.25: the largest gradient of each example is muted.
    assert feature_mask_equals(grads, 0.25, [[1, 1, 1, 0], [0, 1, 1, 1]])
    assert feature_mask_equals(grads, 0.5, [[1, 1, 0, 0], [0, 0, 1, 1]])
    # The percentile is strict: at 5 features it lands on the 4th value (4.0), which is muted too.
    assert feature_mask_equals(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]]), 0.25, [[1, 1, 1, 0, 0]])
    changes = torch.tensor([0.1, 0.5, 0.2])
    batch = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.0, 0.3])  # the global batch; its 50th percentile is 0.25
    assert robust.sample_mask(changes, batch, 0.5).flatten().tolist() == [1.0, 0.0, 1.0]


def feature_mask_equals(grads, drop, expected):
    return robust.feature_mask(grads, drop).tolist() == [[float(v) for v in row] for row in expected]


def test_and_mask_by_hand():
    grads = torch.tensor([[1.0, -2.0, 3.0, 4.0], [2.0, 1.0, -1.0, 2.0]])
    gradient, mask = robust.and_mask(grads, [1, 3], tau=1.0)
    assert mask.tolist() == [1.0, 0.0, 0.0, 1.0]
    # mean (1.5, -0.5, 1, 3); the first tensor keeps all of its entry, the second a third: its kept one triples.
    assert torch.allclose(gradient, torch.tensor([1.5, 0.0, 0.0, 9.0]))
    three = torch.tensor([[1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])  # agreement 1 and 1/3
    assert robust.and_mask(three, [2], tau=0.5)[1].tolist() == [1.0, 0.0]


def test_sand_mask_by_hand():
    grads = torch.tensor([[1.0, -2.0, 3.0, 4.0], [3.0, 2.0, -1.0, 4.0]])
    gradient, mask = robust.sand_mask(grads, [1, 3], tau=0.5, k=1.0)
    # variances (2, 8, 8, 0), agreements (1, 0, 0, 1): tanh(0.5 / 2), two negatives clipped to 0, tanh(inf) = 1.
    t = math.tanh(0.25)
    assert torch.allclose(mask, torch.tensor([t, 0.0, 0.0, 1.0]))
    # mean (2, 0, 1, 4); per tensor, divided by the mean mask: t and 1/3.
    assert torch.allclose(gradient, torch.tensor([2 * t / t, 0.0, 0.0, 4.0 * 3]))
    # Zero variance at agreement == tau is 0 / 0: DomainBed's 1e-17.
    _, nan_mask = robust.sand_mask(torch.tensor([[1.0, 1.0], [1.0, 3.0]]), [2], tau=1.0, k=1.0)
    assert nan_mask[0] == pytest.approx(1e-17) and nan_mask[1] == 0.0


def test_andmask_at_tau_zero_steps_on_the_mean_domain_gradient():
    net, batches = make_net(), make_batches()
    expected = sgd_step(net, mean_domain_gradient(copy.deepcopy(net), batches) / (1 + 1e-10))
    build("andmask", net, {"tau": 0.0}).update(batches, 0)
    assert torch.allclose(flat_params(net), expected, atol=1e-7)


def test_sandmask_update_applies_the_mask():
    net, batches = make_net(), make_batches()
    reference = copy.deepcopy(net)
    grads, _ = per_domain_gradients(reference, batches, FlatParams.of(reference))
    combined, _ = robust.sand_mask(grads, FlatParams.of(reference).numels, 0.5, 10.0)
    metrics = build("sandmask", net, {"tau": 0.5, "k": 10.0}).update(batches, 0)
    assert torch.allclose(flat_params(net), sgd_step(reference, combined), atol=1e-6)
    assert 0.0 < metrics["mask"] < 1.0


# ---------------------------------------------------------------------- IGA


def test_iga_at_zero_penalty_steps_on_the_mean_domain_gradient():
    net, batches = make_net(), make_batches()
    expected = sgd_step(net, mean_domain_gradient(copy.deepcopy(net), batches))
    build("iga", net, {"penalty": 0.0}).update(batches, 0)
    assert torch.allclose(flat_params(net), expected, atol=1e-7)


def test_iga_refuses_fp16():
    with pytest.raises(DGZooError, match="fp16"):
        check_algorithm("iga", {}, Recipe(num_domains=3, num_classes=5, mixed_precision="fp16"))


class ThreadRuntime(Runtime):
    """Process ``rank`` of ``world`` simulated by a thread: all_reduce_mean averages the threads' tensors."""

    def __init__(self, rank, world, slots, barrier):
        super().__init__()
        self.process_index, self.num_processes, self.slots, self.barrier = rank, world, slots, barrier

    def all_reduce_mean(self, tensor):
        self.slots[self.process_index] = tensor.detach().clone()
        self.barrier.wait()
        mean = sum(self.slots) / self.num_processes
        self.barrier.wait()
        return tensor.copy_(mean)


def test_iga_on_two_simulated_processes_equals_one_on_the_global_batch():
    batches = make_batches()
    single = make_net().eval()  # frozen BatchNorm: the one per-process difference the docstring allows
    build("iga", single, {"penalty": 100.0}).update(batches, 0)
    nets, slots, barrier = [make_net().eval() for _ in range(2)], [None, None], threading.Barrier(2)
    algos = [
        create_algorithm(
            "iga",
            net,
            3,
            {"penalty": 100.0},
            runtime=ThreadRuntime(r, 2, slots, barrier),
            make_optimizer=lambda g: torch.optim.SGD(g, lr=LR),
        )
        for r, net in enumerate(nets)
    ]
    shares = [[(x[2 * r : 2 * r + 2], y[2 * r : 2 * r + 2]) for x, y in batches] for r in range(2)]
    threads = [threading.Thread(target=a.update, args=(s, 0)) for a, s in zip(algos, shares)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(flat_params(nets[0]), flat_params(nets[1]))
    assert torch.allclose(flat_params(nets[0]), flat_params(single), atol=1e-6)


def test_groupdro_q_is_the_global_batch_one_on_every_simulated_process():
    batches, eta = make_batches(), 0.5
    single = build("groupdro", make_net().eval(), {"groupdro_eta": eta})
    single.host.loss(batches, 0)
    slots, barrier = [None, None], threading.Barrier(2)
    algos = [
        create_algorithm(
            "groupdro", make_net().eval(), 3, {"groupdro_eta": eta}, runtime=ThreadRuntime(r, 2, slots, barrier)
        )
        for r in range(2)
    ]
    shares = [[(x[2 * r : 2 * r + 2], y[2 * r : 2 * r + 2]) for x, y in batches] for r in range(2)]
    threads = [threading.Thread(target=a.host.loss, args=(s, 0)) for a, s in zip(algos, shares)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(algos[0].host.q, algos[1].host.q)
    assert torch.allclose(algos[0].host.q, single.host.q, atol=1e-6)
    assert not torch.allclose(single.host.q, torch.full((3,), 1 / 3), atol=1e-3)
