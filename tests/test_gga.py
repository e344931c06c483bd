"""Gradient-Guided Annealing: the official search semantics, isolation from the host, determinism, DDP, GGA-L."""

import json

import pytest
import torch

from conftest import ROOT, run_processes
from dgzoo.algorithms import StepContext, create_algorithm, resolve_hparams
from dgzoo.algorithms.gga import GGA, scoring_groups
from dgzoo.algorithms.gradients import FlatParams, pairwise_cosine, per_domain_gradients
from dgzoo.errors import DGZooError
from dgzoo.models import classifier_parameter_names, create_backbone


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: extra intra-op threads only add synchronisation, which on a loaded 2-core machine made this
    # module 4x slower. Restored afterwards, so other modules keep torch's setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def minibatches(k=3, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 5, (b,), generator=g)) for _ in range(k)]


def build(spec, hparams=None, seed=0, dropout=0.0, optimizer="adam"):
    torch.manual_seed(seed)
    model = create_backbone("test_resnet", num_classes=5, dropout=dropout)

    def make(groups):
        return torch.optim.Adam(groups, lr=1e-3) if optimizer == "adam" else torch.optim.SGD(groups, lr=1.0)

    return model, create_algorithm(spec, model, 3, hparams or {}, make_optimizer=make)


def train(spec, hparams=None, steps=3, **kw):
    model, algorithm = build(spec, hparams, **kw)
    metrics = [algorithm.update(minibatches(seed=s), s) for s in range(steps)]
    return model, algorithm, metrics


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("host,batchnorm", [("erm", "restore"), ("erm", "eval"), ("equilibrium", "restore")])
def test_rho_zero_trains_exactly_the_host(host, batchnorm):
    # Training-mode BatchNorm and dropout: the search's extra passes must leave the running statistics and the
    # host's random stream (its dropout masks) exactly as they would be without GGA.
    window = {"gga.start": 0, "gga.end": 2, "gga.candidates": 4, "gga.rho": 0.0, "gga.batchnorm": batchnorm}
    alone, _, host_metrics = train(host, dropout=0.3)
    gga, algorithm, gga_metrics = train(f"{host}+gga", window, dropout=0.3)
    assert_same_state(snapshot(alone), snapshot(gga))
    assert [m["loss"] for m in host_metrics] == [m["loss"] for m in gga_metrics]
    assert algorithm.summary()["gga"]["annealed_steps"] == 3


class ScriptedScores:
    """Stands in for GGA._score: returns scripted (score, loss) values and records the weights at every call."""

    def __init__(self, script, featurizer, head):
        self.script, self.featurizer, self.head, self.seen = list(script), featurizer, head, []

    def __call__(self, groups, buffer):
        self.seen.append(([p.detach().clone() for p in self.featurizer], [p.detach().clone() for p in self.head]))
        return self.script.pop(0)


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def test_official_walk_accept_rule_and_untouched_head(monkeypatch):
    rho = 1e-3
    model, algorithm = build("erm+gga", {"gga.start": 0, "gga.candidates": 5, "gga.rho": rho, "gga.tau": 0.1})
    gga = algorithm.addons[0]
    head_names = classifier_parameter_names(model)
    head = [p for n, p in model.named_parameters() if n in head_names]
    assert head and not any(p is h for p in gga.perturbed for h in head)
    scores = ScriptedScores(
        [
            (0.5, 1.00),  # theta0
            (0.4, 1.00),  # c1: lower score -> reject, its noise stays
            (0.6, 1.05),  # c2: strict gain, loss +0.05 -> accept, walk restarts at theta0
            (0.9, 1.20),  # c3: higher score but loss +0.15 >= tau -> reject
            (0.6, 1.00),  # c4: equal score is not a strict gain -> reject
            (0.65, 1.14),
        ],  # c5: gain, loss +0.09 over the last accept (1.05) -> accept
        gga.perturbed,
        head,
    )
    monkeypatch.setattr(gga, "_score", scores)
    theta0, head0 = flat(gga.perturbed).clone(), flat(head).clone()
    stats = gga.before_update(StepContext(0, minibatches()))

    points = [flat(f) for f, _ in scores.seen]
    steps = [points[i + 1] - points[i] for i in range(len(points) - 1)]
    assert torch.equal(points[0], theta0)
    for i, step in enumerate(steps):
        if i != 2:  # each candidate adds one fresh U(-rho, rho) draw to the previous candidate ...
            assert 0 < step.abs().max() <= rho * (1 + 1e-3)
    # ... except right after the accept (c2), where the walk restarts from theta0: c3 = theta0 + one draw
    assert (points[3] - theta0).abs().max() <= rho * (1 + 1e-3)
    assert (points[2] - theta0).abs().max() > rho  # c2 = theta0 + two accumulated draws
    assert torch.allclose(points[5] - theta0, (points[3] - theta0) + steps[3] + steps[4], atol=1e-6)
    assert all(torch.equal(flat(h), head0) for _, h in scores.seen)  # the head is never perturbed
    assert torch.equal(flat(gga.perturbed), points[5]) and torch.equal(flat(head), head0)  # the last accept
    assert stats == {
        "accepted": 2.0,
        "score_before": 0.5,
        "score_after": 0.65,
        "loss_before": 1.0,
        "loss_after": 1.14,
        "shift": pytest.approx(float((points[5] - theta0).norm()), rel=1e-4),
    }


