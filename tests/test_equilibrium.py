"""Domain Gradient Equilibrium: the identities of the research note (section 1.5), hand-computed projections and
reweighting, the per-domain update schedules, a single-source run, recipes, and two gloo processes."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_processes, tiny_config
from dgzoo.algorithms import create_algorithm, resolve_hparams
from dgzoo.algorithms.equilibrium import adjust_residuals, equilibrium_updates, reweight
from dgzoo.algorithms.gradients import FlatParams, gram, per_domain_gradients
from dgzoo.config import TrainConfig
from dgzoo.errors import DGZooError
from dgzoo.models import create_backbone, data_config, freeze_batchnorm

# Residuals that sum to zero, with cos(s1, s2) = 0.6 > 0.5 (so s1 and s2 are projected apart) and s3 an outlier.
RESIDUALS = torch.tensor([[2.0, 1.0], [2.0, -1.0], [-4.0, 0.0]], dtype=torch.float64)
GRADS = RESIDUALS + torch.tensor([1.0, 1.0], dtype=torch.float64)  # g_inv = (1, 1)


def make_batches(k=3, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 5, (b,), generator=g)) for _ in range(k)]


def test_projection_by_hand():
    coefficients, fired = adjust_residuals(gram(RESIDUALS), alpha=0.5)
    # s~1 = s1 - (3/5) s2 = (0.8, 1.6); s~2 = s2 - (3/5) s1 = (0.8, -1.6); s3 has negative cosines and stays.
    assert torch.allclose(
        coefficients @ RESIDUALS, torch.tensor([[0.8, 1.6], [0.8, -1.6], [-4.0, 0.0]], dtype=torch.float64)
    )
    assert fired.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    _, strict = adjust_residuals(gram(RESIDUALS), alpha=0.6)  # cos = 0.6 exactly: strict '>' does not fire
    assert not strict.any()


def test_project_test_decides_whose_cosine_is_compared():
    s = torch.tensor([[0.0, 1.0], [-1.0, -1.0], [-1.0, 2.0], [2.0, -2.0]], dtype=torch.float64)
    # s3 vs s1: cos 0.89, so s~3 = s3 - 2 s1 = (-1, 0). Then vs s2: cos(s3, s2) = -0.32 but cos(s~3, s2) = 0.71.
    original, _ = adjust_residuals(gram(s), 0.5, "original")
    adjusted, fired = adjust_residuals(gram(s), 0.5, "adjusted")
    assert torch.allclose((original @ s)[2], torch.tensor([-1.0, 0.0], dtype=torch.float64))
    assert torch.allclose((adjusted @ s)[2], torch.tensor([-0.5, 0.5], dtype=torch.float64))
    assert fired[2].tolist() == [True, True, False, False]


def test_reweighting_reaches_the_exact_box_minimizer():
    adjusted = torch.tensor([[0.8, 1.6], [0.8, -1.6], [-4.0, 0.0]], dtype=torch.float64)
    # w1 s~1 + w2 s~2 + w3 s~3 = 0 needs w1 = w2 and w3 = 0.4 w1; from w = 1 the descent keeps w1 = w2 = 1.
    w, _ = reweight(gram(adjusted), tol=1e-12)
    assert torch.allclose(w, torch.tensor([1.0, 1.0, 0.4], dtype=torch.float64), atol=1e-6)
    # A null direction of mixed signs leaves w = 0 as the only minimizer in the box.
    mixed = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # null vector (1, -1, 0)
    w, _ = reweight(gram(mixed), steps=10_000, tol=0.0)
    assert torch.allclose(w, torch.zeros(3, dtype=torch.float64), atol=1e-6)
    # A few iterations leave it unconverged: the iteration count matters (research note, section 1.5).
    w_short, updates = reweight(gram(adjusted), steps=1)
    assert updates == 1 and abs(float(w_short[2]) - 0.4) > 0.01


@pytest.mark.parametrize("seed", range(5))
def test_reweighting_converges_to_a_box_constrained_minimizer(seed):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(3, 40, generator=g, dtype=torch.float64)
    grads[1] = grads[0] + 0.3 * grads[1]  # two similar domains, one outlier: the projection fires
    residuals = grads - grads.mean(0)
    coefficients, fired = adjust_residuals(gram(residuals), alpha=0.5)
    assert fired.any()
    adjusted = gram(coefficients @ residuals)
    w, _ = reweight(adjusted, steps=5000, tol=1e-9)
    assert ((w >= 0) & (w <= 1)).all()
    assert w @ adjusted @ w <= 1e-12 * adjusted.sum()  # the minimum of a PSD quadratic on a box holding 0 is 0
    gradient = 2 * adjusted @ w  # KKT: zero gradient on free coordinates, outward-pointing at active bounds
    assert (gradient[(w > 1e-6) & (w < 1 - 1e-6)].abs() < 1e-6).all()
    assert w.max() > 0.5  # a non-trivial equilibrium, not the trivial w = 0


def test_no_projection_and_unit_weights_give_every_domain_the_mean_gradient():
    grads = torch.randn(3, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    updates, decided = equilibrium_updates(grads)
    assert not decided.fired.any() and decided.max_cosine <= 0.5
    assert torch.equal(decided.weights, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(updates, grads.mean(0).expand(3, -1), atol=1e-12)
    assert decided.residual_norm < 1e-12 and decided.shift < 1e-12
    # Both components off (the paper's gradient-averaging ablation) gives the same, even when projections would fire.
    updates, _ = equilibrium_updates(GRADS, adjust=False, reweight_weights=False)
    assert torch.allclose(updates, GRADS.mean(0).expand(3, -1))


def test_updates_by_hand_and_the_collapse_to_the_summed_gradient():
    updates, decided = equilibrium_updates(GRADS, pgd_tol=1e-12)
    assert torch.allclose(decided.weights, torch.tensor([1.0, 1.0, 0.4], dtype=torch.float64), atol=1e-6)
    # d_k = g_k - w_k s~_k: (3,2)-(0.8,1.6), (3,0)-(0.8,-1.6), (-3,1)-0.4(-4,0)
    expected = torch.tensor([[2.2, 0.4], [2.2, 1.6], [-1.4, 1.0]], dtype=torch.float64)
    assert torch.allclose(updates, expected, atol=1e-5)
    assert torch.allclose(updates.sum(0), GRADS.sum(0), atol=1e-5)  # converged: sum_k d_k = sum_k g_k (ERM)
    assert decided.shift < 1e-5
    original, decided_o = equilibrium_updates(GRADS, residual="original", pgd_tol=1e-12)
    # d_k = g_k - w_k s_k: (1,1), (1,1), (-1.4,1): summed, 0.8 away from the mean gradient's (1, 1) per domain
    assert torch.allclose(original, torch.tensor([[1.0, 1.0], [1.0, 1.0], [-1.4, 1.0]], dtype=torch.float64), atol=1e-5)
    assert decided_o.shift == pytest.approx(0.8, abs=1e-5)


def equilibrium_and_reference(hparams, momentum=0.0):
    """An equilibrium algorithm on a small eval-mode model, and a copy of that model for hand replays."""
    torch.manual_seed(0)
    model = create_backbone("test_resnet", num_classes=5).eval()  # fixed BatchNorm: replays see the same model
    reference = copy.deepcopy(model)
    algorithm = create_algorithm(
        "equilibrium",
        model,
        3,
        make_optimizer=lambda g: torch.optim.SGD(g, lr=0.05, momentum=momentum),
        hparams=hparams,
    )
    return algorithm, model, reference


def test_the_host_is_a_plain_torch_module_to_module_apply():
    # Module.apply(fn) walks every submodule; a host whose own method shadowed it broke any container holding it.
    algorithm, model, _ = equilibrium_and_reference({})
    visited = []
    torch.nn.Sequential(algorithm.host).apply(lambda module: visited.append(module))
    assert visited[-2] is algorithm.host  # children first, then the host, then the container
    assert any(module is model for module in visited)


@pytest.mark.parametrize("updates", ["sequential", "recompute"])
def test_one_optimizer_step_per_domain(updates):
    hparams = {"alpha": -1.0, "updates": updates}  # alpha -1: every pair is projected, w moves off 1
    algorithm, model, reference = equilibrium_and_reference(hparams, momentum=0.9)
    batches = make_batches()
    metrics = algorithm.update(batches, step=0)
    assert metrics["projection_rate"] == 1.0 and min(metrics[f"w_{k}"] for k in range(3)) < 1.0
    params = FlatParams.of(reference)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    options = dict(alpha=-1.0)
    d, _ = equilibrium_updates(per_domain_gradients(reference, batches, params)[0], **options)
    for k in range(3):
        if updates == "recompute":  # the gradients are taken again at the weights the previous steps reached
            d, _ = equilibrium_updates(per_domain_gradients(reference, batches, params)[0], **options)
        params.assign_grad(d[k])
        optimizer.step()
    assert torch.allclose(FlatParams.of(model).values(), params.values(), atol=1e-6)


def test_mean_update_collapses_to_the_mean_gradient():
    algorithm, model, reference = equilibrium_and_reference(
        {"alpha": -1.0, "updates": "mean", "pgd_tol": 1e-9, "pgd_steps": 20_000}
    )
    batches = make_batches()
    grads, _ = per_domain_gradients(reference, batches, FlatParams.of(reference))
    before = FlatParams.of(model).values()
    metrics = algorithm.update(batches, step=0)
    assert metrics["projected"] == 1.0 and metrics["update_vs_mean"] < 1e-4
    assert torch.allclose(before - FlatParams.of(model).values(), 0.05 * grads.mean(0), atol=1e-6)


def test_diagnostics_summary_and_resume_state():
    algorithm, _, _ = equilibrium_and_reference({})
    metrics = [algorithm.update(make_batches(seed=s), step=s) for s in range(2)]
    assert {
        "loss",
        "projection_rate",
        "projected",
        "max_cosine",
        "residual_norm",
        "specific_norm",
        "update_vs_mean",
        "pgd_iters",
        "w_0",
        "w_1",
        "w_2",
    } <= set(metrics[0])
    summary = algorithm.summary()["equilibrium"]
    assert summary["steps"] == 2
    assert summary["projection_rate"] == pytest.approx(sum(m["projection_rate"] for m in metrics) / 2)
    resumed, _, _ = equilibrium_and_reference({})
    resumed.load_state_dict(algorithm.state_dict())
    assert resumed.summary() == algorithm.summary()


def test_single_source_run_uses_randaugment_views_and_reports_diagnostics(tmp_path):
    from dgzoo.training.engine import train

    results = train(
        tiny_config(tmp_path, algorithm="equilibrium", source_domains=["0"], steps=3, eval_every=3, batch_size=4)
    )
    assert results["protocol"] == "single-source" and results["hparams"]["views"] == 3
    diagnostics = results["diagnostics"]["equilibrium"]
    assert diagnostics["steps"] == 3 and 0.0 <= diagnostics["projection_rate"] <= 1.0
    records = [json.loads(r) for r in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    assert all({"projection_rate", "w_0", "residual_norm", "update_vs_mean"} <= set(r) for r in records)
    assert diagnostics["specific_norm"] > 0  # the views differ, so their gradients do
    # "does it act": the run-level diagnostics, in results.json and in the model card
    acts = diagnostics["acts"]
    assert acts["projection_rate"] == diagnostics["projection_rate"] and acts["optimizer_steps_per_iteration"] == 3
    assert acts["w_deviation"] == diagnostics["w_deviation"] and acts["update_vs_mean"] == diagnostics["update_vs_mean"]
    card = (tmp_path / "run" / "README.md").read_text()
    assert "Does the method act?" in card and "| equilibrium | projection_rate |" in card


def test_randaugment_recipe_augmentation_for_the_erm_baseline():
    from PIL import Image

    from dgzoo.data.transforms import train_transform

    model = create_backbone("test_resnet", num_classes=5)
    transform = train_transform(data_config(model, 32), "randaugment")
    image = Image.fromarray((torch.rand(32, 32) * 255).byte().numpy(), mode="L")
    views = []
    for seed in range(4):
        torch.manual_seed(seed)
        views.append(transform(image))
    assert views[0].shape == (3, 32, 32) and len({v.sum().item() for v in views}) > 1


@pytest.mark.parametrize("name", ["pacs", "vlcs", "office_home", "rotated_digits"])
def test_recipes_follow_the_paper_settings(name):
    cfg = TrainConfig.from_yaml(
        ROOT
        / "recipes"
        / "configs"
        / (f"{name}_resnet18_equilibrium.yaml" if name != "rotated_digits" else "rotated_digits_equilibrium.yaml")
    )
    cfg.validate()
    hparams = resolve_hparams(cfg.algorithm, cfg.hparams)["equilibrium"]
    assert (hparams["views"], hparams["random_ops"], hparams["alpha"]) == (3, 2, 0.5)
    assert len(cfg.source_domains) == 1 and cfg.optimizer == "sgd" and cfg.momentum == 0.9
    if name != "rotated_digits":
        assert (cfg.backbone, cfg.pretrained, cfg.lr, cfg.batch_size) == ("resnet18.tv_in1k", True, 5e-4, 10)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_global_batch(tmp_path):
    run_processes(2, [__file__, tmp_path], cwd=ROOT)
    report = json.loads((tmp_path / "report.json").read_text())
    for key, value in report.items():
        assert value > 1e-3 if key.endswith("_moved") else value < 1e-5, (key, value)


def _distributed_worker(out_dir: Path) -> None:
    """Each of 2 processes holds half of every domain's batch; compare with one process on the whole batch."""
    from accelerate import Accelerator

    from dgzoo.algorithms.runtime import Runtime
    from dgzoo.training.runtime import AccelerateRuntime

    runtime = AccelerateRuntime(Accelerator(cpu=True))
    rank, world = runtime.process_index, runtime.num_processes
    torch.manual_seed(0)
    model = create_backbone("test_resnet", num_classes=5).train()
    freeze_batchnorm(model)  # per-process batch statistics would differ from the global batch's
    batches = make_batches(b=8)
    share = 8 // world
    local = [(x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]) for x, y in batches]
    report = {}
    expected, expected_losses = per_domain_gradients(model, batches, FlatParams.of(model), Runtime())
    for method in ("loop", "vmap"):
        grads, losses = per_domain_gradients(model, local, FlatParams.of(model), runtime, method=method)
        report[f"engine_{method}"] = float((grads - expected).abs().max() / expected.abs().max())
        report[f"losses_{method}"] = float((losses - expected_losses).abs().max())
    for name, hparams in (("equilibrium", {"alpha": -1.0}), ("agr_rand", {}), ("pcgrad", {})):
        nets = [copy.deepcopy(model), copy.deepcopy(model)]
        algorithms = []
        for net, rt in zip(nets, (runtime, Runtime())):
            torch.manual_seed(1)  # the same random stream for the 2-process and the 1-process algorithm
            algorithms.append(
                create_algorithm(
                    name,
                    net,
                    3,
                    hparams,
                    runtime=rt,
                    make_optimizer=lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9),
                )
            )
        for step in range(2):
            algorithms[0].update(local, step)
            algorithms[1].update(batches, step)
        ours, single = FlatParams.of(nets[0]).values(), FlatParams.of(nets[1]).values()
        report[f"{name}_vs_one_process"] = float((ours - single).abs().max())
        report[f"{name}_across_processes"] = float((ours - runtime.all_reduce_mean(ours.clone())).abs().max())
        report[f"{name}_moved"] = float((ours - FlatParams.of(model).values()).abs().max())
    if rank == 0:
        (out_dir / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    _distributed_worker(Path(sys.argv[1]))


def test_views_with_randaugment_recipe_fail_before_anything_is_written(tmp_path):
    from dgzoo.training.engine import train

    with pytest.raises(DGZooError, match="views are not augmented twice"):
        train(tiny_config(tmp_path, algorithm="equilibrium", source_domains=["0"], augment="randaugment"))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the three readings, step matching

TWO = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)  # g_inv = (2, 1), s_1 = -s_2 = (-1, 1)


