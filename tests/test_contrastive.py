"""SelfReg, CAD and CondCAD: hand-computed bottleneck values, a per-anchor reference of the bottleneck, SelfReg
and the identities (lmbda 0 is ERM; distinct classes leave SelfReg one term)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dgzoo.algorithms import Recipe, check_algorithm, create_algorithm
from dgzoo.algorithms.contrastive import bottleneck_loss, same_class_shuffles  # (registers selfreg, cad, condcad)
from dgzoo.errors import DGZooError
from dgzoo.models import create_backbone


def make_batches(seed=0, b=4, classes=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, classes, (b,), generator=g)) for _ in range(3)]


def build(name, hparams=None, classes=5):
    torch.manual_seed(0)
    return create_algorithm(name, create_backbone("test_resnet", num_classes=classes), 3, hparams or {}).host


# ---------------------------------------------------------------------- CAD / CondCAD


def test_bottleneck_by_hand():
    """One class, domains [0, 0, 1, 1], z . z' = 1 within a domain and 0 across, temperature 1 (scale 1/0.07):
    every anchor sees logits (1, 0, 0) for (same-domain partner, two other-domain samples)."""
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    y, d = torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 1])
    e, scale = math.e, 1 / 0.07
    other = -scale * math.log(2 / (e + 2))  # flipped: -log P(other domain)
    assert bottleneck_loss(z, y, d, 1.0, conditional=False).item() == pytest.approx(other, rel=1e-6)
    assert bottleneck_loss(z, y, d, 1.0, conditional=True).item() == pytest.approx(other, rel=1e-6)
    # Not flipped: log P(same domain); unconditional keeps the anchor itself in its mask, as the logit 0.
    assert bottleneck_loss(z, y, d, 1.0, False, flipped=False).item() == pytest.approx(
        scale * math.log((1 + e) / (e + 2)), rel=1e-6
    )
    assert bottleneck_loss(z, y, d, 1.0, True, flipped=False).item() == pytest.approx(
        scale * math.log(e / (e + 2)), rel=1e-6
    )


def per_anchor_reference(z, y, d, temperature, conditional, flipped):
    """The bottleneck anchor by anchor in plain Python (no masks, no stabilisation)."""
    n, losses = len(z), []
    sim = (z @ z.T / temperature).tolist()
    for i in range(n):
        others = [j for j in range(n) if j != i]
        if not any(y[j] == y[i] for j in others):
            continue
        pool = [j for j in others if y[j] == y[i]] if conditional else others
        total = sum(math.exp(sim[i][j]) for j in pool)
        if flipped:
            hits = [j for j in pool if d[j] != d[i]]
        else:
            hits = [j for j in pool if d[j] == d[i]]
        self_term = 1.0 if (not conditional and not flipped) else 0.0  # DomainBed's mask includes the anchor
        mass = sum(math.exp(sim[i][j]) for j in hits) + self_term
        if mass == 0:
            continue  # -inf or +inf: dropped by the finite mean
        value = math.log(mass / total) * temperature / 0.07
        losses.append(-value if flipped else value)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("flipped", [True, False])
def test_bottleneck_matches_the_per_anchor_definition(conditional, flipped):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(12, 6, generator=g)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 3, 3, 4])
    d = torch.tensor([0, 1, 0, 1, 0, 0, 2, 2, 1, 2, 2, 1])
    expected = per_anchor_reference(z.double(), y.tolist(), d.tolist(), 0.5, conditional, flipped)
    assert bottleneck_loss(z.double(), y, d, 0.5, conditional, flipped).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name", ["cad", "condcad"])
def test_cad_loss_is_cross_entropy_plus_lmbda_bottleneck(name):
    batches = make_batches()
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    d = torch.arange(3).repeat_interleave(4)
    host = build(name, {"lmbda": 0.0, "is_normalized": True}).eval()  # eval: the same features at every pass
    loss, metrics = host.loss(batches, 0)
    assert torch.allclose(loss, F.cross_entropy(host.predict(x), y))  # lmbda 0: ERM's loss
    z = F.normalize(host.featurize(x), dim=1)
    bottleneck = bottleneck_loss(z, y, d, 0.1, name == "condcad")
    assert torch.allclose(metrics["bn_loss"], bottleneck) and bottleneck > 0
    weighted = build(name, {"lmbda": 2.0, "is_normalized": True}).eval()
    assert torch.allclose(weighted.loss(batches, 0)[0], loss + 2.0 * bottleneck, atol=1e-6)


def test_cad_projection_head_is_trained_and_not_exported():
    host = build("cad", {"is_project": True})
    assert host.project[-1].out_features == 128
    loss, _ = host.loss(make_batches(), 0)
    loss.backward()
    assert host.project[0].weight.grad is not None
    assert not any(k.startswith("project") for k in host.network.state_dict())
    with pytest.raises(DGZooError, match="temperature"):
        check_algorithm("cad", {"temperature": 0}, Recipe(num_domains=3, num_classes=5))


# ---------------------------------------------------------------------- SelfReg


def test_same_class_shuffles_stay_in_their_class():
    labels = torch.tensor([0, 0, 0, 2, 2, 3, 4, 4, 4, 4])
    first, second = same_class_shuffles(labels, np.random.default_rng(0))
    for perm in (first, second):
        assert sorted(perm.tolist()) == list(range(10)) and torch.equal(labels[perm], labels)
    assert not torch.equal(first, torch.arange(10)) or not torch.equal(second, torch.arange(10))


def test_selfreg_with_distinct_classes_leaves_the_feature_to_projection_term():
    """Every sample alone in its class: both shuffles are the identity, the logit terms vanish, and the loss is
    CE + min(CE, 1) * 0.3 * MSE(features, cdpl(features)) whatever lam."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 3, 16, 16, generator=g), torch.tensor([2 * k, 2 * k + 1])) for k in range(3)]
    host = build("selfreg", classes=6)
    loss, metrics = host.loss(batches, 0)
    x = torch.cat([b[0] for b in batches])
    features = host.featurize(x)  # labels 0..5 are already sorted: the same order
    ce = F.cross_entropy(host.classify(features), torch.arange(6))
    expected = ce + min(ce.item(), 1.0) * 0.3 * F.mse_loss(features, host.cdpl(features))
    assert torch.allclose(loss, expected, atol=1e-6) and 0 < metrics["lam"] < 1


def selfreg_after_one_update(hparams):
    host_hparams = dict(hparams)
    algorithm = create_algorithm("selfreg", create_backbone("test_resnet", num_classes=5), 3, host_hparams)
    host = algorithm.host
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 0, 1, 1])) for _ in range(3)]
    before = {k: v.clone() for k, v in host.state_dict().items()}
    algorithm.update(batches, 0)
    after = host.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    return host, changed


def test_selfreg_projection_is_never_stepped_by_default_as_domainbed():
    """DomainBed's SelfReg builds its optimizer (ERM's) before ``cdpl``: one update moves the network and cdpl's
    BatchNorm running statistics, never cdpl's weights; ``train_projection=true`` steps them too."""
    host, changed = selfreg_after_one_update({})
    projection_weights = {f"cdpl.{k}" for k, _ in host.cdpl.named_parameters()}
    running = {k for k in changed if k.startswith("cdpl.") and "running" in k}
    assert not changed & projection_weights
    assert running and any(k.startswith("network.") for k in changed)
    assert all(
        id(p) not in {id(q) for group in host.optimizer.param_groups for q in group["params"]}
        for p in host.cdpl.parameters()
    )
    host, changed = selfreg_after_one_update({"train_projection": True})
    assert projection_weights <= changed
