"""The GPU fast path (``--channels-last``, ``--compile``, CUDA's fast math): recipe fields with one meaning on every
launcher, the same weights as eager training within float tolerance, and a one-line refusal, before anything is
written, for algorithms a compiled network would silently change."""

import copy
import shlex

import pytest
import torch
from safetensors.torch import load_file

import dgzoo.training.engine as engine
import dgzoo.training.fastpath as fastpath
from dgzoo.algorithms import ADDONS, ALGORITHMS, create_algorithm
from dgzoo.cli import build_parser, main
from dgzoo.config import TrainConfig, config_from_args
from dgzoo.experiments.launchers import pool_prefix
from dgzoo.experiments.sweep import SweepSpec, expand, train_command
from dgzoo.models import create_backbone
from dgzoo.training.fastpath import compile_network, configure_cuda

# One SGD step, then the exported weights are compared with eager training's. Float32 rounding differs between
# layouts and kernels; BatchNorm over digit images (channels of near-constant background) amplifies it, so one step
# leaves differences up to ~4e-4 on the first convolution: the tolerance is 1e-3. The float64 comparison below
# checks the same computation to 1e-9.
RUN = dict(
    backbone="test_resnet",
    steps=1,
    eval_every=1,
    batch_size=8,
    optimizer="sgd",
    lr=0.05,
    log_with="none",
    num_workers=0,
    target_domains=["75"],
    overwrite=True,
)


def batches(step, domains=2, batch=4, size=16):
    g = torch.Generator().manual_seed(step)
    return [
        (torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(domains)
    ]


def tiny_network():
    """Convolution, BatchNorm, pooling and a linear head: the smallest network inductor compiles in seconds."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 10),
    )


def trained(spec, compiled=None, channels_last=False, steps=2, dtype=torch.float32, make=None):
    torch.manual_seed(0)
    network = (make or (lambda: create_backbone("test_resnet", num_classes=10)))().to(dtype)
    if channels_last:
        network.to(memory_format=torch.channels_last)
    algorithm = create_algorithm(
        spec, network, 2, {}, num_classes=10, make_optimizer=lambda g: torch.optim.SGD(g, lr=0.05)
    )
    if compiled:
        compile_network(network, compiled)
    for step in range(steps):
        minibatches = [(x.to(dtype), y) for x, y in batches(step)]
        if channels_last:
            minibatches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in minibatches]
        algorithm.update(minibatches, step)
    return {k: v.detach().clone().contiguous() for k, v in network.state_dict().items()}


def assert_close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst <= atol, worst


# ---------------------------------------------------------------------- the same weights as eager


def test_channels_last_computes_what_the_default_layout_computes():
    # In float64 the two layouts agree to rounding after several steps; in float32 after one (see RUN).
    assert_close(
        trained("erm", channels_last=True, steps=3, dtype=torch.float64),
        trained("erm", steps=3, dtype=torch.float64),
        atol=1e-9,
    )


def test_the_channels_last_flag_trains_and_exports_the_eager_weights(tmp_path, monkeypatch):
    layouts = []
    apply = engine.apply_memory_format
    monkeypatch.setattr(engine, "apply_memory_format", lambda network, on: layouts.append(on) or apply(network, on))
    engine.train(TrainConfig.from_dict({**RUN, "output_dir": str(tmp_path / "eager")}))
    engine.train(TrainConfig.from_dict({**RUN, "output_dir": str(tmp_path / "cl"), "channels_last": True}))
    assert layouts == [False, True]
    exported = load_file(tmp_path / "cl" / "model.safetensors")  # exported in the default layout: it loads
    assert all(t.is_contiguous() for t in exported.values())
    assert_close(exported, load_file(tmp_path / "eager" / "model.safetensors"), atol=1e-3)


@pytest.mark.slow
def test_the_compile_flag_trains_and_exports_the_eager_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(fastpath, "COMPILE_BACKEND", "aot_eager")  # the graphs --compile runs, eager kernels
    compiled = []
    monkeypatch.setattr(engine, "compile_network", lambda network: compiled.append(network) or compile_network(network))
    engine.train(
        TrainConfig.from_dict({**RUN, "output_dir": str(tmp_path / "compiled"), "compile": True, "algorithm": "coral"})
    )  # features and head: compiled too
    engine.train(TrainConfig.from_dict({**RUN, "output_dir": str(tmp_path / "coral"), "algorithm": "coral"}))
    assert len(compiled) == 1 and isinstance(compiled[0].forward_features, fastpath.CompiledMethod)
    assert_close(
        load_file(tmp_path / "compiled" / "model.safetensors"),
        load_file(tmp_path / "coral" / "model.safetensors"),
        atol=1e-5,
    )


@pytest.mark.slow
def test_inductor_compiled_training_gives_the_eager_weights():
    """torch.compile's real backend (generated C++ kernels on CPU): one tiny network, two steps."""
    assert_close(trained("erm", compiled="inductor", make=tiny_network), trained("erm", make=tiny_network), atol=1e-5)


def test_a_deep_copy_of_a_compiled_network_computes_with_its_own_weights():
    # MLDG and Fish train deep copies; a compiled bound method copied as it is would use the original's weights.
    torch.manual_seed(0)
    network = compile_network(create_backbone("test_resnet", num_classes=10).eval(), "eager")
    clone = copy.deepcopy(network)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(1.0)
    x = torch.randn(2, 3, 16, 16)
    for method in ("__call__", "forward_features"):
        assert not torch.allclose(getattr(clone, method)(x), getattr(network, method)(x))
    assert torch.equal(
        clone(x),
        torch.func.functional_call(
            create_backbone("test_resnet", num_classes=10).eval(), dict(clone.state_dict()), (x,)
        ),
    )
    assert list(network.state_dict()) == list(create_backbone("test_resnet", num_classes=10).state_dict())


# ---------------------------------------------------------------------- refusals, at plan time


def test_every_component_that_cannot_be_compiled_says_why():
    refused = {c.name: c.COMPILE_REFUSAL for c in [*ALGORITHMS.values(), *ADDONS.values()] if not c.COMPILABLE}
    # What the survey of every host and add-on on a compiled network found (docs/performance.md).
    assert sorted(refused) == ["efdmix", "iga", "miro", "mixstyle"]
    assert all(len(reason) > 30 for reason in refused.values())


@pytest.mark.parametrize("algorithm, name", [("iga", "iga"), ("erm+mixstyle", "mixstyle")])
def test_compile_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys, algorithm, name):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--algorithm",
                algorithm,
                "--compile",
                "--backbone",
                "test_resnet",
                "--steps",
                "1",
                "--output-dir",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dgzoo: error: --compile cannot be used with {name}: ")
    assert err[0].endswith("; drop --compile")
    assert not out.exists()


