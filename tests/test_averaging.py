"""SWAD's loss-valley window and EMA's average, against hand-computed values; a SWAD run exports plain timm."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.utils import ModelEmaV3

from conftest import plain_timm_logits, tiny_config
from dgzoo.algorithms import EvalContext, StepContext, create_algorithm
from dgzoo.algorithms.averaging import Segment
from dgzoo.models import create_backbone
from dgzoo.training.engine import train

# Source-validation loss at the end of segments 1..15 (two steps each). With SWAD's defaults (n_converge 3,
# n_tolerance 6, tolerance_ratio 0.3), by hand:
# - evaluation 6: segments 4, 5, 6 (0.8, 0.9, 0.85) have their minimum first: converged at segment 4 (step 8),
#   threshold 1.3 * 0.85 = 1.105. Of segments 1..4, the last above it is 2 (1.5); the window starts one after
#   the next, at segment 4 (the official loop's `Q[start_idx + 1:]`): steps 7-8.
# - evaluations 7, 8: the oldest tolerance segment (2, 3) ends before step 8: nothing. Evaluation 9: segment 4 is
#   the oldest and joins a second time (as the official queues do). Evaluations 10, 11, 12 admit segments 5, 6, 7
#   (the minimum of the six from each is <= 1.105).
# - at the run's end (evaluation 12) the waiting segments 8, 9 join (minima 0.9, 0.9), 10 does not (1.2 > 1.105):
#   window steps 7-18. Training on instead, evaluations 13, 14 admit 8, 9 and 15 finds all six above: dead valley.
LOSSES = [2.0, 1.5, 1.0, 0.8, 0.9, 0.85, 0.95, 1.0, 0.9, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7]


def scripted_swad(evaluations, last_at=None, hparams=None):
    """erm+swad whose weights are all equal to the step number after each step, evaluated every two steps."""
    algorithm = create_algorithm(
        "erm+swad", create_backbone("test_resnet", num_classes=10), 3, {"swad.bn_steps": 0, **(hparams or {})}
    )
    swad, network = algorithm.addons[0], algorithm.host.network
    seen = []

    def loss_of(i):
        def source_val_loss(model):
            seen.append(model)
            return LOSSES[i]

        return source_val_loss

    for i in range(evaluations):
        for step in (2 * i + 1, 2 * i + 2):
            with torch.no_grad():
                for p in network.parameters():
                    p.fill_(float(step))
            swad.after_update(StepContext(step - 1, []))
        algorithm.on_evaluate(EvalContext(2 * i + 2, i + 1 == last_at, loss_of(i), lambda n: iter([])))
    assert all(model is network for model in seen)  # the valley is found on the online model's loss
    return algorithm, swad


def averaged_value(algorithm):
    values = torch.cat([p.reshape(-1) for p in algorithm.evaluated_network().parameters()])
    assert torch.allclose(values, values[0].expand_as(values))
    return float(values[0])


def test_swad_window_follows_the_loss_valley_by_hand():
    algorithm, swad = scripted_swad(5)
    assert swad.converge_step is None and algorithm.evaluated_network() is algorithm.host.network
    algorithm, swad = scripted_swad(6)
    assert swad.converge_step == 8 and swad.threshold == pytest.approx(1.105)
    assert swad.window == (7, 8) and averaged_value(algorithm) == pytest.approx(7.5)
    algorithm, swad = scripted_swad(11)  # segments 4 (twice), 5, 6: (2 * 7.5 + 9.5 + 11.5) / 4
    assert swad.window == (7, 12) and averaged_value(algorithm) == pytest.approx(9.0)
    algorithm, swad = scripted_swad(12, last_at=12)
    assert swad.summary()["window_start"] == 7 and swad.summary()["window_end"] == 18
    assert swad.summary()["segments_averaged"] == 7  # the flush: 4 twice, 5..9 once
    assert averaged_value(algorithm) == pytest.approx((2 * 7.5 + 9.5 + 11.5 + 13.5 + 15.5 + 17.5) / 7)
    assert swad.window == (7, 14)  # the flush consumed nothing: a resumed run trains on from the same state
    algorithm, swad = scripted_swad(15)
    assert swad.dead and swad.window == (7, 18)
    assert averaged_value(algorithm) == pytest.approx((2 * 7.5 + 9.5 + 11.5 + 13.5 + 15.5 + 17.5) / 7)


def test_swad_window_of_other_tolerances_by_hand():
    # n_tolerance == n_converge: the converged segment 4 is only the placeholder; segments join from the oldest
    # of the three on: evaluation 7 admits 5 (min of 5, 6, 7 = 0.85), 8 admits 6, 9 admits 7 (min 0.9).
    algorithm, swad = scripted_swad(9, hparams={"swad.n_tolerance": 3})
    assert swad.converge_step == 8 and swad.window == (9, 14)
    # evaluation 10: segments 8, 9, 10 (1.0, 0.9, 1.2) have a minimum under 1.105: 8 joins; 11 (0.9, 1.2, 1.3):
    # 9 joins; 12 (1.2, 1.3, 1.4): dead.
    algorithm, swad = scripted_swad(12, hparams={"swad.n_tolerance": 3})
    assert swad.dead and swad.window == (9, 18) and averaged_value(algorithm) == pytest.approx(13.5)


REFERENCE = json.loads((Path(__file__).parent / "data" / "swad_lossvalley_reference.json").read_text())


def swad_weights_of(case):
    """Each segment's weight in the average dgzoo's SWAD exports at the end of a run with ``case``'s losses: segment
    i holds the one-hot parameter e_i, as the reference run of the official code."""
    algorithm = create_algorithm(
        "erm+swad",
        create_backbone("test_resnet", num_classes=10),
        3,
        {
            "swad.bn_steps": 0,
            "swad.n_converge": case["n_converge"],
            "swad.n_tolerance": case["n_tolerance"],
            "swad.tolerance_ratio": case["tolerance_ratio"],
        },
    )
    swad = algorithm.addons[0]
    n = len(case["losses"])
    for i, (loss, (start, end)) in enumerate(zip(case["losses"], case["segments"])):
        swad.observe(Segment([torch.eye(n, dtype=torch.float64)[i]], start, end, loss))
    swad.ended = True
    exported = swad.exported()
    assert exported is not None, "the official code always returns a model at the end"
    return swad, exported[0][0]


def test_swad_converging_at_its_third_evaluation_keeps_the_official_segments():
    # Converged at the first evaluation it could (segment 1 lowest of 1, 2, 3): the official code keeps segment 1,
    # counting it three times (the tolerance queue is not full), 2 and 3 twice; dgzoo dropped it.
    case = REFERENCE["cases"][0]
    swad, weights = swad_weights_of(case)
    assert swad.converge_step == 2 == case["converge_step"]
    assert weights.tolist() == pytest.approx(case["weights"])
    assert float(weights[0]) > 0 and swad.summary()["window_start"] == 1


@pytest.mark.parametrize("index", range(1, len(REFERENCE["cases"])))
def test_swad_weights_equal_the_official_loss_valley(index):
    case = REFERENCE["cases"][index]
    swad, weights = swad_weights_of(case)
    assert swad.converge_step == case["converge_step"] and swad.dead == case["dead"]
    assert weights.tolist() == pytest.approx(case["weights"], abs=1e-12)
    admitted = [s for s, w in zip(case["segments"], case["weights"]) if w > 0]
    if case["converge_step"] is not None:
        summary = swad.summary()
        assert (summary["window_start"], summary["window_end"]) == (admitted[0][0], admitted[-1][1])


def test_swad_recomputes_batchnorm_of_the_average_on_source_batches():
    algorithm = create_algorithm(
        "erm+swad",
        create_backbone("test_resnet", num_classes=10),
        3,
        {"swad.n_converge": 1, "swad.n_tolerance": 1, "swad.bn_steps": 3},
    )
    swad = algorithm.addons[0]
    swad.after_update(StepContext(0, []))
    x = [torch.randn(6, 3, 16, 16) for _ in range(3)]
    algorithm.on_evaluate(EvalContext(1, True, lambda m: 1.0, lambda n: iter(x[:n])))
    average = algorithm.evaluated_network()
    conv, bn = average.conv1[0], average.conv1[1]  # the stem's first BatchNorm sees a plain convolution
    with torch.no_grad():  # the plain mean of the three batches' statistics, not a momentum average
        outputs = [conv(b) for b in x]
        mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outputs]).mean(0)
        var = torch.stack([o.var(dim=(0, 2, 3)) for o in outputs]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5) and torch.allclose(bn.running_var, var, atol=1e-5)
    assert int(bn.num_batches_tracked) == 3 and not average.training


def test_ema_with_decay_zero_is_the_host():
    torch.manual_seed(0)
    plain = create_algorithm("erm", create_backbone("test_resnet", num_classes=10), 3)
    torch.manual_seed(0)
    ema = create_algorithm("erm+ema", create_backbone("test_resnet", num_classes=10), 3, {"ema.decay": 0.0})
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        batch = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
        plain.update(batch, step)
        ema.update(batch, step)
    averaged, host = ema.evaluated_network().state_dict(), plain.host.network.state_dict()
    assert averaged.keys() == host.keys() and all(torch.equal(averaged[k], host[k]) for k in host)


def test_ema_average_by_hand():
    algorithm = create_algorithm(
        "erm+ema", create_backbone("test_resnet", num_classes=10), 3, {"ema.decay": 0.5, "ema.warmup": False}
    )
    ema, network = algorithm.addons[0], algorithm.host.network
    with torch.no_grad():
        for p in ema.average.parameters():
            p.zero_()
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in network.parameters():
                p.fill_(float(step))
        ema.after_update(StepContext(step - 1, []))
    # 0 -> 0.5 * 0 + 0.5 * 1 = 0.5 -> 0.25 + 1 = 1.25 -> 0.625 + 1.5 = 2.125
    assert all(torch.allclose(p, torch.full_like(p, 2.125)) for p in ema.average.parameters())


def test_ema_warm_up_equals_timm_model_ema_v3():
    """The default warm-up is timm's ModelEmaV3(use_warmup=True) updated at steps 1, 2, ...: a 30-step run's
    average is its own weights', where the constant decay 0.999 keeps 97% of the initial ones."""
    torch.manual_seed(0)
    algorithm = create_algorithm("erm+ema", create_backbone("test_resnet", num_classes=10), 3)
    reference = ModelEmaV3(algorithm.host.network, decay=0.999, use_warmup=True)
    constant = create_algorithm(
        "erm+ema", create_backbone("test_resnet", num_classes=10), 3, {"ema.warmup": False}
    ).addons[0]
    ema, network = algorithm.addons[0], algorithm.host.network
    constant.average.load_state_dict(network.state_dict())  # a constant-decay average of the same network
    constant.pairs = list(zip(constant.average.state_dict().values(), network.state_dict().values()))
    initial = {k: v.clone() for k, v in network.state_dict().items()}
    for step in range(1, 31):
        with torch.no_grad():
            for p in network.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ema.after_update(StepContext(step - 1, []))
        reference.update(network, step=step)
        constant.after_update(StepContext(step - 1, []))
    ours, theirs, host = ema.average.state_dict(), reference.module.state_dict(), network.state_dict()
    assert all(torch.allclose(ours[k].float(), theirs[k].float(), atol=1e-6) for k in ours)
    weight = "fc.weight" if "fc.weight" in host else next(k for k in host if k.endswith("weight"))
    moved = (host[weight] - initial[weight]).norm()
    assert (ours[weight] - initial[weight]).norm() > 0.3 * moved  # not the initial weights
    assert (constant.average.state_dict()[weight] - initial[weight]).norm() < 0.1 * moved


