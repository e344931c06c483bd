"""Optimizers and learning-rate schedules, from timm's factories.

``--optimizer adam|adamw|sgd`` maps onto timm's ``create_optimizer_v2`` names (``sgd`` is SGD with momentum and no
Nesterov term, as DomainBed's), with DomainBed's weight-decay semantics: the decay applies to every parameter,
biases and normalisation layers included (timm would exempt those by default). ``--lr-schedule`` and
``--warmup-steps`` map onto ``create_scheduler_v2`` stepped once per training step.
"""

from __future__ import annotations

from typing import Any

import torch

TIMM_OPTIMIZERS = {"adam": "adam", "adamw": "adamw", "sgd": "momentum"}


def create_optimizer(
    groups: list[dict[str, Any]], optimizer: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """The recipe's optimizer over parameter ``groups`` (a group's own ``lr``/``weight_decay`` win)."""
    from timm.optim import create_optimizer_v2

    kwargs: dict[str, Any] = {"momentum": momentum} if optimizer == "sgd" else {}
    return create_optimizer_v2(
        groups, opt=TIMM_OPTIMIZERS[optimizer], lr=lr, weight_decay=weight_decay, filter_bias_and_bn=False, **kwargs
    )


def create_scheduler(optimizer: torch.optim.Optimizer, schedule: str, steps: int, warmup_steps: int = 0) -> Any:
    """timm's ``constant`` or ``cosine`` schedule over ``steps`` optimizer steps, after ``warmup_steps`` of linear
    warm-up from 0 (cosine ends at lr 0, as before). Call ``step_update(step)`` after every step."""
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        getattr(optimizer, "optimizer", optimizer),
        sched=schedule,
        num_epochs=steps,
        warmup_epochs=warmup_steps,
        warmup_lr=0.0,
        min_lr=0.0,
        step_on_epochs=False,
        updates_per_epoch=1,
    )
    return scheduler


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The first parameter group's learning rate now."""
    return float(optimizer.param_groups[0]["lr"])