def test_real_search_moves_to_a_point_of_higher_agreement_within_tau():
    hp = {"gga.start": 0, "gga.end": 0, "gga.candidates": 12, "gga.rho": 2e-2}
    model, algorithm = build("erm+gga", hp)
    batches = minibatches()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    stats = algorithm.addons[0].before_update(StepContext(0, batches))
    assert stats["accepted"] >= 1
    for key, value in model.named_buffers():  # the search's passes left BatchNorm's statistics as they were
        assert torch.equal(value, buffers[key]), key
    # Recompute the agreement at the weights GGA left, with the gradient engine directly.
    grads, losses = per_domain_gradients(model, batches, FlatParams.of(model))
    cos = pairwise_cosine(grads)
    assert cos[torch.triu(torch.ones(3, 3, dtype=torch.bool), 1)].min().item() == pytest.approx(
        stats["score_after"], abs=1e-5
    )
    assert losses.mean().item() == pytest.approx(stats["loss_after"], abs=1e-5)
    assert stats["score_after"] > stats["score_before"]
    assert stats["loss_after"] - stats["loss_before"] < 0.1 * stats["accepted"]  # each accept rises < tau

    model, algorithm = build("erm+gga", {**hp, "gga.tau": -1.0})  # no candidate can lower the loss by 1
    before = snapshot(model)
    assert algorithm.addons[0].before_update(StepContext(0, batches))["accepted"] == 0
    assert_same_state(before, snapshot(model))  # nothing accepted: back exactly at the pre-search weights


def test_same_seed_same_candidates_and_the_seed_matters():
    hp = {"gga.start": 0, "gga.end": 1, "gga.candidates": 6, "gga.rho": 2e-2}
    a, alg_a, _ = train("erm+gga", hp, steps=2, seed=1)
    b, alg_b, _ = train("erm+gga", hp, steps=2, seed=1)
    c, _, _ = train("erm+gga", hp, steps=2, seed=2)
    assert alg_a.summary()["gga"]["steps"] == alg_b.summary()["gga"]["steps"]
    assert alg_a.summary()["gga"]["accepted"] >= 1
    assert_same_state(snapshot(a), snapshot(b))
    assert not torch.equal(a.conv1[0].weight, c.conv1[0].weight)


def test_fixing_dropout_masks_removes_the_mask_lottery():
    # rho = 0: every candidate is the same weights, so only dropout can make a candidate score higher.
    hp = {"gga.start": 0, "gga.end": 0, "gga.candidates": 20, "gga.rho": 0.0}
    _, free, _ = train("erm+gga", hp, steps=1, dropout=0.5)
    _, fixed, _ = train("erm+gga", {**hp, "gga.fix_dropout": True}, steps=1, dropout=0.5)
    assert free.summary()["gga"]["accepted"] > 0  # the official behaviour: lucky masks get accepted
    assert fixed.summary()["gga"]["accepted"] == 0


def test_scoring_groups_in_multi_and_single_source_training():
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6)
    assert [g[1].tolist() for g in scoring_groups([(x, y)], parts=2)] == [[0, 2, 4], [1, 3, 5]]
    views = torch.randn(6, 3, 3, 8, 8)  # 3 augmented views of one source domain: the views are the groups
    groups = scoring_groups([(views, y)])
    assert len(groups) == 3 and torch.equal(groups[1][0], views[:, 1])
    pooled = scoring_groups([(views, y), (views, y)])  # several sources: views are pooled into their domain
    assert len(pooled) == 2 and pooled[0][0].shape == (18, 3, 8, 8) and pooled[0][1][:3].tolist() == [0, 0, 0]
    with pytest.raises(DGZooError, match="parts"):
        scoring_groups([(x[:1], y[:1])], parts=2)


