"""SagNet, MTL and Transfer (dgzoo.algorithms.networks): randomisation, gaps and projections by hand, MTL's loss
against a one-Linear reference classifier and its export as the expected logits."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dgzoo.algorithms import create_algorithm
from dgzoo.algorithms.networks import randomize  # importing the module registers its hosts
from dgzoo.models import create_backbone


def minibatches(k=3, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 5, (b,), generator=g)) for _ in range(k)]


def build(spec, hparams=None, seed=0):
    torch.manual_seed(seed)
    net = create_backbone("test_resnet", num_classes=5)
    return create_algorithm(spec, net, 3, hparams or {})


def featurizer(net):
    return lambda x: net.forward_head(net.forward_features(x), pre_logits=True)


def split_params(net):
    head = {id(p) for p in net.get_classifier().parameters()}
    return [p for p in net.parameters() if id(p) not in head], list(net.get_classifier().parameters())


def assert_same_state(a, b, atol=1e-6):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.allclose(sa[key].float(), sb[key].float(), atol=atol), key


# -- SagNet


def test_randomize_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 6.0, 8.0]])  # means 2, 6; unbiased variances 1, 4
    alpha, perm, eps = torch.tensor([[0.25], [0.5]]), torch.tensor([1, 0]), 1e-5
    style = randomize(x, alpha, perm, "style", eps)
    # row 0: mean .25*2+.75*6 = 5, var .25*1+.75*4 = 3.25; row 1: mean 4, var 2.5
    unit = torch.tensor([-1.0, 0.0, 1.0])
    expected = torch.stack(
        [
            unit / math.sqrt(1 + eps) * math.sqrt(3.25 + eps) + 5,
            2 * unit / math.sqrt(4 + eps) * math.sqrt(2.5 + eps) + 4,
        ]
    )
    assert torch.allclose(style, expected)
    content = randomize(x, alpha, perm, "content", eps)
    # row 0 takes row 1's normalised content with its own style (mean 2, var 1)
    assert torch.allclose(content[0], 2 * unit / math.sqrt(4 + eps) * math.sqrt(1 + eps) + 2)
    assert torch.allclose(content[1], unit / math.sqrt(1 + eps) * math.sqrt(4 + eps) + 6)


# -- MTL


def test_mtl_loss_and_step_are_domainbeds_and_export_is_the_expected_logits():
    algorithm = build("mtl")
    host = algorithm.host
    net = copy.deepcopy(host.network)
    f, head = featurizer(net), net.get_classifier()
    # DomainBed's classifier: one Linear(2D, C) on [features, embedding]
    classifier = torch.nn.Linear(2 * head.in_features, 5)
    with torch.no_grad():
        classifier.weight.copy_(torch.cat([head.weight, host.noise_head.weight], 1))
        classifier.bias.copy_(head.bias)
    batches = minibatches()
    torch.manual_seed(3)
    loss, _ = host.loss(batches, 0)
    torch.manual_seed(3)
    expected = 0
    for x, y in batches:
        features = f(x)
        embedding = (
            features.mean(0).view(1, -1).repeat(len(features), 1).normal_()
        )  # the reference: a fresh N(0, I) draw of the embedding's shape
        expected = expected + F.cross_entropy(classifier(torch.cat((features, embedding), 1)), y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)

    # the same gradients (compared before an optimizer step: Adam would amplify float noise in ~0 gradients)
    loss.backward()
    expected.backward()
    for mine, theirs in zip(split_params(host.network)[0], split_params(net)[0]):  # float32 summation order
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-5, atol=1e-5)
    width = head.in_features
    assert torch.allclose(host.network.get_classifier().weight.grad, classifier.weight.grad[:, :width], atol=1e-6)
    assert torch.allclose(host.noise_head.weight.grad, classifier.weight.grad[:, width:], atol=1e-6)
    assert torch.allclose(host.network.get_classifier().bias.grad, classifier.bias.grad, atol=1e-6)
    # the exported network is the classifier at the noise's mean (z = 0): E_z[W [f; z] + b] = W_f f + b
    host.eval(), net.eval()
    x = batches[0][0]
    zero = torch.zeros(len(x), width)
    assert torch.allclose(host.predict(x), classifier(torch.cat((f(x), zero), 1)), atol=1e-5)


# -- Transfer


def test_transfer_gap_and_projection_by_hand():
    host = build("transfer", {"delta": 1.5}).host
    assert host.gap(torch.tensor([0.3, 0.9, 0.1]))[1] == pytest.approx(0.8)
    head = host.network.get_classifier()
    direction = [torch.randn_like(p) for p in head.parameters()]
    norm = torch.sqrt(sum(d.pow(2).sum() for d in direction))
    with torch.no_grad():
        for a, h, d in zip(host.adversary.parameters(), head.parameters(), direction):
            a.copy_(h + 3 * d / norm)  # distance 3 > delta
    assert host.project()
    for a, h, d in zip(host.adversary.parameters(), head.parameters(), direction):
        assert torch.allclose(a, h + 1.5 * d / norm, atol=1e-6)  # pulled back onto the sphere of radius 1.5
    with torch.no_grad():
        for a, h, d in zip(host.adversary.parameters(), head.parameters(), direction):
            a.copy_(h + d / norm)  # distance 1 < delta
    assert not host.project()
    for a, h, d in zip(host.adversary.parameters(), head.parameters(), direction):
        assert torch.allclose(a, h + d / norm)  # inside the ball: unchanged