@pytest.mark.slow
def test_a_swad_run_exports_its_average_as_plain_timm(tmp_path):
    cfg = tiny_config(
        tmp_path,
        algorithm="erm+swad",
        steps=8,
        eval_every=2,
        selection="last",
        hparams={"swad.n_converge": 1, "swad.n_tolerance": 1, "swad.bn_steps": 2},
    )
    results = train(cfg)
    run_dir = tmp_path / "run"
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    assert [r["swad/converged"] for r in records] == [1.0, 1.0, 1.0, 1.0] and "swad/val_loss" in records[0]
    assert results["diagnostics"]["swad"]["window_end"] == 8
    assert results["diagnostics"]["swad"]["acts"] == {"converged": 1.0, "averaged_steps": 6.0}  # steps 3..8
    exported = load_file(run_dir / "model.safetensors")
    online = {
        k.removeprefix("network."): v
        for k, v in load_file(run_dir / "checkpoints" / "step_8" / "model.safetensors").items()
        if k.startswith("network.")
    }
    assert set(exported) == set(online)  # plain timm keys
    assert not all(torch.equal(exported[k], online[k]) for k in exported)  # the average, not the online weights
    model = create_backbone("test_resnet", num_classes=10)
    model.load_state_dict(exported)
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(plain_timm_logits(run_dir, x, tmp_path), model.eval()(x), atol=1e-6)