def test_hyperparameters_are_checked_before_training():
    assert resolve_hparams("erm+gga", {})["gga"] == {k: h.default for k, h in GGA.HPARAMS.items()}
    assert {k: resolve_hparams("erm+gga", {})["gga"][k] for k in ("start", "end", "candidates", "rho", "tau")} == {
        "start": 100,
        "end": 200,
        "candidates": 250,
        "rho": 1e-5,
        "tau": 0.1,
    }
    with pytest.raises(DGZooError, match="gga.candidates=0 must be at least 1"):
        resolve_hparams("erm+gga", {"gga.candidates": 0})
    with pytest.raises(DGZooError, match="gga.rho=-1e-05 must be at least 0"):
        resolve_hparams("erm+gga", {"gga.rho": -1e-5})
    with pytest.raises(DGZooError, match="gga.end=50 is before gga.start=100"):
        resolve_hparams("erm+gga", {"gga.end": 50})  # at plan time, before the run directory is written


def test_gga_l_gamma_zero_trains_exactly_the_host():
    erm, _, _ = train("erm", dropout=0.3)
    gga_l, _, metrics = train("erm+gga_l", {"gga_l.gamma": 0.0}, dropout=0.3)
    assert_same_state(snapshot(erm), snapshot(gga_l))
    assert all(m["gga_l/noise_scale"] == 0.0 for m in metrics)


def test_gga_l_noise_is_scaled_by_the_domain_disagreement_on_every_parameter():
    # Plain SGD with lr 1: the only difference with ERM is the noise itself, -gamma (1 - mean cos) xi.
    batches = minibatches()
    erm_model, erm = build("erm", optimizer="sgd")
    model, algorithm = build("erm+gga_l", {"gga_l.gamma": 1e-3}, optimizer="sgd")
    grads, _ = per_domain_gradients(model, batches, FlatParams.of(model))
    similarity = pairwise_cosine(grads)[torch.triu(torch.ones(3, 3, dtype=torch.bool), 1)].mean().item()
    erm.update(batches, 0)
    metrics = algorithm.update(batches, 0)
    assert metrics["gga_l/similarity"] == pytest.approx(similarity, abs=1e-6)
    scale = 1e-3 * (1 - similarity)
    assert metrics["gga_l/noise_scale"] == pytest.approx(scale, rel=1e-6)
    noise = flat([a - b for a, b in zip(erm_model.parameters(), model.parameters())])
    assert noise.std().item() == pytest.approx(scale, rel=0.02) and abs(noise.mean().item()) < 0.02 * scale
    head = flat([erm_model.fc.weight - model.fc.weight])
    assert head.abs().min() > 0  # the official code perturbs the head too


def run_recipe(output_dir, nproc):
    args = [
        "--backbone",
        "test_resnet",
        "--steps",
        "5",
        "--eval-every",
        "5",
        "--batch-size",
        "8",
        "--log-with",
        "none",
        "--num-workers",
        "0",
        "--freeze-bn",
        "--algorithm",
        "erm+gga+gga_l",
        "--output-dir",
        str(output_dir),
        "--hparams",
        "gga.start=1",
        "gga.end=3",
        "gga.candidates=5",
        "gga.rho=2e-3",
    ]
    run_processes(nproc, [ROOT / "recipes" / "train.py", *args])
    return json.loads((output_dir / "results.json").read_text())


@pytest.mark.slow
def test_two_processes_take_the_same_decisions_as_one(tmp_path):
    # GGA-L rides along: its noise must be drawn identically on both processes, or the replicas would drift apart.
    from safetensors.torch import load_file

    one, two = run_recipe(tmp_path / "one", 1), run_recipe(tmp_path / "two", 2)
    steps_one, steps_two = one["diagnostics"]["gga"]["steps"], two["diagnostics"]["gga"]["steps"]
    assert [s["step"] for s in steps_one] == [1, 2, 3]
    assert [s["accepted"] for s in steps_one] == [s["accepted"] for s in steps_two]
    assert sum(s["accepted"] for s in steps_one) >= 1
    for a, b in zip(steps_one, steps_two):
        assert a["score_after"] == pytest.approx(b["score_after"], abs=1e-5)
    weights_one = load_file(tmp_path / "one" / "checkpoints" / "step_5" / "model.safetensors")
    weights_two = load_file(tmp_path / "two" / "checkpoints" / "step_5" / "model.safetensors")
    for key in weights_one:
        assert torch.allclose(weights_one[key].float(), weights_two[key].float(), atol=1e-5), key
    record = json.loads((tmp_path / "one" / "records.jsonl").read_text().splitlines()[-1])
    assert {"gga/accepted", "gga/score_before", "gga/score_after", "gga/loss_before", "gga/loss_after"} <= set(record)
    assert one["hparams"]["gga.candidates"] == 5 and one["algorithm"] == "erm+gga+gga_l"
    assert one["diagnostics"]["gga_l"]["steps"] == 5
    assert one["diagnostics"]["gga_l"]["mean_similarity"] == pytest.approx(
        two["diagnostics"]["gga_l"]["mean_similarity"], abs=1e-5
    )


