"""The trained run being unlearned: a dgzoo run directory or Hub repo, its model, recipe and results.

A Hub run is read at one commit, so the weights, the recipe and the results always belong together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..config import TrainConfig
from ..errors import DGZooError
from ..run.hub import from_pretrained, resolve_checkpoint
from ..run.rundir import read_json


@dataclass
class Source:
    """The trained run being unlearned: its model, recipe and results."""

    name: str
    model: nn.Module
    train_config: TrainConfig
    results: dict[str, Any]
    repo_id: str | None = None
    revision: str | None = None


def load_source(name: str, revision: str | None = None) -> Source:
    """Load a finished dgzoo run (directory or Hub repo id): model through ``dgzoo.from_pretrained``, plus recipe.

    A Hub run is pinned to one commit: weights, recipe and results all come from the commit the revision names.
    """
    local = Path(name.removeprefix("local-dir:")).expanduser()
    if local.is_dir():
        missing = [f for f in ("train_config.json", "results.json") if not (local / f).exists()]
        if missing:
            raise DGZooError(
                f"{local} is not a finished dgzoo run (no {', '.join(missing)}); unlearning needs the "
                f"run's recipe to rebuild the data it trained on"
            )
    folder, repo_id, sha = resolve_checkpoint(name, revision)
    model = from_pretrained(repo_id or folder, revision=sha).model
    if repo_id:
        recipe, results = _hub_json(repo_id, "train_config.json", sha), _hub_json(repo_id, "results.json", sha)
    else:
        recipe, results = _run_json(folder / "train_config.json"), _run_json(folder / "results.json")
    config = TrainConfig.from_dict(recipe, source=f"{repo_id or folder}/train_config.json")
    return Source(repo_id or str(folder), model, config, results, repo_id, sha)


def _run_json(path: Path) -> dict[str, Any]:
    """A JSON file of a source run directory, or one line saying it is unreadable and what to do."""
    try:
        value = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise DGZooError(
            f"{path} is not valid JSON ({' '.join(str(e).split())[:80]}): the source run was stopped "
            f"while writing it; finish the source run with `dgzoo train ... --resume` (or train it "
            f"again), then unlearn from it"
        ) from None
    if not isinstance(value, dict):
        raise DGZooError(
            f"{path} does not hold a JSON object; it was not written by dgzoo; unlearn from a run "
            f"directory written by `dgzoo train`"
        )
    return value


def _hub_json(repo_id: str, filename: str, revision: str | None) -> dict[str, Any]:
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    try:
        return read_json(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision))
    except hf_errors.EntryNotFoundError:
        raise DGZooError(
            f"Hub repo {repo_id} has no {filename}; only runs published by dgzoo (with their recipe) can be unlearned"
        ) from None
    except hf_errors.HFValidationError:
        raise DGZooError(f"'{repo_id}' is neither a run directory nor a Hub repo id (USER_OR_ORG/NAME)") from None
    except (hf_errors.HfHubHTTPError, OSError, getattr(hf_errors, "HTTPError", OSError)) as e:  # + httpx errors
        raise DGZooError(
            f"cannot download {filename} of {repo_id} from {huggingface_hub.constants.ENDPOINT} "
            f"({type(e).__name__}); check the connection"
        ) from None
