"""The one training loop, shared by ``dgzoo train``, the dry run's timing and every unlearning method.

:func:`build_algorithm` composes ``host+addon+...`` on Accelerate: the host (an ``nn.Module`` owning the timm
network) and each optimizer it declares are prepared together, so DDP wraps the whole algorithm.
:func:`run_steps` is the loop: one step function per batch, the state's counters, metrics averaged over processes,
a stop at the first non-finite loss, logs, the progress bar and an ``after_step`` callback where the caller
evaluates and checkpoints. :func:`fit` steps a DG algorithm on it (one ``update`` on one minibatch per domain, the
schedule, add-on epoch events); unlearning steps SURE and its baselines on it, and retrains and fine-tunes with
:func:`fit`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..algorithms import Algorithm, Composition, EpochContext, Minibatches, create_algorithm
from ..algorithms.composition import scalars
from ..data import DomainImages, eval_loader, train_loader
from ..errors import DGZooError
from ..run.rundir import nonfinite_tensors
from .fastpath import to_device
from .optimisation import create_optimizer
from .runtime import AccelerateRuntime


@dataclass
class TrainState:
    """Loop state saved in every checkpoint (plain Python values only, so it loads with ``weights_only``)."""

    step: int = 0
    train_seconds: float = 0.0
    images: int = 0
    best_score: float = -1.0
    best_step: int = -1
    records: list[dict[str, Any]] = field(default_factory=list)
    interval: dict[str, list[float]] = field(default_factory=dict)  # step metrics since the last evaluation

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass(frozen=True)
class Optimisation:
    """The recipe's optimisation settings, as the loop and :func:`build_algorithm` use them."""

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    grad_accumulation: int = 1
    clip_grad_norm: float | None = None


class AcceleratedLossStep:
    """A loss host's optimizer step: ``grad_accumulation`` micro-batches (DDP synchronises only the last), the
    backward pass through Accelerate (fp16 loss scaling), then the step."""

    def __init__(self, accelerator: Any, accumulation: int = 1):
        self.accelerator, self.accumulation = accelerator, accumulation

    def __call__(self, host: Algorithm, minibatches: Minibatches, step: int) -> dict[str, float]:
        n = self.accumulation
        host.optimizer.zero_grad(set_to_none=True)
        micro = (
            [list(minibatches)]
            if n == 1
            else [[(x.tensor_split(n)[i], y.tensor_split(n)[i]) for x, y in minibatches] for i in range(n)]
        )
        totals: dict[str, float] = {}
        for i, chunk in enumerate(micro):
            last = i == n - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(host.prepared):
                loss, metrics = host.call("loss", chunk, step)
                self.accelerator.backward(loss / n if n > 1 else loss)
            for key, value in {"loss": float(loss.detach()), **scalars(metrics)}.items():
                totals[key] = totals.get(key, 0.0) + value / n
        host.optimizer.step()
        return totals


def clip_gradients(host: Algorithm, max_norm: float) -> Callable[[], None]:
    """An optimizer pre-step hook clipping the gradient norm of the host's parameters (every host, every step)."""
    params = [p for p in host.parameters() if p.requires_grad]
    return lambda: torch.nn.utils.clip_grad_norm_(params, max_norm)


