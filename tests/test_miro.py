"""MIRO: the regulariser by hand against the frozen reference, its optimizer groups, and the --pretrained check.

No Hub weights can be downloaded in the tests, so the frozen reference here is the randomly initialised network the
run starts from (the check only refuses recipes that say they train from scratch).
"""

import math

import pytest
import torch

from conftest import tiny_config
from dgzoo.algorithms import Recipe, check_algorithm, create_algorithm
from dgzoo.algorithms.miro import feature_stages
from dgzoo.errors import DGZooError
from dgzoo.models import create_backbone, freeze_batchnorm
from dgzoo.training.engine import plan_run


def batches(step):
    g = torch.Generator().manual_seed(step)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]


def build(spec="miro", hparams=None, seed=0):
    torch.manual_seed(seed)
    network = create_backbone("test_resnet", num_classes=10)
    freeze_batchnorm(network)  # as the official URResNet: the trained and the frozen copy normalise alike
    return create_algorithm(
        spec, network, 2, hparams or {}, make_optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1)
    )


def test_at_the_start_the_regulariser_is_the_log_variance_of_each_stage():
    algorithm = build()
    _, metrics = algorithm.host.loss(batches(0), 0)
    # f == r at the reference, so every stage (stem, layer1..4) contributes mean(log v) / 2 with v = 0.1
    assert float(metrics["reg"]) == pytest.approx(5 * math.log(0.1) / 2, abs=1e-5)
    stages = [name for name, _ in feature_stages(algorithm.host.network)]
    assert stages == ["maxpool", "layer1", "layer2", "layer3", "layer4"]


def test_the_regulariser_by_hand_after_the_network_moves():
    algorithm = build(hparams={"ld": 0.5})
    host = algorithm.host
    with torch.no_grad():
        host.network.layer4[0].conv1.weight.mul_(1.5)  # only the last stage's features move
        host.variances[4].fill_(0.0)  # v = softplus(0) + 1e-5 = log 2 + 1e-5
    x = torch.cat([x for x, _ in batches(0)])
    loss, metrics = host.loss(batches(0), 0)

    def last_stage(m):
        return m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.act1(m.bn1(m.conv1(x))))))))

    with torch.no_grad():
        f, r = last_stage(host.network), last_stage(host.reference)
    v = math.log(2) + 1e-5
    expected = 4 * math.log(0.1) / 2 + float(((f - r) ** 2 / v + math.log(v)).mean()) / 2
    assert float(metrics["reg"]) == pytest.approx(expected, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(metrics["ce"]) + 0.5 * expected, rel=1e-5)


def test_zero_weight_is_erm_and_the_reference_stays_frozen():
    miro, erm = build(hparams={"ld": 0.0}), build("erm")
    reference = {k: v.clone() for k, v in miro.host.reference.state_dict().items()}
    for step in range(2):
        miro.update(batches(step), step)
        erm.update(batches(step), step)
    trained, plain = miro.host.network.state_dict(), erm.host.network.state_dict()
    assert all(torch.equal(trained[k], plain[k]) for k in plain)
    assert all(torch.equal(v, reference[k]) for k, v in miro.host.reference.state_dict().items())
    assert set(miro.evaluated_network().state_dict()) == set(plain)  # the export is the plain timm network


def test_the_variance_encoders_train_at_lr_mult_times_the_recipe_lr():
    algorithm = build(hparams={"lr_mult": 10.0})
    groups = algorithm.host.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([0.1, 1.0])
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in algorithm.host.variances.parameters()}


def test_miro_refuses_a_recipe_without_pretrained_weights(tmp_path):
    with pytest.raises(DGZooError, match="add --pretrained") as error:
        plan_run(tiny_config(tmp_path, algorithm="miro", pretrained=False))
    assert "\n" not in str(error.value) and not (tmp_path / "run").exists()
    # pretrained=True passes the check (no weights are loaded when planning), and so does an unknown recipe
    assert check_algorithm("miro", {}, Recipe(num_domains=2, num_classes=10, pretrained=True))
    assert check_algorithm("miro", {}, Recipe(num_domains=2, num_classes=10))


@pytest.mark.parametrize(
    "backbone, expected",
    [
        ("test_resnet", ["maxpool", "layer1", "layer2", "layer3", "layer4"]),  # the official resnet stem + layer1..4
        ("test_vit", ["patch_embed", "blocks.1", "blocks.2", "blocks.4", "blocks.5"]),  # 6 blocks in four groups
        ("test_convnext", ["stem", "stages.0", "stages.1", "stages.2", "stages.3"]),
    ],
)
def test_miro_taps_five_places_as_the_official_stem_block(backbone, expected):
    """The official URFeaturizer taps the stem's output and the end of each of four blocks, whatever the family
    (a CLIP ViT-B: conv1 and resblocks 2, 5, 8, 11); dgzoo tapped a ViT's every block and no stem."""
    torch.manual_seed(0)
    network = create_backbone(backbone, num_classes=10)
    stages = feature_stages(network)
    assert [name for name, _ in stages] == expected
    host = create_algorithm("miro", network, 2).host.eval()  # BatchNorm as the frozen copy's: f == r
    size = network.pretrained_cfg["input_size"][1:]
    x = torch.randn(2, 3, *size)
    _, metrics = host.loss([(x, torch.tensor([0, 1])), (x, torch.tensor([1, 0]))], 0)
    assert float(metrics["reg"]) == pytest.approx(5 * math.log(0.1) / 2, abs=1e-5)  # f == r: five log-variances
    assert [len(v) for v in host.variances] == [c for _, c in stages]


def test_miro_taps_of_a_vit_b_are_the_official_clip_vit_b_blocks():
    from timm import create_model

    network = create_model("vit_base_patch16_224", pretrained=False, num_classes=3, depth=12)
    assert [name for name, _ in feature_stages(network)] == [
        "patch_embed",
        "blocks.2",
        "blocks.5",
        "blocks.8",
        "blocks.11",
    ]
