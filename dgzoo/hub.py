"""Load published (or local) dgzoo checkpoints, and publish run directories to the Hugging Face Hub.

A dgzoo checkpoint is a plain timm checkpoint, so loading goes through timm's own ``hf-hub:`` and
``local-dir:`` sources. dgzoo only adds the evaluation transform and class names, and refuses weights that are
not safetensors (it never unpickles a downloaded file).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

from torch import nn

from .errors import DGZooError

WEIGHTS = "model.safetensors"


class Pretrained(NamedTuple):
    """``model, transform = dgzoo.from_pretrained(...)``; class names are ``.class_names``."""

    model: nn.Module
    transform: Callable

    @property
    def class_names(self) -> list[str]:
        names = self.model.pretrained_cfg.get("label_names") or []
        return list(names.values()) if isinstance(names, dict) else list(names)


def from_pretrained(name_or_path: str | Path, revision: str | None = None) -> Pretrained:
    """Load a dgzoo/timm checkpoint from a run directory or a Hub repo id, in eval mode, with its eval transform.

    ``revision`` (branch, tag or commit sha) applies to Hub repos. Only ``model.safetensors`` weights are
    accepted.
    """
    import timm

    from .data.transforms import eval_transform

    path = Path(str(name_or_path)).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise DGZooError(f"{path} has no config.json; point at a dgzoo run directory or a timm Hub export")
        if not (path / WEIGHTS).exists():
            raise DGZooError(f"{path} has no {WEIGHTS}; dgzoo loads safetensors weights only (never pickles)")
        model = timm.create_model(f"local-dir:{path}", pretrained=True)
    else:
        repo_id = str(name_or_path)
        _check_hub_weights(repo_id, revision)
        model = timm.create_model(f"hf-hub:{repo_id}" + (f"@{revision}" if revision else ""), pretrained=True)
    model.eval()
    return Pretrained(model, eval_transform(timm.data.resolve_model_data_config(model)))


def _check_hub_weights(repo_id: str, revision: str | None) -> None:
    """Refuse a Hub repo that is missing or has no safetensors weights, with a one-line reason."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
    except hf_errors.HFValidationError:
        raise DGZooError(f"'{repo_id}' is neither a local directory nor a valid Hub repo id (org/name)") from None
    except hf_errors.RevisionNotFoundError:
        raise DGZooError(f"revision '{revision}' does not exist in the Hub repo {repo_id}; pass an existing "
                         f"branch, tag or commit sha") from None
    except hf_errors.RepositoryNotFoundError:
        raise DGZooError(f"Hub repo '{repo_id}' does not exist or is private; check the id or log in with "
                         f"`hf auth login`") from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise DGZooError(f"cannot reach the Hub at {huggingface_hub.constants.ENDPOINT} to load {repo_id} "
                         f"({type(e).__name__}); check the connection") from None
    if WEIGHTS not in files:
        raise DGZooError(f"Hub repo {repo_id} has no {WEIGHTS}; dgzoo loads safetensors weights only (never pickles)")


def push_run(run_dir: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
             commit_message: str | None = None, token: str | None = None) -> str:
    """Publish a finished run directory to ``repo_id``; return the URL of the commit.

    The model card is re-rendered with the repo id so its usage code loads from the Hub. Checkpoints and
    logs stay local.
    """
    import huggingface_hub

    from .cards import render_card
    from .export import read_json

    run_dir = Path(run_dir)
    if not (run_dir / "results.json").exists() or not (run_dir / WEIGHTS).exists():
        raise DGZooError(f"{run_dir} is not a finished dgzoo run (no results.json or {WEIGHTS}); train it first")
    results = read_json(run_dir / "results.json")
    config = read_json(run_dir / "train_config.json")
    card = render_card(results, config, repo_id=repo_id, run_dir=run_dir)
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [huggingface_hub.CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode())]
    for name in ("config.json", WEIGHTS, "results.json", "records.jsonl", "accuracy_per_domain.png",
                 "training_curves.png", "train_config.json"):
        if (run_dir / name).exists():
            operations.append(huggingface_hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(run_dir / name)))
    info = api.create_commit(repo_id, operations=operations, revision=revision,
                             commit_message=commit_message or f"dgzoo: {results['algorithm']} on "
                                                              f"{results['dataset']['title']}")
    return info.commit_url

