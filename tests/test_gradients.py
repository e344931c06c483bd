"""The per-domain gradient engine: equal to K separate backward passes (loop and vmap, any BatchNorm mode), bf16,
the fp16 guard, accurate Gram matrices, and augmented views as pseudo-domains."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dgzoo.algorithms import Recipe, create_algorithm, resolve_hparams
from dgzoo.algorithms.gradients import (
    DomainGradientAlgorithm,
    FlatParams,
    RandAugmentViews,
    gram,
    pairwise_cosine,
    per_domain_gradients,
    split_views,
)
from dgzoo.algorithms.runtime import Runtime
from dgzoo.data.transforms import eval_transform
from dgzoo.errors import DGZooError
from dgzoo.models import create_backbone, data_config, freeze_batchnorm


class AutocastRuntime(Runtime):
    """A single-process runtime whose forward passes run under CPU autocast with ``dtype``."""

    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def autocast(self):
        return torch.autocast("cpu", dtype=self.dtype)


def make_batches(k=3, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 5, (b,), generator=g)) for _ in range(k)]


def separate_backward_passes(model, batches, autocast=contextlib.nullcontext):
    """K ordinary backward passes, one per domain, in order (the reference the engine must equal)."""
    params = FlatParams.of(model)
    rows, losses = [], []
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        rows.append(params.flatten([p.grad for p in params.tensors]))
        losses.append(loss.detach().float())
    return torch.stack(rows), torch.stack(losses)


@pytest.mark.parametrize("method", ["loop", "vmap"])
@pytest.mark.parametrize("norm", ["training", "frozen", "cumulative"])
def test_engine_equals_separate_backward_passes(method, norm):
    torch.manual_seed(0)
    model = create_backbone("test_resnet", num_classes=5).train()
    if norm == "frozen":
        freeze_batchnorm(model)
        for m in model.modules():  # non-trivial running statistics, which frozen layers must use and keep
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    if norm == "cumulative":  # BatchNorm's momentum=None: running statistics are cumulative averages
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
    reference = copy.deepcopy(model)
    batches = make_batches()
    params = FlatParams.of(model)
    grads, losses = per_domain_gradients(model, batches, params, method=method)
    expected, expected_losses = separate_backward_passes(reference, batches)
    assert torch.allclose(grads, expected, atol=1e-5, rtol=1e-4)
    assert torch.allclose(losses, expected_losses, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(ours.float(), theirs.float(), atol=1e-6), name  # BatchNorm statistics, K updates


def test_out_buffer_is_written_in_place():
    model = create_backbone("test_resnet", num_classes=5)
    params = FlatParams.of(model)
    buffer = params.empty(3)
    grads, _ = per_domain_gradients(model, make_batches(), params, out=buffer)
    assert grads is buffer and all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="shape"):
        per_domain_gradients(model, make_batches(k=2), params, out=buffer)


def test_bf16_autocast_gives_float32_gradients_equal_to_backward_passes(monkeypatch):
    torch.manual_seed(0)
    model = create_backbone("test_resnet", num_classes=5).eval()
    runtime = AutocastRuntime(torch.bfloat16)
    batches = make_batches()
    params = FlatParams.of(model)
    # oneDNN's bf16 convolution backward intermittently returns NaN on CPUs without native bf16 (seen on an AMD
    # EPYC, in plain backward passes too); PyTorch's own bf16 kernels are deterministic.
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    grads, _ = per_domain_gradients(model, batches, params, runtime)
    expected, _ = separate_backward_passes(model, batches, runtime.autocast)
    assert grads.dtype == torch.float32
    assert torch.allclose(grads, expected, atol=1e-6)
    full, _ = per_domain_gradients(model, batches, params)
    assert not torch.allclose(grads, full, atol=1e-6)  # autocast was really on


def test_unsupported_precision_is_refused_before_training_with_the_fix():
    model = create_backbone("test_resnet", num_classes=5)
    with pytest.raises(DGZooError, match="use --mixed-precision bf16"):
        create_algorithm("equilibrium", model, 3, {}, runtime=AutocastRuntime(torch.float16))
    with pytest.raises(DGZooError, match="grad_engine=loop"):
        create_algorithm("pcgrad", model, 3, {"grad_engine": "vmap"}, runtime=AutocastRuntime(torch.bfloat16))
    create_algorithm("pcgrad", model, 3, {}, runtime=AutocastRuntime(torch.bfloat16))


@pytest.mark.parametrize(
    "algorithm, precision, hparams, message",
    [
        ("equilibrium", "fp16", {}, "do not support --mixed-precision fp16"),
        ("erm+gga_l", "fp16", {}, "do not support --mixed-precision fp16"),
        ("pcgrad", "bf16", {"grad_engine": "vmap"}, "use grad_engine=loop"),
    ],
)
def test_unsupported_precision_fails_before_the_run_directory_is_written(
    tmp_path, algorithm, precision, hparams, message
):
    from conftest import tiny_config
    from dgzoo.training.engine import plan_run

    # On a GPU the runtime check would only fire once the run directory exists; the recipe check must come first.
    run = tmp_path / "run"
    with pytest.raises(DGZooError, match=message):
        plan_run(tiny_config(tmp_path, algorithm=algorithm, mixed_precision=precision, hparams=hparams))
    assert not run.exists()
    plan_run(tiny_config(tmp_path, algorithm="erm", mixed_precision=precision))  # ERM trains under either


def test_gram_is_accurate_where_float32_dot_products_are_not():
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(3, 2_000_000, generator=g) + 3.0  # large common part: float32 sums lose digits
    exact = grads.double() @ grads.double().T
    assert ((gram(grads) - exact).abs().max() / exact.abs().max()) < 1e-6
    cosine = pairwise_cosine(grads)
    assert cosine.dtype == torch.float32
    assert torch.allclose(cosine.double(), exact / exact.diagonal().sqrt().outer(exact.diagonal().sqrt()), atol=1e-6)


def test_randaugment_views_are_seeded_and_distinct():
    model = create_backbone("test_resnet", num_classes=5)
    views = RandAugmentViews(eval_transform(data_config(model, 32)), views=3, num_ops=2, magnitude=9)
    image = Image.fromarray((torch.rand(32, 32) * 255).byte().numpy(), mode="L")
    torch.manual_seed(7)
    first = views(image)
    torch.manual_seed(7)
    again = views(image)
    assert len(first) == 3 and first[0].shape == (3, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not (torch.equal(first[0], first[1]) and torch.equal(first[1], first[2]))


def test_split_views_makes_view_k_of_every_source_domain_k():
    x1, x2 = torch.randn(2, 3, 3, 4, 4), torch.randn(2, 3, 3, 4, 4)
    y1, y2 = torch.tensor([0, 1]), torch.tensor([2, 3])
    domains = split_views([(x1, y1), (x2, y2)])
    assert len(domains) == 3
    for v, (x, y) in enumerate(domains):
        assert torch.equal(x, torch.cat([x1[:, v], x2[:, v]])) and y.tolist() == [0, 1, 2, 3]


def test_views_mode_rules():
    hparams = dict(DomainGradientAlgorithm.HPARAMS)
    defaults = {k: h.default for k, h in hparams.items()}
    model = create_backbone("test_resnet", num_classes=5)
    preprocessing = data_config(model, 32)
    assert DomainGradientAlgorithm.uses_views(defaults, num_sources=1)
    assert not DomainGradientAlgorithm.uses_views(defaults, num_sources=3)
    with pytest.raises(DGZooError, match="--augment none"):  # checked with the recipe, before anything is written
        DomainGradientAlgorithm.check_recipe(defaults, Recipe(num_domains=1, num_classes=5, augment="randaugment"))
    assert DomainGradientAlgorithm.train_transform(preprocessing, "none", defaults, 3) is None
    with pytest.raises(DGZooError, match="at least 2 domains"):
        create_algorithm("pcgrad", model, 1, {"domains": "sources"})
    with pytest.raises(DGZooError, match="views=1 must be at least 2"):
        resolve_hparams("equilibrium", {"views": 1})  # when the recipe is validated, before anything is written
