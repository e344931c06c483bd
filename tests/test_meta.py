"""MLDG, Fish and TRM: their updates against references computed from their definitions (MLDG without its
meta-test term, Fish's interpolation), the split, TRM's ERM phase and its Neumann series on an explicit Hessian."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import autograd, nn

import dgzoo.algorithms.meta  # registers mldg, fish, trm
from dgzoo.algorithms import Recipe, check_algorithm, create_algorithm
from dgzoo.algorithms.seeding import derive_seed
from dgzoo.errors import DGZooError
from dgzoo.models import create_backbone

LR, WD = 1e-3, 1e-3


def make_batches(seed=0, b=4, domains=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 5, (b,), generator=g)) for _ in range(domains)]


def build(name, hparams, optimizer=lambda g: torch.optim.Adam(g, lr=LR, weight_decay=WD)):
    """The algorithm and an identical copy of its initial network for the replay."""
    torch.manual_seed(0)
    network = create_backbone("test_resnet", num_classes=5)
    reference = copy.deepcopy(network)
    return create_algorithm(name, network, 3, hparams, make_optimizer=optimizer), reference


def assert_same_state(ours, reference, atol=1e-6):
    theirs = reference.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.allclose(value.float(), theirs[key].float(), atol=atol), key


# ---------------------------------------------------------------------- MLDG


def test_mldg_split_and_domain_count():
    generator = torch.Generator().manual_seed(3)
    pairs = dgzoo.algorithms.meta.meta_train_test_pairs(4, 2, generator)
    assert len(pairs) == 2 and len({i for i, _ in pairs} | {j for _, j in pairs}) == 4
    assert check_algorithm("mldg", {"n_meta_test": 1}, Recipe(num_domains=2, num_classes=5))
    with pytest.raises(DGZooError, match="at least 3 source domains"):
        check_algorithm("mldg", {}, Recipe(num_domains=2, num_classes=5))
    with pytest.raises(DGZooError, match="fp16"):
        check_algorithm("mldg", {}, Recipe(num_domains=3, num_classes=5, mixed_precision="fp16"))


# ---------------------------------------------------------------------- Fish


# ---------------------------------------------------------------------- TRM


def test_trm_before_iters_is_erm():
    sgd = lambda g: torch.optim.SGD(g, lr=0.1)  # noqa: E731
    trm, _ = build("trm", {"iters": 5}, sgd)
    erm, _ = build("erm", {}, sgd)
    for step in range(2):
        trm.update(make_batches(step), step)
        erm.update(make_batches(step), step)
    assert_same_state(trm.host.network, erm.host.network, atol=0)
    assert int(trm.host.update_count) == 2


def test_trm_neumann_terms_on_an_explicit_hessian():
    algorithm, _ = build("trm", {})
    host = algorithm.host
    head = nn.Linear(4, 3)
    features, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])

    def loss_of(flat_weight):
        return F.cross_entropy(F.linear(features, flat_weight.view(3, 4), head.bias), y)

    hessian = autograd.functional.hessian(loss_of, head.weight.detach().reshape(-1))
    v0 = torch.randn(12) * 0.1
    terms = [v0]
    for _ in range(10):
        terms.append(terms[-1] - hessian @ terms[-1])
    expected = 2 * terms[1] + sum(terms[2:])  # DomainBed's series: v_1 twice, no v_0
    assert torch.allclose(host.neumann(head, features, y, v0), expected, atol=1e-6)
    big = torch.full((12,), 6.0)  # 2 v_1 already exceeds 10: the estimate stops after one term
    assert torch.allclose(host.neumann(head, features, y, big), 2 * (big - hessian @ big), atol=1e-5)


def test_trm_refuses_a_single_domain():
    with pytest.raises(DGZooError, match="at least 2 source domains"):
        check_algorithm("trm", {}, Recipe(num_domains=1, num_classes=5))


def test_mldg_without_meta_test_term_steps_on_the_meta_train_gradients():
    """beta = 0: the outer gradient is sum_i G_i / K over the meta-train domains i of the step's split, G_i taken at
    the current weights (the clones' steps then change nothing)."""
    # SGD outside: Adam would amplify float noise in near-zero gradient entries into full-size steps
    algorithm, reference = build("mldg", {"mldg_beta": 0.0, "n_meta_test": 1}, lambda g: torch.optim.SGD(g, lr=0.1))
    batches = make_batches()
    pairs = dgzoo.algorithms.meta.meta_train_test_pairs(
        3, 1, torch.Generator().manual_seed(derive_seed(algorithm.host.seed, 0))
    )
    algorithm.update(batches, 0)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    loss = sum(F.cross_entropy(reference(batches[i][0]), batches[i][1]) for i, _ in pairs) / 3
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for ours, theirs in zip(algorithm.host.network.parameters(), reference.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("meta_lr", [1.0, 0.3])
def test_fish_moves_meta_lr_of_the_way_to_the_inner_loop(meta_lr):
    """One inner Adam step per domain in order gives theta~; the network ends at theta + meta_lr (theta~ - theta)."""
    algorithm, reference = build("fish", {"meta_lr": meta_lr}, lambda g: torch.optim.SGD(g, lr=0.1))
    start = [p.detach().clone() for p in reference.parameters()]
    batches = make_batches()
    algorithm.update(batches, 0)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        optimizer.step()
    for ours, theta, inner in zip(algorithm.host.network.parameters(), start, reference.parameters()):
        assert torch.allclose(ours, theta + meta_lr * (inner - theta), atol=1e-6)


def test_mldg_keeps_the_clones_batchnorm_statistics():
    """Only clones run forward passes; the network's running statistics must follow them (else a network trained
    from scratch is evaluated with its initial statistics: chance accuracy)."""
    algorithm, _ = build("mldg", {"n_meta_test": 1})
    norm = next(m for m in algorithm.host.network.modules() if isinstance(m, nn.BatchNorm2d))
    before = norm.running_mean.clone()
    algorithm.update(make_batches(), 0)
    assert not torch.equal(norm.running_mean, before) and int(norm.num_batches_tracked) == 2