def test_persistent_weights_start_from_the_previous_iteration():
    # K = 2: G = ||s||^2 [[1, -1], [-1, 1]], F(w) = ||s||^2 (w1 - w2)^2, lambda_max = 2 ||s||^2. From the reset
    # w = (1, 1), F = 0 already: d_k = g_inv. From a previous w = (1, 0.4), one PGD step of 1 / (2 lambda_max)
    # gives w - 2 G w / (4 ||s||^2) = (1, 0.4) - (0.3, -0.3) = (0.7, 0.7), F = 0: d_k = g_k - 0.7 s_k.
    reset, decided = equilibrium_updates(TWO, pgd_tol=0.0)
    assert torch.allclose(reset, torch.tensor([[2.0, 1.0], [2.0, 1.0]], dtype=torch.float64))
    kept, decided = equilibrium_updates(TWO, pgd_init=torch.tensor([1.0, 0.4], dtype=torch.float64), pgd_tol=0.0)
    assert torch.allclose(decided.weights, torch.tensor([0.7, 0.7], dtype=torch.float64))
    assert torch.allclose(kept, torch.tensor([[1.7, 1.3], [2.3, 0.7]], dtype=torch.float64))  # g_inv + 0.3 s_k


def two_domain_algorithm(hparams, lr=0.05, momentum=0.0):
    torch.manual_seed(0)
    model = create_backbone("test_resnet", num_classes=5).eval()
    reference = copy.deepcopy(model)
    algorithm = create_algorithm(
        "equilibrium", model, 2, make_optimizer=lambda g: torch.optim.SGD(g, lr=lr, momentum=momentum), hparams=hparams
    )
    return algorithm, model, reference


