"""Targeted unlearning of a forget set from a trained dgzoo run: SURE, its baselines, and their evaluation.

    >>> from dgzoo.unlearning import UnlearnConfig, unlearn
    >>> retrain = unlearn(UnlearnConfig("runs/my-run", forget="class=3", method="retrain", output_dir="runs/r3"))
    >>> results = unlearn(UnlearnConfig("runs/my-run", forget="class=3", method="sure", reference="runs/r3"))
    >>> results["unlearning"]["comparison"]["forget_acc"]   # unlearned / original / retrain / gap

The unlearned model is written as a normal dgzoo run directory (timm weights, results.json, model card); SURE's
domain classifier is never part of it. See docs/unlearning.md.
"""

from ..config import UnlearnConfig
from ..run.unlearning_card import render_unlearn_card
from .evaluation import evaluate_model, evaluated_rows
from .forget import ForgetSpec, UnlearningData, parse_forget_spec, split_for_unlearning
from .methods import METHOD_CHOICES, METHODS, SURE, GradientReversal, UnlearningMethod, grad_reverse, register_method
from .plan import plan_unlearning
from .recipe import unlearn
from .source import load_source

__all__ = [
    "ForgetSpec",
    "GradientReversal",
    "METHODS",
    "METHOD_CHOICES",
    "SURE",
    "UnlearnConfig",
    "UnlearningData",
    "UnlearningMethod",
    "evaluate_model",
    "evaluated_rows",
    "grad_reverse",
    "load_source",
    "parse_forget_spec",
    "plan_unlearning",
    "register_method",
    "render_unlearn_card",
    "split_for_unlearning",
    "unlearn",
]
