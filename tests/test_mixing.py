"""MixStyle and EFDMix: the operations on known tensors, the hooks' identities, the checks, a plain timm export."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import plain_timm_logits, tiny_config
from dgzoo.algorithms import Recipe, check_algorithm, create_algorithm
from dgzoo.errors import DGZooError
from dgzoo.models import create_backbone, meta_backbone
from dgzoo.models.mixing import efdmix, mixstyle, partners
from dgzoo.training.engine import plan_run, train


def test_mixstyle_takes_the_partners_statistics():
    x = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]], [[[10.0, 10.0], [20.0, 20.0]]]])  # means 4 and 15
    swap = torch.tensor([1, 0])
    out = mixstyle(x, torch.tensor([0.0, 0.0]), swap, eps=0.0)
    # sample 0 normalised ([-3, -1, 1, 3] / std) re-styled with sample 1's mean 15 and std (unbiased) 5.7735
    std0, std1 = x[0].flatten().std(), x[1].flatten().std()
    assert torch.allclose(out[0], (x[0] - 4.0) / std0 * std1 + 15.0)
    assert torch.allclose(out[1], (x[1] - 15.0) / std1 * std0 + 4.0)
    half = mixstyle(x, torch.tensor([0.5, 0.5]), swap, eps=0.0)
    assert torch.allclose(half[0].mean(), torch.tensor(9.5)) and torch.allclose(
        half[0].flatten().std(), (std0 + std1) / 2
    )
    assert torch.allclose(mixstyle(x, torch.ones(2), swap, eps=0.0), x)


def test_efdmix_matches_sorted_values_rank_by_rank():
    x = torch.tensor([[[[3.0, 1.0], [4.0, 2.0]]], [[[10.0, 40.0], [30.0, 20.0]]]], requires_grad=True)
    swap = torch.tensor([1, 0])
    out = efdmix(x, torch.tensor([0.0, 0.0]), swap)
    # sample 0's ranks are (2, 0, 3, 1): it takes sample 1's sorted values (10, 20, 30, 40) at those ranks
    assert torch.equal(out[0].flatten(), torch.tensor([30.0, 10.0, 40.0, 20.0]))
    assert torch.equal(out[1].flatten(), torch.tensor([1.0, 4.0, 3.0, 2.0]))
    half = efdmix(x, torch.tensor([0.5, 0.5]), swap)
    assert torch.equal(half[0].flatten(), torch.tensor([16.5, 5.5, 22.0, 11.0]))
    half.sum().backward()
    # d/dx: 1 through the own values (the official detach) + (1 - lam) through the partner's sorted values
    assert torch.equal(x.grad, torch.full_like(x, 1.5))


def test_crossdomain_partners_come_from_another_domain():
    torch.manual_seed(0)
    for _ in range(5):
        partner = partners(12, "crossdomain", [4, 4, 4])
        assert sorted(partner.tolist()) == list(range(12))
        assert all(int(p) // 4 != i // 4 for i, p in enumerate(partner))
    assert sorted(partners(7, "crossdomain", [4, 4]).tolist()) == list(range(7))  # not the pooled batch: random


def build(spec, hparams):
    torch.manual_seed(0)
    return create_algorithm(spec, create_backbone("test_resnet", num_classes=10), 2, hparams)


@pytest.mark.parametrize("addon", ["mixstyle", "efdmix"])
def test_probability_zero_and_evaluation_are_the_backbone(addon):
    plain = create_backbone("test_resnet", num_classes=10)
    algorithm = build(f"erm+{addon}", {f"{addon}.p": 0.0})
    plain.load_state_dict(algorithm.host.network.state_dict())
    x = torch.randn(6, 3, 32, 32)
    network = algorithm.host.network
    assert torch.equal(network.train()(x), plain.train()(x))
    always = build(f"erm+{addon}", {f"{addon}.p": 1.0}).host.network
    assert not torch.allclose(always.train()(x), plain.train()(x))
    plain.load_state_dict(always.state_dict())  # the same running statistics
    assert torch.equal(always.eval()(x), plain.eval()(x))  # evaluation never mixes
    assert set(always.state_dict()) == set(plain.state_dict())  # no added keys


def test_mixing_checks_fail_before_anything_is_written(tmp_path):
    cfg = tiny_config(tmp_path, backbone="test_vit", algorithm="coral+efdmix")
    with pytest.raises(DGZooError, match="ResNet-family and DenseNet") as error:
        plan_run(cfg)
    assert "\n" not in str(error.value) and not (tmp_path / "run").exists()
    recipe = Recipe(num_domains=2, num_classes=10, network=meta_backbone("test_resnet", 10))
    with pytest.raises(DGZooError, match="stages 1-4, not 5"):
        check_algorithm("erm+mixstyle", {"mixstyle.layers": "1,5"}, recipe)
    with pytest.raises(DGZooError, match="distinct stage numbers"):
        check_algorithm("erm+mixstyle", {"mixstyle.layers": "1,x"}, recipe)
    densenet = meta_backbone("densenet121", 10)
    assert check_algorithm("erm+mixstyle", {}, Recipe(num_domains=2, num_classes=10, network=densenet))


def test_a_mixstyle_run_exports_the_plain_backbone(tmp_path):
    cfg = tiny_config(
        tmp_path,
        algorithm="erm+mixstyle",
        steps=4,
        eval_every=4,
        hparams={"mixstyle.p": 1.0, "mixstyle.mix": "crossdomain"},
    )
    results = train(cfg)
    run_dir = tmp_path / "run"
    assert results["diagnostics"]["mixstyle"]["mixed_fraction"] == 1.0
    exported = load_file(run_dir / "model.safetensors")
    final = {
        k.removeprefix("network."): v
        for k, v in load_file(run_dir / "checkpoints" / "step_4" / "model.safetensors").items()
    }
    assert set(exported) == set(final) and all(torch.equal(exported[k], final[k]) for k in exported)
    model = create_backbone("test_resnet", num_classes=10)
    model.load_state_dict(exported)
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(plain_timm_logits(run_dir, x, tmp_path), model.eval()(x), atol=1e-6)
