"""Shared test set-up: isolated caches, the local Hub server fixture, and small-run helpers.

Caches are redirected before anything imports ``datasets`` or ``huggingface_hub`` (both read their cache
paths at import time), so the suite never reads or writes the user's caches and never needs the network.
"""

import os
import sys
import tempfile
from pathlib import Path

_CACHE = Path(tempfile.mkdtemp(prefix="dgzoo-test-cache-"))
os.environ.setdefault("DGZOO_CACHE", str(_CACHE / "dgzoo"))
os.environ["HF_DATASETS_CACHE"] = str(_CACHE / "datasets")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import hub_server  # noqa: E402,F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent


def plain_timm_logits(run_dir: Path, x, tmp_path: Path):
    """Logits of ``x`` from ``timm.create_model("local-dir:RUN_DIR", pretrained=True)`` in a fresh process that
    never imports dgzoo: what a user without dgzoo gets from the published files."""
    import subprocess

    import torch

    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, timm, torch\n"
        "m = timm.create_model(f'local-dir:{sys.argv[1]}', pretrained=True).eval()\n"
        "assert 'dgzoo' not in sys.modules\n"
        "torch.save(m(torch.load(sys.argv[2])), sys.argv[3])\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(run_dir), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        check=True,
        env=subprocess_env(),
        cwd=tmp_path,
    )
    return torch.load(tmp_path / "y.pt")


# Failures of torchrun's rendezvous or of gloo's TCP transport on a loaded machine, not of the code under test.
_LAUNCH_FAILURES = (
    "RendezvousConnectionError",
    "DistNetworkError",
    "DistStoreError",
    "Address already in use",
    "Connection reset by peer",
    "Connection refused",
    "Socket Timeout",
)


def run_processes(nproc: int, argv: list, cwd: Path | None = None):
    """Run the Python script ``argv[0]`` with its arguments as ``nproc`` CPU processes under torchrun (gloo; 1 =
    plain python), one intra-op thread each, and assert it succeeded (showing the output's tail if not).

    A launch that fails in the process group's set-up, before the test's code ran, is tried once more.
    """
    import subprocess

    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    for attempt in range(2):
        proc = subprocess.run(
            launcher + [str(a) for a in argv],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=subprocess_env(OMP_NUM_THREADS="1"),
        )
        output = proc.stdout[-3000:] + proc.stderr[-3000:]
        if proc.returncode == 0 or attempt or not any(marker in output for marker in _LAUNCH_FAILURES):
            break
    assert proc.returncode == 0, output
    return proc


# The train section of the sweeps the sweep, launcher and Slurm tests run: two steps of a tiny ResNet on 8 px images.
TINY_SWEEP_TRAIN = dict(
    backbone="test_resnet",
    image_size=8,
    steps=2,
    eval_every=2,
    checkpoint_every=1,
    batch_size=8,
    lr=3e-3,
    eval_batch_size=512,
    log_with="none",
    num_workers=0,
)


def tiny_config(tmp_path: Path, **overrides):
    """A run small enough for a unit test: tiny timm ResNet, 8 images per domain, a few steps."""
    from dgzoo.config import TrainConfig

    values = dict(
        backbone="test_resnet",
        steps=12,
        batch_size=8,
        eval_every=6,
        lr=3e-3,
        log_with="none",
        output_dir=str(tmp_path / "run"),
        num_workers=0,
    )
    values.update(overrides)
    return TrainConfig.from_dict(values)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One finished tiny ERM run on rotated-digits, shared by the export/loading tests."""
    from dgzoo.training.engine import train

    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(tmp)
    results = train(cfg)
    return Path(cfg.output_dir), results


# A 16 px preprocessing (timm's data config layout) for tests that run images through the transforms.
PREPROCESSING = {
    "input_size": (3, 16, 16),
    "interpolation": "bilinear",
    "mean": (0.5,) * 3,
    "std": (0.5,) * 3,
    "crop_pct": 1.0,
    "crop_mode": "squash",
}


@pytest.fixture(scope="module")
def digits():
    """The embedded rotated-digits dataset (a module overrides it where it needs its splits too)."""
    from dgzoo.data import load_dg_dataset

    return load_dg_dataset("rotated-digits")


def record_worker_starts(monkeypatch) -> list[str]:
    """The dataset class of every DataLoader worker process started from now on (the list fills as they start)."""
    import torch.multiprocessing

    started: list[str] = []

    class Recorded(torch.multiprocessing.Process):
        def start(self):
            started.append(type(self._args[1][0]).__name__)  # a worker's arguments: (kind, [dataset], ...)
            super().start()

    monkeypatch.setattr(torch.multiprocessing, "Process", Recorded)
    return started


def subprocess_env(**extra: str) -> dict:
    """Environment for a child Python process that sees the same caches and the repo's package."""
    env = {k: v for k, v in os.environ.items()}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env