def test_the_algorithm_carries_w_across_iterations_only_when_persistent():
    # Two sequential SGD steps with momentum 0.9 move theta by lr (1.9 d_1 + d_2). Reset: w = 1, d_k = g_inv, so
    # 2.9 lr g_inv. Persistent from w = (1, 0.4): w = (0.7, 0.7) as above, d_k = g_inv + 0.3 s_k, s_2 = -s_1, so
    # 2.9 lr g_inv + 0.27 lr s_1.
    batches = make_batches(k=2)
    for weights, expected in (("reset", 1.0), ("persistent", 0.7)):
        algorithm, model, reference = two_domain_algorithm({"weights": weights, "pgd_tol": 0.0}, momentum=0.9)
        grads, _ = per_domain_gradients(reference, batches, FlatParams.of(reference))
        g_inv, s_1 = grads.mean(0), grads[0] - grads.mean(0)
        algorithm.host.weights = torch.tensor([1.0, 0.4], dtype=torch.float64)  # as a previous iteration left it
        before = FlatParams.of(model).values()
        metrics = algorithm.update(batches, step=1)
        assert metrics["w_0"] == pytest.approx(expected) and metrics["w_1"] == pytest.approx(expected)
        assert metrics["w_deviation"] == pytest.approx(1 - expected)
        moved = before - FlatParams.of(model).values()
        assert torch.allclose(
            moved, 0.05 * (2.9 * g_inv + 1.9 * (1 - expected) * s_1 - (1 - expected) * s_1), atol=1e-6
        )
        assert algorithm.state_dict()["host"]["weights"] == pytest.approx([expected, expected])
    assert s_1.norm() > 0.1 * g_inv.norm()  # the persistent term is not negligible


