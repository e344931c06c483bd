"""dgzoo: domain generalization for any timm backbone, trained with Accelerate, published on the Hugging Face Hub.

    >>> import dgzoo
    >>> model, transform = dgzoo.from_pretrained("path/to/run-or/hub-repo")
    >>> results = dgzoo.train(dgzoo.TrainConfig(dataset="rotated-digits", algorithm="erm"))
    >>> dgzoo.push_run("runs/rotated-digits-resnet18-erm-75-seed0", "me/rotated-digits-erm")
    >>> dgzoo.list_models(dataset="pacs", held_out="sketch")  # published dgzoo checkpoints on the Hub
    >>> dgzoo.soup(["sweeps/s/run-a", "sweeps/s/run-b"], "soups/ab", method="greedy")  # weight average of runs

The heavy parts (torch, timm, the Hub clients) load on first use, so ``dgzoo report`` or ``dgzoo --help`` start fast.
"""

from importlib import import_module
from typing import Any

from ._version import __version__
from .config import TrainConfig
from .errors import DGZooError

_LAZY = {
    "Pretrained": "run.pretrained",
    "evaluate_pretrained": "training.evaluation",
    "from_pretrained": "run.pretrained",
    "push_run": "run.publish",
    "train": "training.engine",
    "list_models": "experiments.zoo",
    "soup": "experiments.soup",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'dgzoo' has no attribute {name!r}")


__all__ = [
    "DGZooError",
    "Pretrained",
    "TrainConfig",
    "__version__",
    "evaluate_pretrained",
    "from_pretrained",
    "list_models",
    "push_run",
    "soup",
    "train",
]
