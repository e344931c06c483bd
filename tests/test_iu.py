"""Identify-and-Unlearn: selection rules, channel writers, masked ascent, influence estimators, DDP, engine."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_processes, tiny_config
from dgzoo.algorithms import EpochContext, create_algorithm, resolve_hparams
from dgzoo.algorithms.influence import FunctionalLoss, kfac_head_influence, largest_eigenvalue, lissa
from dgzoo.algorithms.iu_rules import inter_domain_variance, mad_outliers, outlier_scale, unlearning_scores
from dgzoo.data import DomainImages, eval_loader, eval_transform, load_dg_dataset
from dgzoo.errors import DGZooError
from dgzoo.models import ChannelLayer, create_backbone, data_config, features, masked_ascent


def source_context(model, domains=("0", "30", "60"), n_train=40, n_val=12):
    """A small post-epoch context on rotated-digits: ``n_train`` / ``n_val`` images per source domain."""
    data = load_dg_dataset("rotated-digits")
    tf = eval_transform(data_config(model, 32))
    split = {d: data.rows_by_domain[d] for d in domains}
    return EpochContext(
        epoch=1,
        step=8,
        steps_per_epoch=8,
        source_domains=list(domains),
        source_train=[DomainImages(data, split[d][:n_train], tf, d) for d in domains],
        source_val=[DomainImages(data, split[d][n_train : n_train + n_val], tf, d) for d in domains],
        make_loader=lambda ds, bs: eval_loader(ds, bs),
        batch_size=16,
    )


def fit(model, context, steps=15):
    """A few Adam steps on the context's training images, so scores and channels are not those of noise."""
    images = [
        context.source_train[d][i]
        for d in range(len(context.source_train))
        for i in range(len(context.source_train[d]))
    ]
    x, y = torch.stack([im for im, _ in images]), torch.tensor([label for _, label in images])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        index = torch.randint(len(y), (48,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    return x, y


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation, costly on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fitted():
    """A test_resnet fitted a little on 3 rotated-digits domains, with its post-epoch context."""
    torch.manual_seed(0)
    model = create_backbone("test_resnet", num_classes=10)
    context = source_context(model)
    fit(model, context)
    return model, context


# ----------------------------------------------------------------------------- selection rules


def test_mad_thresholds_flag_only_the_tails():
    scores = torch.tensor([10.0, 11.0, 12.0, 13.0, 14.0, 0.0])  # median 11.5, MAD 1.5
    assert mad_outliers(scores, 2.0, "lower").tolist() == [False] * 5 + [True]  # < 8.5
    assert not mad_outliers(scores, 2.0, "upper").any()  # > 14.5
    assert mad_outliers(scores, 0.5, "lower").tolist() == [True, False, False, False, False, True]  # < 10.75
    assert mad_outliers(torch.tensor([1.0, 2.0, 3.0, 4.0, 40.0]), 2.0, "upper").tolist() == [False] * 4 + [True]


def test_idv_is_the_variance_of_per_domain_variances():
    pattern = torch.tensor([-1.0, 1.0, -1.0, 1.0])  # population variance 1, mean 0
    stds, means = [1.0, 2.0, 3.0], [1.0, 5.0, 9.0]
    # channel 0: variances 1, 4, 9 in the three domains, equal means; channel 1: variance 4 everywhere,
    # means 1, 5, 9 (the reviewer's case); channel 2: identical in every domain.
    domains = [torch.stack([pattern * s, means[d] + 2 * pattern, 3 + pattern], dim=1) for d, s in enumerate(stds)]
    domains[2] = torch.cat([domains[2], domains[2]])  # a domain twice as large weighs the same
    idv = inter_domain_variance(domains)
    assert torch.allclose(idv, torch.tensor([torch.tensor([1.0, 4.0, 9.0]).var(unbiased=False), 0.0, 0.0]))
    with_means = inter_domain_variance(domains, with_means=True)
    assert with_means[1] == pytest.approx(torch.tensor(means).var(unbiased=False).item()) and with_means[2] == 0


def test_unlearning_score_is_low_for_unhelpful_complex_samples():
    g = torch.tensor([5.0, 5.0, -3.0, 1.0])
    c = torch.tensor([1.0, 4.0, 1.0, 1.0])
    u = unlearning_scores(g, c, alpha=2.0)
    assert u.argmin() == 2 and u[0] > u[1] and u.min() > 0  # min-max keeps G^alpha defined and positive
    assert torch.allclose(unlearning_scores(g, c, 1.0, "signed"), g / c)


def test_the_readme_job_scores_have_a_lower_tail_on_the_log_scale():
    """IU's first call on the README's job (erm+iu, iu.every=15, 45 steps, seed 0): on the linear scale U's median
    absolute deviation is 2/3 of its median, so median - 2 MAD < 0 <= every U and D_u was empty (3 of 3 calls). The
    default log scale selects a lower tail, and it is the harmful samples (G < 0) the score is meant to find."""
    data = json.loads((Path(__file__).parent / "data" / "iu_readme_job_scores.json").read_text())
    g, c = torch.tensor(data["generalisation"]), torch.tensor(data["complexity"])
    hp = resolve_hparams("erm+iu", {})["iu"]
    assert hp["score_scale"] == "log"
    u = unlearning_scores(g, c, hp["alpha"], hp["g_transform"])
    assert not mad_outliers(outlier_scale(u, "linear"), hp["k"], "lower").any()  # the rule as written: nothing
    selected = mad_outliers(outlier_scale(u, hp["score_scale"]), hp["k"], "lower")
    harmful = g < 0
    assert 0.05 < selected.float().mean() < 0.2
    assert (selected & harmful).sum() >= 0.9 * harmful.sum()  # nearly every harmful sample
    assert u[selected].max() < u[~selected].min()  # the lowest U, whatever the scale
    with pytest.raises(DGZooError, match="score_scale=linear"):
        resolve_hparams("erm+iu", {"iu.g_transform": "signed"})


# ----------------------------------------------------------------------------- channels and their writers


def perturbed_channels(model, slices, channel, probe):
    """Which output channels change when the given parameter slices that write ``channel`` are perturbed."""
    model.eval()
    with torch.no_grad():
        before = probe(model)
        for s in slices:
            rows = s.index[s.channel == channel]
            s.param.index_add_(s.dim, rows, 0.5 + torch.rand_like(s.param.index_select(s.dim, rows)))
        return ((probe(model) - before).abs().amax(0) > 1e-6).nonzero().flatten().tolist()


@pytest.mark.parametrize("arch", ["resnet", "bottleneck", "densenet", "vit"])
def test_channel_writers_write_only_their_channel(arch):
    torch.manual_seed(0)
    # Perturbing every writer of channel c must change channel c alone, as long as no later layer of the stage
    # reads c back (true for a one-block ResNet stage, a DenseNet's last layer and a ViT block's MLP output).
    x = torch.randn(6, 3, 32, 32)
    channels = (0, 3)
    if arch == "resnet":
        model = create_backbone("test_resnet", num_classes=10)
        layer = ChannelLayer(model)
        slices = layer.slices
        assert {s.name.rsplit(".", 1)[0] for s in layer.slices} == {
            "layer4.0.conv2",
            "layer4.0.bn2",
            "layer4.0.downsample.1",
            "layer4.0.downsample.2",
        }
        probe = lambda m: features(m, x)  # noqa: E731
    elif arch == "bottleneck":
        model = create_backbone("test_resnet", num_classes=10)
        layer = ChannelLayer(model, "layer3")
        slices = layer.slices
        assert {s.name.rsplit(".", 1)[0] for s in slices} == {
            "layer3.0.conv3",
            "layer3.0.bn3",
            "layer3.0.downsample.1",
            "layer3.0.downsample.2",
        }
        out = []
        model.layer3.register_forward_hook(lambda m, i, o: out.append(layer.reduce(o)))
        probe = lambda m: (m.forward_features(x), out.pop())[1]  # noqa: E731
    elif arch == "densenet":
        from timm.models.densenet import DenseNet

        model = DenseNet(growth_rate=4, block_config=(1, 2), num_classes=3, bn_size=2)
        layer = ChannelLayer(model)
        slices = layer.slices
        assert layer.num_channels == 14 and sorted(
            torch.cat([s.channel for s in layer.slices if "conv" in s.name]).tolist()
        ) == list(range(14))
        probe = lambda m: features(m, x)  # noqa: E731
        channels = (12, 13)  # written by the last dense layer; earlier channels are also read by later layers
    else:
        model = create_backbone("test_vit", num_classes=10, image_size=32)
        layer = ChannelLayer(model, "blocks.5")  # the residual stream; the final LayerNorm mixes channels
        slices = [s for s in layer.slices if s.name.startswith("blocks.5.mlp.fc2")]
        assert {s.name for s in ChannelLayer(model).slices} >= {
            "blocks.5.attn.proj.weight",
            "blocks.5.mlp.fc2.weight",
            "norm.weight",
            "norm.bias",
        }
        out = []
        model.blocks[5].register_forward_hook(lambda m, i, o: out.append(o))
        probe = lambda m: (m.forward_features(x), out.pop())[1].flatten(0, 1)  # noqa: E731
    for channel in channels:
        assert perturbed_channels(model, slices, channel, probe) == [channel]


def test_layer_choices_are_validated():
    model = create_backbone("test_resnet", num_classes=10)
    assert ChannelLayer(model, "layer3").num_channels == model.layer3[-1].bn3.num_features == 192
    with pytest.raises(DGZooError, match="not a module"):
        create_algorithm(
            "erm+iu", model, 3, make_optimizer=lambda g: torch.optim.SGD(g, lr=0.1), hparams={"iu.layer": "layer9"}
        )
    with pytest.raises(DGZooError, match="include_head=true needs iu.layer=auto"):
        ChannelLayer(model, "layer3", include_head=True)
    other = create_backbone("test_efficientnet", num_classes=10)
    with pytest.raises(DGZooError, match="knows timm ResNet, DenseNet and VisionTransformer"):
        create_algorithm("erm+iu", other, 3, make_optimizer=lambda g: torch.optim.SGD(g, lr=0.1), hparams={})


def test_masked_ascent_writes_only_the_selected_slices():
    torch.manual_seed(0)
    model = create_backbone("test_resnet", num_classes=10).eval()
    layer = ChannelLayer(model, include_head=True)
    channels = torch.zeros(layer.num_channels, dtype=torch.bool)
    channels[[1, 7]] = True
    params = layer.parameters()
    grads = [torch.ones_like(p) for p in params]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masked_ascent(params, grads, layer.slices, channels, lr=0.1)
    for name, p in model.named_parameters():
        changed = p != before[name]
        if name == "fc.weight":
            assert changed.any(0).nonzero().flatten().tolist() == [1, 7], name  # the head's input columns
        elif any(s.name == name for s in layer.slices):
            assert changed.reshape(len(p), -1).any(1).nonzero().flatten().tolist() == [1, 7], name
        else:
            assert not changed.any(), name


# ----------------------------------------------------------------------------- one IU call


def test_iu_call_ascends_only_selected_channels_and_raises_the_unlearning_loss(fitted):
    model, context = copy.deepcopy(fitted[0]), fitted[1]
    algorithm = create_algorithm(
        "erm+iu", model, 3, make_optimizer=lambda g: torch.optim.Adam(g), hparams={"iu.k": 1.0}
    )
    iu = algorithm.addons[0]
    optimizer_state = copy.deepcopy(algorithm.host.optimizer.state_dict())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    metrics = algorithm.on_epoch_end(context)
    assert model.training  # restored after IU's eval-mode work
    assert metrics["iu/unlearn_samples"] == len(iu.selected_rows) > 0
    assert metrics["iu/channels"] == len(iu.selected_channels) > 0
    assert metrics["iu/unlearn_loss_after"] > metrics["iu/unlearn_loss_before"]
    assert {"iu/val_acc_before", "iu/val_acc_after", "iu/seconds"} <= set(metrics)
    writers = {s.name for s in iu.layer.slices}
    edited = set()
    for name, p in model.named_parameters():
        changed = set((p.detach() != before[name]).reshape(len(p), -1).any(1).nonzero().flatten().tolist())
        if name in writers:
            assert changed <= set(iu.selected_channels), name
            edited |= changed
        else:
            assert not changed, name  # bit-identical
    assert edited  # (a channel that is zero on every sample of D_u gets no gradient, so no edit)
    assert algorithm.host.optimizer.state_dict() == optimizer_state  # host optimizer untouched
    assert iu.summary()["calls"] == 1 and iu.summary()["history"][0]["step"] == 8


def selected_pool(context, rows):
    """(images, labels, domain) of the given dataset rows of the context's training data, in that order."""
    where = {int(r): (d, i) for d, ds in enumerate(context.source_train) for i, r in enumerate(ds.rows)}
    samples = [context.source_train[where[r][0]][where[r][1]] for r in rows]
    return torch.stack([x for x, _ in samples]), torch.tensor([y for _, y in samples])


def val_pool(context):
    images = [
        (context.source_val[d][i], d) for d in range(len(context.source_val)) for i in range(len(context.source_val[d]))
    ]
    return (
        torch.stack([x for (x, _), _ in images]),
        torch.tensor([y for (_, y), _ in images]),
        torch.tensor([d for _, d in images]),
    )


@torch.no_grad()
def eval_loss(model, x, y):
    return F.cross_entropy(model.eval()(x), y).item()


@pytest.mark.parametrize("target", [1.25, 2.0])
def test_calibrated_ascent_reaches_its_target_rise(fitted, target):
    model, context = copy.deepcopy(fitted[0]), fitted[1]
    before = copy.deepcopy(model)
    algorithm = create_algorithm(
        "erm+iu",
        model,
        3,
        make_optimizer=lambda g: torch.optim.Adam(g),
        hparams={"iu.k": 1.0, "iu.target_rise": target, "iu.max_val_drop": 1.0},
    )
    metrics = algorithm.on_epoch_end(context)
    iu = algorithm.addons[0]
    assert metrics["iu/target_reached"] == 1.0 and metrics["iu/acted"] == 1.0
    # Measured independently, on the selected samples, with the weights before and after the call: the D_u loss
    # rose by at least the target and by at most a tenth of (target - 1) more (the search's stopping rule).
    x, y = selected_pool(context, iu.selected_rows)
    rise = eval_loss(model, x, y) / eval_loss(before, x, y)
    assert target * (1 - 1e-4) <= rise <= target + 0.1 * (target - 1) + 1e-4
    assert metrics["iu/unlearn_loss_rise"] == pytest.approx(rise, rel=1e-4)


def test_calibrated_ascent_keeps_within_the_validation_cap(fitted):
    model, context = copy.deepcopy(fitted[0]), fitted[1]
    x, y, _ = val_pool(context)
    with torch.no_grad():
        accuracy_before = (model.eval()(x).argmax(1) == y).float().mean().item()
    # The linear-scale selection: its D_u's x50 rise costs validation accuracy on this barely fitted model, which
    # is what the cap is tested on (the log scale's D_u reaches x50 at chance-level accuracy, with nothing to cap).
    algorithm = create_algorithm(
        "erm+iu",
        model,
        3,
        make_optimizer=lambda g: torch.optim.Adam(g),
        hparams={"iu.k": 1.0, "iu.target_rise": 50.0, "iu.max_val_drop": 0.0, "iu.score_scale": "linear"},
    )
    metrics = algorithm.on_epoch_end(context)
    with torch.no_grad():
        accuracy_after = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert accuracy_after >= accuracy_before and metrics["iu/val_acc_after"] == pytest.approx(accuracy_after)
    assert metrics["iu/val_capped"] == 1.0 and metrics["iu/unlearn_loss_rise"] < 50.0


def test_dsga_lowers_the_idv_of_the_selected_channels(fitted):
    # On this fitted model, one calibrated DSGA call shrinks the domain-specific channels: their inter-domain
    # variance on the source validation images (not used to select them) drops, the mechanism the paper claims.
    model, context = copy.deepcopy(fitted[0]), fitted[1]
    x, _, domain = val_pool(context)

    def idv(net, channels):
        with torch.no_grad():
            feats = features(net.eval(), x)
        return inter_domain_variance([feats[domain == d] for d in range(3)])[channels].mean().item()

    before = copy.deepcopy(model)
    algorithm = create_algorithm(
        "erm+iu", model, 3, make_optimizer=lambda g: torch.optim.Adam(g), hparams={"iu.k": 1.0}
    )
    metrics = algorithm.on_epoch_end(context)
    channels = algorithm.addons[0].selected_channels
    assert channels and idv(model, channels) < idv(before, channels)
    assert metrics["iu/idv_before"] == pytest.approx(idv(before, channels), rel=1e-4)
    assert metrics["iu/idv_after"] == pytest.approx(idv(model, channels), rel=1e-4)
    assert metrics["iu/idv_drop"] == pytest.approx(1 - idv(model, channels) / idv(before, channels), rel=1e-3)


def test_literal_ascent_is_one_unit_step_on_the_summed_loss(fitted):
    model, context = copy.deepcopy(fitted[0]), fitted[1]
    reference = copy.deepcopy(model).eval()
    algorithm = create_algorithm(
        "erm+iu",
        model,
        3,
        make_optimizer=lambda g: torch.optim.Adam(g),
        hparams={"iu.k": 1.0, "iu.ascent": "literal", "iu.batch_size": 1000},
    )
    algorithm.on_epoch_end(context)
    iu = algorithm.addons[0]
    # theta_c <- theta_c + grad_theta_c sum_{x in D_u} CE(x), on the writers of C_spc only (one minibatch here)
    x, y = selected_pool(context, iu.selected_rows)
    layer = ChannelLayer(reference)
    params = layer.parameters()
    grads = torch.autograd.grad(F.cross_entropy(reference(x), y, reduction="sum"), params)
    mask = torch.zeros(layer.num_channels, dtype=torch.bool)
    mask[iu.selected_channels] = True
    masked_ascent(params, grads, layer.slices, mask, lr=1.0)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_cached_tail_passes_change_nothing_but_the_cost(fitted):
    runs = []
    for cache in (1024, 0):
        model = copy.deepcopy(fitted[0])
        algorithm = create_algorithm(
            "erm+iu",
            model,
            3,
            make_optimizer=lambda g: torch.optim.Adam(g),
            hparams={"iu.k": 1.0, "iu.cache_mb": cache},
        )
        assert (algorithm.addons[0].tail is not None) == bool(cache)  # a ResNet: the tail is layer4 onwards
        runs.append((model, algorithm.on_epoch_end(fitted[1])))
    (cached, with_cache), (plain, without) = runs
    assert with_cache.keys() == without.keys()
    for key in with_cache:
        if key != "iu/seconds":
            assert with_cache[key] == pytest.approx(without[key], rel=1e-4, abs=1e-6), key
    for p, q in zip(cached.parameters(), plain.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_a_call_that_changes_nothing_warns_and_says_why(fitted, caplog, monkeypatch):
    import logging

    monkeypatch.setattr(logging.getLogger("dgzoo"), "propagate", True)
    model, context = copy.deepcopy(fitted[0]), fitted[1]
    algorithm = create_algorithm(
        "erm+iu",
        model,
        3,
        make_optimizer=lambda g: torch.optim.Adam(g),
        hparams={"iu.k": 1.0, "iu.ascent": "fixed", "iu.lr": 1e-6},
    )
    with caplog.at_level("WARNING", logger="dgzoo"):
        metrics = algorithm.on_epoch_end(context)
    assert metrics["iu/acted"] == 0.0 and abs(metrics["iu/unlearn_loss_rise"] - 1) < 1e-3
    assert "did nothing measurable: the D_u loss rose only x1.000" in caplog.text
    assert algorithm.addons[0].diagnostics()["acted_fraction"] == 0.0


def test_ablations_change_what_is_ascended(fitted):
    model, context = fitted
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        algorithm = create_algorithm(
            "erm+iu",
            model,
            3,
            make_optimizer=lambda g: torch.optim.SGD(g, lr=0.1),
            hparams={"iu.params": "all", "iu.k": 1.0},
        )
        metrics = algorithm.on_epoch_end(context)
        assert "iu/channels" not in metrics and metrics["iu/unlearn_samples"] > 0
        assert all(not torch.equal(p, snapshot[n]) for n, p in model.named_parameters())  # every parameter
        model.load_state_dict(snapshot)
        algorithm = create_algorithm(
            "erm+iu", model, 3, make_optimizer=lambda g: torch.optim.SGD(g, lr=0.1), hparams={"iu.samples": "all"}
        )
        assert algorithm.on_epoch_end(context)["iu/unlearn_samples"] == 120  # every training sample
        model.load_state_dict(snapshot)
        algorithm = create_algorithm(
            "erm+iu", model, 3, make_optimizer=lambda g: torch.optim.SGD(g, lr=0.1), hparams={"iu.score_fraction": 0.5}
        )
        algorithm.on_epoch_end(context)
        scored = algorithm.addons[0].score_rows
        all_rows = {int(r) for domain in context.source_train for r in domain.rows}
        assert len(scored) == len(set(scored)) == 60 and set(scored) <= all_rows  # 20 of 40 in each domain
        with pytest.raises(DGZooError, match="score_fraction=0.0 must be in"):
            create_algorithm(
                "erm+iu",
                model,
                3,
                make_optimizer=lambda g: torch.optim.SGD(g, lr=0.1),
                hparams={"iu.score_fraction": 0},
            )
    finally:
        model.load_state_dict(snapshot)


def test_iue_smooths_scores_per_sample_and_checkpoints_them(fitted):
    model, _ = fitted
    algorithm = create_algorithm(
        "erm+iue",
        model,
        3,
        make_optimizer=lambda g: torch.optim.SGD(g, lr=0.1),
        hparams={"iue.beta": 0.5, "iue.ema_normalize": False},
    )
    iue = algorithm.addons[0]
    first = iue._smooth(torch.tensor([1.0, 2.0]), np.array([10, 11]))
    second = iue._smooth(torch.tensor([3.0, 3.0, 5.0]), np.array([10, 11, 12]))
    assert first.tolist() == [1.0, 2.0] and second.tolist() == [2.0, 2.5, 5.0]  # new rows start at their score
    clone = create_algorithm(
        "erm+iue", model, 3, make_optimizer=lambda g: torch.optim.SGD(g, lr=0.1), hparams={}
    ).addons[0]
    clone.load_extra_state(iue.extra_state())
    assert clone.ema == iue.ema == {10: 2.0, 11: 2.5, 12: 5.0}


# ----------------------------------------------------------------------------- influence estimators


def test_lissa_matches_the_exact_inverse_hessian_product_on_a_convex_model():
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    model = torch.nn.Linear(5, 3)  # multinomial logistic regression: a convex loss
    loss = FunctionalLoss(model, ["weight", "bias"])
    hessian = torch.stack([loss.hvp(x, y, e[None])[0] for e in torch.eye(loss.numel)])
    damping = 0.2
    vectors = torch.randn(4, loss.numel)
    exact = torch.linalg.solve(hessian + damping * torch.eye(loss.numel), vectors.T).T
    top = largest_eigenvalue(lambda v: loss.hvp(x, y, v), loss.numel, iterations=50)
    assert top == pytest.approx(torch.linalg.eigvalsh(hessian).max().item(), rel=1e-3)
    approx = lissa(lambda v, j: loss.hvp(x, y, v), vectors, depth=120, scale=1.5 * (top + damping), damping=damping)
    assert torch.allclose(approx, exact, rtol=1e-3, atol=1e-4)
    with pytest.raises(DGZooError, match="LiSSA diverged"):
        lissa(lambda v, j: loss.hvp(x, y, v), vectors, depth=60, scale=0.1 * top, damping=damping)


def test_kfac_influence_is_exact_when_every_sample_has_the_same_softmax():
    # A zero head gives every sample the same probabilities, so the head Hessian is exactly A (x) B.
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 3)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    phi, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    val_phi, val_y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    probs, val_probs = head(phi).softmax(1).detach(), head(val_phi).softmax(1).detach()
    g, c = kfac_head_influence(phi, probs, y, val_phi, val_probs, val_y, damping=0.01)
    loss = FunctionalLoss(head, ["weight", "bias"])
    hessian = torch.stack([loss.hvp(phi, y, e[None])[0] for e in torch.eye(loss.numel)]).double()
    # G = sum_z grad L(z)^T (H + damping I)^-1 grad L(x), C = ||(H + damping I)^-1 grad L(x)||, as LiSSA estimates.
    ihvp = torch.linalg.solve(hessian + 0.01 * torch.eye(loss.numel), loss.per_sample_grads(phi, y).double().T).T
    assert torch.allclose(c.double(), ihvp.norm(dim=1), rtol=1e-4)
    assert torch.allclose(g.double(), ihvp @ loss.grad_sum(val_phi, val_y).double(), rtol=1e-4, atol=1e-6)


def rank_correlation(a, b):
    ranks = [x.argsort().argsort().double() for x in (a, b)]
    return torch.corrcoef(torch.stack(ranks))[0, 1].item()


def test_fast_and_faithful_scores_rank_correlate(fitted):
    model, context = fitted
    scores = {}
    for mode in ("fast", "faithful"):
        algorithm = create_algorithm(
            "erm+iu",
            model,
            3,
            make_optimizer=lambda g: torch.optim.SGD(g, lr=0.1),
            hparams={"iu.mode": mode, "iu.influence_params": "head", "iu.ascent": "fixed", "iu.lr": 0.0},
        )
        metrics = algorithm.on_epoch_end(context)
        scores[mode] = algorithm.addons[0].scores
    assert metrics["iu/lissa_scale"] > 0  # estimated by power iteration
    assert rank_correlation(scores["fast"], scores["faithful"]) > 0.8


# ----------------------------------------------------------------------------- processes and the engine

DDP_SCRIPT = r"""
import json, sys, torch
from accelerate import Accelerator
from dgzoo.algorithms import EpochContext, create_algorithm
from dgzoo.data import DomainImages, eval_loader, eval_transform, load_dg_dataset
from dgzoo.models import create_backbone, data_config
from dgzoo.training.runtime import AccelerateRuntime

accelerator = Accelerator(cpu=True)
runtime = AccelerateRuntime(accelerator)
torch.manual_seed(0)
model = create_backbone("test_resnet", num_classes=10)
data = load_dg_dataset("rotated-digits")
tf = eval_transform(data_config(model, 32))
domains = ("0", "30", "60")
train = [DomainImages(data, data.rows_by_domain[d][:40], tf, d) for d in domains]
val = [DomainImages(data, data.rows_by_domain[d][40:52], tf, d) for d in domains]
with torch.no_grad():  # BatchNorm statistics of these images, the same on every process
    model.train()(torch.stack([ds[i][0] for ds in train for i in range(len(ds))]))
context = EpochContext(epoch=1, step=8, steps_per_epoch=8, source_domains=list(domains), source_train=train,
                       source_val=val, make_loader=lambda ds, bs: eval_loader(ds, bs), batch_size=16)
out = {}
for label, hparams in [("fast", {"iu.k": 1.0, "iu.lr": 0.05}),
                       ("faithful", {"iu.k": 1.0, "iu.mode": "faithful", "iu.influence_params": "head",
                                     "iu.lissa_depth": 10, "iu.lissa_batch": 32, "iu.lissa_chunk": 16})]:
    algorithm = create_algorithm("erm+iu", model, 3, hparams, runtime=runtime, prepare=accelerator.prepare,
                                 make_optimizer=lambda g: torch.optim.SGD(g, lr=0.1))
    metrics = algorithm.on_epoch_end(context)
    iu = algorithm.addons[0]
    out[label] = {"rows": iu.selected_rows, "channels": iu.selected_channels, "metrics": metrics}
torch.save(model.state_dict(), f"{sys.argv[1]}/weights{accelerator.process_index}.pt")
json.dump(out, open(f"{sys.argv[1]}/selection{accelerator.process_index}.json", "w"))
"""


@pytest.mark.slow
def test_two_processes_select_the_same_samples_and_channels_as_one(tmp_path):
    script = tmp_path / "iu_ddp.py"
    script.write_text(DDP_SCRIPT)
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        out.mkdir()
        run_processes(nproc, [script, out])
    one = json.loads((tmp_path / "p1" / "selection0.json").read_text())
    for rank in (0, 1):
        two = json.loads((tmp_path / "p2" / f"selection{rank}.json").read_text())
        for mode in ("fast", "faithful"):
            assert two[mode]["rows"] == one[mode]["rows"] and two[mode]["channels"] == one[mode]["channels"], mode
            assert len(one[mode]["rows"]) > 0 and len(one[mode]["channels"]) > 0
            for key in ("val_acc_before", "val_acc_after", "unlearn_loss_before", "unlearn_loss_after"):
                assert two[mode]["metrics"][f"iu/{key}"] == pytest.approx(one[mode]["metrics"][f"iu/{key}"], abs=1e-4)
        a, b = torch.load(tmp_path / "p1" / "weights0.pt"), torch.load(tmp_path / "p2" / f"weights{rank}.pt")
        for key in a:
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_engine_runs_iue_every_n_steps_and_reports_it(tmp_path):
    from dgzoo.training.engine import train

    # 2 sources of ~240 training images at 64 per step: an epoch is 4 steps. The data reach the add-on at the
    # end of epoch 1, so with iu.every=2 the calls are at steps 6 and 8.
    cfg = tiny_config(
        tmp_path,
        algorithm="erm+iue",
        source_domains=["0", "30"],
        steps=8,
        batch_size=64,
        eval_every=8,
        hparams={"iue.every": 2},
    )
    results = train(cfg)
    diagnostics = results["diagnostics"]["iue"]
    assert [h["step"] for h in diagnostics["history"]] == [6, 8]
    assert {"unlearn_samples", "channels", "val_acc_before", "val_acc_after", "seconds"} <= set(
        diagnostics["history"][0]
    )
    assert results["hparams"]["iue.every"] == 2 and results["hparams"]["iue.beta"] == 0.9
    acts = diagnostics["acts"]  # "does it act": in results.json, from the same per-call history
    assert acts["calls"] == 2 and acts["acted_fraction"] == sum(h["acted"] for h in diagnostics["history"]) / 2
    assert {"mean_val_acc_change"} <= set(acts)
    assert any(
        "Unlearning During Training" in title or "Unlearning During Training" in bib
        for title, bib in results["citations"]
    )
    record = json.loads((tmp_path / "run" / "records.jsonl").read_text().splitlines()[-1])
    assert "iue/unlearn_samples" in record and "iue/seconds" in record


@pytest.mark.parametrize(
    "hparams, message",
    [
        ({"iu.score_fraction": 0}, "iu.score_fraction=0.0 must be in"),
        ({"iu.score_fraction": 1.5}, "iu.score_fraction=1.5 must be at most 1.0"),
        ({"iu.lr": -1e-3}, "iu.lr=-0.001 must be at least 0"),
        ({"iu.passes": 0}, "iu.passes=0 must be at least 1"),
        ({"iu.mode": "exact"}, "iu.mode='exact' is not one of fast, faithful"),
    ],
)
def test_bad_iu_hyperparameters_fail_before_anything_is_written(tmp_path, hparams, message):
    from dgzoo.training.engine import train

    cfg = tiny_config(tmp_path, algorithm="erm+iu", hparams=hparams)
    with pytest.raises(DGZooError, match=message):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_iu_and_iue_do_not_compose_with_each_other():
    with pytest.raises(DGZooError, match="lists iu and iue, two variants of one add-on"):
        resolve_hparams("erm+iu+iue", {})
    assert set(resolve_hparams("erm+gga+iue", {})) == {"erm", "gga", "iue"}


def test_iue_beta_is_a_fraction():
    assert resolve_hparams("erm+iue", {"iue.beta": 0.5})["iue"]["beta"] == 0.5
    with pytest.raises(DGZooError, match="iue.beta=1.5 must be at most 1.0"):
        resolve_hparams("erm+iue", {"iue.beta": 1.5})


def test_faithful_influence_over_a_whole_large_network_warns_before_the_first_call(caplog, monkeypatch):
    import logging

    monkeypatch.setattr(logging.getLogger("dgzoo"), "propagate", True)  # a training run in this process turns it off
    model = create_backbone("resnet18", num_classes=10)
    with caplog.at_level("WARNING", logger="dgzoo"):
        create_algorithm("erm+iu", model, 3, {"iu.mode": "faithful", "iu.influence_params": "head"})
        create_algorithm("erm+iu", model, 3, {})
        assert not caplog.records  # the head, and the default fast mode, are cheap
        create_algorithm("erm+iu", model, 3, {"iu.mode": "faithful"})
    assert "faithful over all 11.2 M trainable parameters" in caplog.text and "influence_params=head" in caplog.text
