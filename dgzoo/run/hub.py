"""The Hugging Face Hub side of dgzoo, in one import: loading checkpoints and publishing runs.

Two modules do the work: :mod:`dgzoo.run.pretrained` loads dgzoo (or any timm) checkpoints from a run directory
or the Hub (and holds the Hub basics both sides share: repo ids, tokens, one-line reasons for failed calls), and
:mod:`dgzoo.run.publish` publishes run directories. This module re-exports their names so that
``from dgzoo.run.hub import push_run, from_pretrained`` keeps working; new code may import either module.
"""

from __future__ import annotations

from .pretrained import (
    CONFIG,
    WEIGHTS,
    Pretrained,
    check_repo_id,
    create_from_folder,
    from_pretrained,
    hub_error_reason,
    label_names,
    resolve_checkpoint,
    resolve_token,
)
from .publish import (
    PUBLISHED_FILES,
    PushRefused,
    _published_bytes,
    check_finished_run,
    check_push_target,
    check_run_loads,
    finetuned_pretrained_cfg,
    push_run,
    retry_advice,
    retry_command,
    retryable,
    upload_run,
    without_local_paths,
)

__all__ = [
    "CONFIG",
    "PUBLISHED_FILES",
    "Pretrained",
    "PushRefused",
    "WEIGHTS",
    "_published_bytes",
    "check_finished_run",
    "check_push_target",
    "check_repo_id",
    "check_run_loads",
    "create_from_folder",
    "finetuned_pretrained_cfg",
    "from_pretrained",
    "hub_error_reason",
    "label_names",
    "push_run",
    "resolve_checkpoint",
    "resolve_token",
    "retry_advice",
    "retry_command",
    "retryable",
    "upload_run",
    "without_local_paths",
]
