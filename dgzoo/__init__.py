"""dgzoo: domain generalization for any timm backbone, trained with Accelerate, published on the Hugging Face Hub.

    >>> import dgzoo
    >>> model, transform = dgzoo.from_pretrained("path/to/run-or/hub-repo")
    >>> results = dgzoo.train(dgzoo.TrainConfig(dataset="rotated-digits", algorithm="erm"))
    >>> dgzoo.push_run("runs/rotated-digits-resnet18-erm-75-seed0", "me/rotated-digits-erm")
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dgzoo")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0"

from .config import TrainConfig  # noqa: E402
from .errors import DGZooError  # noqa: E402
from .hub import Pretrained, evaluate_pretrained, from_pretrained, push_run  # noqa: E402


def train(config: TrainConfig) -> dict:
    """Train one run described by ``config`` and return its results (see :func:`dgzoo.engine.train`)."""
    from .engine import train as _train

    return _train(config)


__all__ = ["DGZooError", "Pretrained", "TrainConfig", "__version__", "evaluate_pretrained", "from_pretrained",
           "push_run", "train"]