def test_summed_domain_loss_scales_the_update_by_the_batch_size():
    batches = make_batches(k=2, b=8)
    updates = {}
    for loss in ("mean", "sum"):
        algorithm, model, reference = two_domain_algorithm({"domain_loss": loss, "updates": "mean"}, lr=0.01)
        before = FlatParams.of(model).values()
        algorithm.update(batches, step=0)
        updates[loss] = before - FlatParams.of(model).values()
    grads, _ = per_domain_gradients(reference, batches, FlatParams.of(reference))
    assert torch.allclose(updates["mean"], 0.01 * grads.mean(0), atol=1e-6)
    assert torch.allclose(updates["sum"], 8 * updates["mean"], rtol=1e-4, atol=1e-6)  # Eq. 1: M = 8 samples


@pytest.mark.parametrize("domain_loss", ["mean", "sum"])
def test_step_matched_takes_one_step_of_the_erm_gradient_norm(domain_loss):
    # alpha -1: every pair is projected and w moves, so the direction differs from ERM's; matched, the single SGD
    # step has ERM's length lr ||mean_k g_k|| (g_k of the mean losses) along mean_k d_k, and K steps become one.
    hparams = {"alpha": -1.0, "step": "matched", "domain_loss": domain_loss, "pgd_steps": 3}
    algorithm, model, reference = equilibrium_and_reference(hparams)
    batches = make_batches()
    grads, _ = per_domain_gradients(reference, batches, FlatParams.of(reference))
    before = FlatParams.of(model).values()
    metrics = algorithm.update(batches, step=0)
    step = before - FlatParams.of(model).values()
    assert step.norm().item() == pytest.approx(0.05 * grads.mean(0).norm().item(), rel=1e-4)
    scaled = grads * (8 if domain_loss == "sum" else 1)
    d, _ = equilibrium_updates(scaled, alpha=-1.0, pgd_steps=3)
    direction = d.mean(0)
    assert metrics["projection_rate"] == 1.0
    assert torch.allclose(step / step.norm(), direction / direction.norm(), atol=1e-4)
    assert algorithm.host.diagnostics()["optimizer_steps_per_iteration"] == 1.0
