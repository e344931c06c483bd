"""The algorithm/add-on registries, hyperparameter validation, ERM, and the per-domain gradient engine."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from dgzoo.algorithms import (
    ADDONS,
    ALGORITHMS,
    AddOn,
    HParam,
    create_algorithm,
    parse_algorithm,
    register_addon,
    resolve_hparams,
)
from dgzoo.algorithms.gradients import FlatParams, pairwise_cosine, per_domain_gradients
from dgzoo.errors import DGZooError
from dgzoo.models import create_backbone


def minibatches(k=3, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 5, (b,), generator=g)) for _ in range(k)]


@pytest.fixture
def counter_addon():
    @register_addon
    class Counter(AddOn):
        name = "counter_test"
        HPARAMS = {
            "every": HParam(2, "count every N steps", minimum=1),
            "mode": HParam("a", "mode", choices=("a", "b")),
            "limit": HParam(10, "upper limit", maximum=100),
        }

        @classmethod
        def check_hparams(cls, hparams):
            if hparams["every"] > hparams["limit"]:
                raise DGZooError("counter_test.every exceeds counter_test.limit")

        def __init__(self, host, hparams, runtime):
            super().__init__(host, hparams, runtime)
            self.calls = []

        def before_update(self, context):
            self.calls.append(("before", context.step))
            return {"seen": float(context.step)}

        def after_update(self, context):
            self.calls.append(("after", context.step))
            return {}

    yield Counter
    ADDONS.pop("counter_test")


def test_an_addon_event_with_another_signature_is_refused_when_its_class_is_defined():
    with pytest.raises(
        TypeError, match=r"OldStyle.after_update must take one argument, \(self, context: StepContext\)"
    ):

        class OldStyle(AddOn):  # dgzoo 0.1's signature
            def after_update(self, minibatches, step):
                return {}

    with pytest.raises(TypeError, match=r"on_evaluate must take one argument, \(self, context: EvalContext\)"):

        class NoContext(AddOn):
            def on_evaluate(self):
                return {}


def test_no_host_shadows_a_torch_module_method_with_another_signature():
    # A host is an nn.Module: containers and tools call Module.apply / train / to on it with torch's arguments.
    for name, cls in ALGORITHMS.items():
        for method in dir(torch.nn.Module):
            ours, torchs = getattr(cls, method), getattr(torch.nn.Module, method)
            if method.startswith("__") or method == "forward" or not callable(torchs) or ours is torchs:
                continue
            assert list(inspect.signature(ours).parameters) == list(inspect.signature(torchs).parameters), (
                f"{name}: {cls.__qualname__}.{method} shadows torch.nn.Module.{method}"
            )


def test_runtime_and_optimizers_are_declared_and_stay_outside_the_module_tree():
    from dgzoo.algorithms import Algorithm, Runtime

    assert {"runtime", "optimizers"} <= set(Algorithm.__annotations__)  # what a type checker reads
    host = create_algorithm("erm", create_backbone("test_resnet", num_classes=3), 2).host
    assert isinstance(host.runtime, Runtime) and set(host.optimizers) == {"main"}
    assert [name for name, _ in host.named_children()] == ["network"]  # not submodules, no state-dict keys
    assert all(key.startswith("network.") for key in host.state_dict())


def test_unknown_names_get_suggestions():
    with pytest.raises(DGZooError, match=r"unknown algorithm 'ermm' \(did you mean: erm\b"):
        parse_algorithm("ermm")
    with pytest.raises(DGZooError, match="unknown add-on 'nope'"):
        parse_algorithm("erm+nope")


def test_hparams_are_namespaced_coerced_and_validated(counter_addon):
    resolved = resolve_hparams("erm+counter_test", {"counter_test.every": "5", "counter_test.mode": "b"})
    assert resolved == {"erm": {}, "counter_test": {"every": 5, "mode": "b", "limit": 10}}
    with pytest.raises(DGZooError, match="counter_test.every=0 must be at least 1"):
        resolve_hparams("erm+counter_test", {"counter_test.every": 0})
    with pytest.raises(DGZooError, match="counter_test.limit=101 must be at most 100"):
        resolve_hparams("erm+counter_test", {"counter_test.limit": 101})
    with pytest.raises(DGZooError, match="every exceeds"):
        resolve_hparams("erm+counter_test", {"counter_test.every": 20})
    with pytest.raises(DGZooError, match="must be int"):
        resolve_hparams("erm+counter_test", {"counter_test.every": 2.5})
    with pytest.raises(DGZooError, match="not one of a, b"):
        resolve_hparams("erm+counter_test", {"counter_test.mode": "c"})
    with pytest.raises(DGZooError, match=r"unknown hparam 'counter_test.evry' .*did you mean: every"):
        resolve_hparams("erm+counter_test", {"counter_test.evry": 1})
    with pytest.raises(DGZooError, match="does not belong to 'erm'"):
        resolve_hparams("erm", {"counter_test.every": 1})


def test_addons_wrap_the_host_update_in_order(counter_addon):
    model = create_backbone("test_resnet", num_classes=5)
    algorithm = create_algorithm(
        "erm+counter_test", model, 3, make_optimizer=lambda g: torch.optim.SGD(g, lr=0.1), hparams={}
    )
    metrics = algorithm.update(minibatches(), step=7)
    assert algorithm.addons[0].calls == [("before", 7), ("after", 7)]
    assert metrics["counter_test/seen"] == 7.0 and "loss" in metrics
    assert algorithm.name == "erm+counter_test" and algorithm.hparams == {
        "counter_test.every": 2,
        "counter_test.mode": "a",
        "counter_test.limit": 10,
    }


def test_erm_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = create_backbone("test_resnet", num_classes=5)
    algorithm = create_algorithm("erm", model, 3, make_optimizer=lambda g: torch.optim.Adam(g, lr=1e-2), hparams={})
    batches = minibatches()
    losses = [algorithm.update(batches, step)["loss"] for step in range(15)]
    assert losses[-1] < 0.5 * losses[0]


def test_per_domain_gradients_equal_separate_backward_passes():
    torch.manual_seed(0)
    model = create_backbone("test_resnet", num_classes=5).train()
    params = FlatParams.of(model)
    batches = minibatches()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads, losses = per_domain_gradients(model, batches, params)
    assert grads.shape == (3, params.numel)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched
    for k, (x, y) in enumerate(batches):
        model.load_state_dict(state)  # the same BatchNorm statistics as the engine saw for domain k
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        expected = torch.cat([p.grad.reshape(-1) for p in params.tensors])
        assert torch.allclose(grads[k], expected, atol=1e-5) and torch.isclose(losses[k], loss)
        model.load_state_dict(state)


def test_flat_params_round_trip_and_cosines():
    model = create_backbone("test_resnet", num_classes=5)
    params = FlatParams.of(model)
    flat = torch.arange(params.numel, dtype=torch.float32)
    params.assign_grad(flat)
    assert torch.equal(params.flatten([p.grad for p in params.tensors]), flat)
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    assert torch.allclose(pairwise_cosine(g), torch.tensor([[1.0, 0, -1], [0, 1, 0], [-1, 0, 1]]))