@pytest.mark.parametrize("name", ["pacs", "vlcs", "office_home", "terra_incognita", "domainnet"])
def test_paper_recipes_carry_the_official_setting(name):
    from dgzoo.config import TrainConfig

    cfg = TrainConfig.from_yaml(ROOT / "recipes" / "configs" / f"{name}_resnet50_gga.yaml")
    cfg.validate()
    gga = resolve_hparams(cfg.algorithm, cfg.hparams)["gga"]
    assert (gga["start"], gga["end"], gga["candidates"], gga["tau"]) == (100, 200, 250, 0.1)
    assert gga["rho"] == (1e-6 if name == "vlcs" else 1e-5)
    assert (cfg.backbone, cfg.pretrained, cfg.freeze_bn, cfg.dropout, cfg.optimizer, cfg.batch_size) == (
        "resnet50.tv_in1k",
        True,
        True,
        0.5,
        "adam",
        32,
    )
    assert cfg.lr == {"pacs": 3e-5, "domainnet": 3e-5}.get(name, 1e-5)


def test_a_resumed_run_anneals_exactly_as_an_uninterrupted_one(tmp_path):
    from safetensors.torch import load_file

    from conftest import tiny_config
    from dgzoo.training.engine import train as train_run

    hp = {"gga.start": 1, "gga.end": 3, "gga.candidates": 4, "gga.rho": 2e-3}
    full = train_run(
        tiny_config(tmp_path / "full", steps=5, eval_every=5, checkpoint_every=2, algorithm="erm+gga", hparams=hp)
    )
    train_run(tiny_config(tmp_path / "cut", steps=2, eval_every=2, checkpoint_every=2, algorithm="erm+gga", hparams=hp))
    resumed = train_run(
        tiny_config(
            tmp_path / "cut", steps=5, eval_every=2, checkpoint_every=2, algorithm="erm+gga", hparams=hp, resume=True
        )
    )
    assert resumed["diagnostics"]["gga"]["steps"] == full["diagnostics"]["gga"]["steps"]
    a = load_file(tmp_path / "full" / "run" / "checkpoints" / "step_5" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "run" / "checkpoints" / "step_5" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_optional_second_window_anneals_exactly_its_steps(monkeypatch):
    # Windows 0..1 and 4..5, both inclusive (the official trainer's test): over steps 0..6 the search runs at
    # 0, 1, 4, 5 and nowhere else; without extra_search only the first window counts.
    window = {"gga.start": 0, "gga.end": 1, "gga.extra_start": 4, "gga.extra_end": 5, "gga.candidates": 2}
    calls = []
    model, algorithm = build("erm+gga", {**window, "gga.extra_search": True})
    gga = algorithm.addons[0]
    monkeypatch.setattr(
        gga,
        "anneal",
        lambda groups, step: (
            calls.append(step)
            or {
                "accepted": float(step % 2),
                "score_before": 0.0,
                "score_after": 0.1 * (step % 2),
                "loss_before": 1.0,
                "loss_after": 1.0,
                "shift": 0.0,
            }
        ),
    )
    for step in range(7):
        algorithm.update(minibatches(seed=step), step)
    assert calls == [0, 1, 4, 5] and [h["step"] for h in gga.history] == [0, 1, 4, 5]
    # 2 of 4 steps accepted one of their 2 candidates; each of those gained 0.1 of min cosine
    assert gga.diagnostics() == pytest.approx(
        {"annealed_steps": 4.0, "acceptance_rate": 2 / 8, "moved_fraction": 0.5, "mean_agreement_gain": 0.05}
    )
    single = build("erm+gga", window)[1].addons[0]
    assert [s for s in range(7) if single.annealed(s)] == [0, 1]
    with pytest.raises(DGZooError, match="gga.extra_end=3 is before gga.extra_start=4"):
        build("erm+gga", {**window, "gga.extra_search": True, "gga.extra_end": 3})