def test_compile_without_a_compiler_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fastpath.shutil, "which", lambda name: None)
    assert main(["train", "--compile", "--backbone", "test_resnet", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "dgzoo: error: --compile needs a C/C++ compiler (none of g++, c++, clang++, gcc, cc is on PATH); "
        "install one (Debian/Ubuntu: apt-get install build-essential) or drop --compile"
    ]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- one meaning on every launcher


def test_fast_path_flags_are_recipe_fields_with_one_meaning_everywhere(tmp_path):
    parsed = config_from_args(build_parser().parse_args(["train", "--channels-last", "--compile"]))
    assert parsed.channels_last and parsed.compile
    recipe = tmp_path / "gpu.yaml"
    recipe.write_text("channels_last: true\ncompile: true\nmixed_precision: bf16\n")
    from_yaml = TrainConfig.from_yaml(recipe)
    assert (from_yaml.channels_last, from_yaml.compile, from_yaml.mixed_precision) == (True, True, "bf16")
    # A sweep passes them to every run, whichever launcher starts it (the pool's and Slurm's commands included).
    spec = SweepSpec.from_dict(
        dict(
            datasets=["rotated-digits"],
            algorithms=["erm"],
            test_domains=["0"],
            n_trials=1,
            output_dir=str(tmp_path / "sw"),
            train=dict(channels_last=True, compile=True, mixed_precision="bf16"),
        )
    )
    [run] = expand(spec)
    assert run.config.channels_last and run.config.compile
    words = shlex.split(train_command(run.config, pool_prefix(1, 0)))
    assert "--channels-last" in words and "--compile" in words
    assert config_from_args(build_parser().parse_args(words[3:])).to_dict() == run.config.to_dict()


def test_cuda_fast_math_is_set_on_cuda_devices_only():
    before = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    try:
        torch.backends.cudnn.benchmark = False
        torch.set_float32_matmul_precision("highest")
        configure_cuda(torch.device("cpu"))
        assert (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == (False, "highest")
        configure_cuda(torch.device("cuda"))
        assert (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == (True, "high")
    finally:
        torch.backends.cudnn.benchmark = before[0]
        torch.set_float32_matmul_precision(before[1])


def test_a_run_resumes_with_the_fast_path_switched_on(tmp_path):
    # Layout and compilation change no result: resuming a run with them is allowed (and sweeps treat runs that
    # differ only in them as the same run).
    out = tmp_path / "run"
    engine.train(TrainConfig.from_dict({**RUN, "steps": 1, "output_dir": str(out)}))
    resumed = TrainConfig.from_dict(
        {
            **RUN,
            "steps": 2,
            "eval_every": 1,
            "output_dir": str(out),
            "resume": True,
            "overwrite": False,
            "channels_last": True,
        }
    )
    assert engine.train(resumed)["steps"] == 2


# ---------------------------------------------------------------------- bf16


def test_every_host_and_addon_takes_bf16_and_only_the_vmap_gradient_engine_refuses_it():
    from dgzoo.algorithms import Recipe, check_algorithm
    from dgzoo.errors import DGZooError

    recipe = Recipe(num_domains=3, num_classes=10, mixed_precision="bf16")
    for spec in [*ALGORITHMS, *(f"erm+{a}" for a in ADDONS)]:
        check_algorithm(spec, {}, recipe)
    # Refused when the recipe is planned (before anything is written), for the host and both GGA add-ons.
    for spec, key in [
        ("equilibrium", "grad_engine"),
        ("erm+gga", "gga.grad_engine"),
        ("erm+gga_l", "gga_l.grad_engine"),
    ]:
        with pytest.raises(DGZooError, match="grad_engine=vmap does not support mixed precision; use grad_engine="):
            check_algorithm(spec, {key: "vmap"}, recipe)
        with pytest.raises(DGZooError, match="do not support --mixed-precision fp16"):
            check_algorithm(spec, {}, Recipe(num_domains=3, num_classes=10, mixed_precision="fp16"))


def test_the_gpu_recipes_turn_on_bf16_and_channels_last_and_pass_their_checks():
    from pathlib import Path

    from dgzoo.algorithms import Recipe, check_algorithm

    root = Path(__file__).resolve().parent.parent / "recipes" / "configs"
    gpu = [p for p in sorted(root.glob("*.yaml")) if p.stem != "default" and not p.stem.startswith("rotated_digits")]
    assert len(gpu) >= 10
    for path in gpu:
        cfg = TrainConfig.from_yaml(path)
        cfg.validate()
        assert (cfg.mixed_precision, cfg.channels_last, cfg.compile) == ("bf16", True, False), path.name
        check_algorithm(cfg.algorithm, cfg.hparams, Recipe(num_domains=3, num_classes=7, mixed_precision="bf16"))
