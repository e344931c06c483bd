"""The GPU fast path: channels-last memory format, ``torch.compile`` of the network, and CUDA's fast math.

Each is decided once per run, by the engine:

- ``--channels-last``: the network's weights, and every 4-D image batch the loop feeds it, are stored channels-last
  (NHWC), the layout tensor cores' convolutions want. The numbers are those of the default layout up to float
  rounding.
- ``--compile``: the network's forward passes (logits, features, head) are compiled in place, so its module tree,
  parameter names, state dict and everything exported stay those of the plain timm model; the algorithm around it
  (its losses, per-domain gradient passes, add-ons) runs eagerly and calls the compiled network. A host or add-on
  whose use of the network a compiled graph would not honour says so with ``COMPILABLE = False`` and a reason, and
  the recipe is refused when it is planned, before anything is written.
- On CUDA, always: ``cudnn.benchmark`` (cuDNN times its convolution algorithms once per input shape and keeps the
  fastest; a run's training batches all have one shape) and TF32 for float32 matrix products, as timm's own
  ``train.py`` does. Neither changes what is computed beyond float rounding, so they are not flags.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..algorithms import AddOn, Algorithm
from ..errors import DGZooError


def configure_cuda(device: torch.device) -> None:
    """On a CUDA device: cuDNN autotuning and TF32 float32 matrix products (timm's train.py defaults)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")  # TF32 matrix products; convolutions use TF32 by default


def compiler_available() -> bool:
    """Whether this machine has the C/C++ compiler ``torch.compile``'s default backend builds its kernels with
    (C++ kernels on CPU; Triton's launchers on GPU)."""
    names = [os.environ.get("CXX"), os.environ.get("CC"), "g++", "c++", "clang++", "gcc", "cc", "clang"]
    return any(shutil.which(name) for name in names if name)


def check_compile(host: type[Algorithm], addons: Sequence[type[AddOn]]) -> None:
    """Refuse ``--compile`` with one line when a component of the algorithm cannot run on a compiled network, or
    when no compiler is installed."""
    for component in (host, *addons):
        if not component.COMPILABLE:
            raise DGZooError(
                f"--compile cannot be used with {component.name}: {component.COMPILE_REFUSAL}; drop --compile"
            )
    if not compiler_available():
        raise DGZooError(
            "--compile needs a C/C++ compiler (none of g++, c++, clang++, gcc, cc is on PATH); install "
            "one (Debian/Ubuntu: apt-get install build-essential) or drop --compile"
        )


def apply_memory_format(network: nn.Module, channels_last: bool) -> nn.Module:
    """``network`` with its weights channels-last if asked (in place; the parameters stay the same objects)."""
    if channels_last:
        network.to(memory_format=torch.channels_last)
    return network


# torch.compile's backend for --compile: inductor (generated kernels). Tests set "aot_eager" (the same graphs, run
# by eager kernels, in seconds instead of minutes on a CPU) to check what compilation does to an algorithm.
COMPILE_BACKEND = "inductor"
# The network's entry points algorithms call: the logits (``network(x)``) and DomainBed's featurizer / classifier
# split (``forward_features``, ``forward_head``), which most hosts use instead of the logits.
COMPILED_METHODS = ("forward", "forward_features", "forward_head")


class CompiledMethod:
    """``module.<name>`` compiled with ``torch.compile``, set on the module instance in place of the method.

    A deep copy of the module (MLDG's and Fish's inner networks, SWAD's average) gets its own compiled method,
    bound to the copy: a compiled bound method copied as it is would keep computing with the original's weights.
    """

    def __init__(self, module: nn.Module, name: str, backend: str | None = None):
        self.module, self.name, self.backend = module, name, backend or COMPILE_BACKEND
        self.compiled = torch.compile(getattr(type(module), name).__get__(module), backend=self.backend)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.compiled(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledMethod:
        return CompiledMethod(memo.get(id(self.module), self.module), self.name, self.backend)


def compile_network(network: nn.Module, backend: str | None = None) -> nn.Module:
    """Compile ``network``'s forward passes in place (:data:`COMPILED_METHODS`); its module tree, names and state
    dict are unchanged, so checkpoints and exports are those of the plain network."""
    for name in COMPILED_METHODS:
        if callable(getattr(type(network), name, None)):
            setattr(network, name, CompiledMethod(network, name, backend))
    return network


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A training batch on ``device``, channels-last when asked and it is a 4-D image batch (multi-view batches
    ``[B, views, C, H, W]`` are split into views by their algorithm and keep the default layout)."""
    if channels_last and x.dim() == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)