def build_algorithm(
    spec: str,
    network: torch.nn.Module,
    num_classes: int,
    num_domains: int,
    hparams: dict[str, dict[str, Any]],
    accelerator: Any,
    settings: Optimisation,
) -> Composition:
    """``spec`` composed around ``network`` on ``accelerator``, with the recipe's optimizers (``hparams`` as
    resolved by :func:`~dgzoo.algorithms.check_algorithm`)."""

    def make_optimizer(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return create_optimizer(groups, settings.optimizer, settings.lr, settings.weight_decay, settings.momentum)

    algorithm = create_algorithm(
        spec,
        network,
        num_domains,
        hparams,
        num_classes=num_classes,
        resolved=True,
        runtime=AccelerateRuntime(accelerator),
        make_optimizer=make_optimizer,
        prepare=accelerator.prepare,
        loss_step=AcceleratedLossStep(accelerator, settings.grad_accumulation),
    )
    if settings.clip_grad_norm:
        for name in algorithm.host.optimizers:
            algorithm.host.hook_optimizer_step(clip_gradients(algorithm.host, settings.clip_grad_norm), name)
    return algorithm


@dataclass
class LoopData:
    """What the loop trains on: one training set per domain, and what post-epoch add-ons see."""

    domains: list[str]
    train_sets: Sequence[DomainImages]
    epoch_train: Sequence[DomainImages]  # evaluation-transform copies for add-ons (IU)
    epoch_val: Sequence[DomainImages]
    batch_size: int
    seed: int  # of the data order
    workers: int = 0
    pin_memory: bool = False
    channels_last: bool = False  # feed 4-D image batches channels-last (--channels-last)

    @property
    def steps_per_epoch(self) -> int:
        """DomainBed's epoch: the smallest domain's training set once."""
        return max(1, math.ceil(min(len(s) for s in self.train_sets) / self.batch_size))


def source_batches(data: LoopData, accelerator: Any, seed: int) -> Callable[[int], Iterator[torch.Tensor]]:
    """A factory of ``n`` pooled training batches (one minibatch per source domain, training transform, this
    process's share) drawn in the order of ``seed``: the data SWAD recomputes BatchNorm statistics on."""

    def batches(n: int) -> Iterator[torch.Tensor]:
        loader = train_loader(
            data.train_sets,
            data.batch_size,
            seed,
            n,
            0,
            accelerator.process_index,
            accelerator.num_processes,
            data.workers,
            data.pin_memory,
        )
        for minibatches in loader:
            yield torch.cat([x for x, _ in minibatches]).to(accelerator.device, non_blocking=True)

    return batches


def fit(
    algorithm: Composition,
    data: LoopData,
    accelerator: Any,
    scheduler: Any,
    state: TrainState,
    steps: int,
    after_step: Callable[[TrainState, dict[str, float]], None] | None = None,
    desc: str = "train",
) -> None:
    """Train ``algorithm`` from ``state.step`` to ``steps``; ``after_step(state, metrics)`` ends every step.

    A step is one ``update`` on one minibatch per domain, then the schedule, then at an epoch's end the add-ons'
    epoch event; :func:`run_steps` is the loop around it.
    """
    loader = train_loader(
        data.train_sets,
        data.batch_size,
        data.seed,
        steps,
        state.step,
        accelerator.process_index,
        accelerator.num_processes,
        data.workers,
        data.pin_memory,
    )
    steps_per_epoch = data.steps_per_epoch

    def train_step(minibatches: Minibatches, step: int) -> dict[str, float]:
        minibatches = [
            (to_device(x, accelerator.device, data.channels_last), y.to(accelerator.device, non_blocking=True))
            for x, y in minibatches
        ]
        metrics = algorithm.update(minibatches, step)
        scheduler.step_update(step + 1)
        if (step + 1) % steps_per_epoch == 0:
            context = EpochContext(
                epoch=(step + 1) // steps_per_epoch,
                step=step + 1,
                steps_per_epoch=steps_per_epoch,
                source_domains=data.domains,
                source_train=list(data.epoch_train),
                source_val=list(data.epoch_val),
                make_loader=lambda ds, bs: eval_loader(ds, bs, data.workers, data.pin_memory),
                batch_size=data.batch_size,
            )
            metrics.update(algorithm.on_epoch_end(context))
        return metrics

    images_per_step = data.batch_size * len(data.train_sets)
    run_steps(train_step, loader, accelerator, state, steps, images_per_step, after_step, desc)


def run_steps(
    step: Callable[[Any, int], dict[str, float]],
    batches: Iterable[Any],
    accelerator: Any,
    state: TrainState,
    steps: int,
    images_per_step: int,
    after_step: Callable[[TrainState, dict[str, float]], None] | None = None,
    desc: str = "train",
) -> None:
    """The one step loop of every recipe: ``step(batch, state.step)`` on each of ``batches`` (``steps`` in all,
    counted from ``state.step``), which returns the step's metrics; then the state's counters, the metrics averaged
    over processes, a stop at a non-finite loss, the logs and the progress bar; ``after_step(state, metrics)`` ends
    every step (where the caller evaluates, checkpoints or keeps a history).

    :func:`fit` steps a DG algorithm with it; unlearning steps its methods with it.
    """
    from tqdm.auto import tqdm

    runtime = AccelerateRuntime(accelerator)
    progress = tqdm(
        total=steps, initial=state.step, disable=not accelerator.is_local_main_process, desc=desc, dynamic_ncols=True
    )
    tick = time.perf_counter()
    try:  # the bar is closed (its line ended) before any error or Ctrl-C message is printed
        for batch in batches:
            metrics = step(batch, state.step)
            state.step += 1
            state.images += images_per_step
            state.train_seconds += time.perf_counter() - tick
            metrics = process_mean(metrics, runtime)
            check_finite_losses(metrics, state.step)
            for key, value in metrics.items():
                state.interval.setdefault(key, []).append(value)
            accelerator.log(metrics, step=state.step)
            progress.update(1)
            if "loss" in metrics:
                progress.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
            if after_step is not None:
                after_step(state, metrics)
            tick = time.perf_counter()
    finally:
        progress.close()


class NonFiniteTraining(DGZooError):
    """The loss or the weights became NaN or infinite: the run diverged."""


def check_finite_losses(metrics: dict[str, float], step: int) -> None:
    """Stop at the first step whose loss is not finite, before it is logged, evaluated or checkpointed.

    Metrics are already averaged over processes, so every process stops at the same step.
    """
    bad = sorted(k for k, v in metrics.items() if (k == "loss" or k.endswith("_loss")) and not math.isfinite(v))
    if bad:
        raise NonFiniteTraining(f"the training loss became {metrics[bad[0]]} at step {step} ({', '.join(bad)})")


def check_finite(network: nn.Module, step: int) -> None:
    """Refuse a network whose weights hold NaN or infinity (diverged without a non-finite loss showing it)."""
    bad = nonfinite_tensors(network.state_dict())
    if bad:
        raise NonFiniteTraining(f"the weights became non-finite by step {step} ({len(bad)} tensors, e.g. {bad[0]})")


def process_mean(metrics: dict[str, float], runtime: Any) -> dict[str, float]:
    """Step metrics averaged over processes (each measured its share of the batch), keys in a fixed order."""
    if runtime.num_processes == 1 or not metrics:
        return {k: float(v) for k, v in metrics.items()}
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], device=runtime.device, dtype=torch.float64)
    return dict(zip(keys, runtime.all_reduce_mean(values).tolist()))
