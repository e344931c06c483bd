"""Publish run directories to the Hugging Face Hub.

Publishing (:func:`push_run`; ``dgzoo push`` and the recipe's ``--push-to-hub``) uploads timm's layout
(``config.json`` + ``model.safetensors``), a model card rendered for the repo, ``results.json``, the evaluation
records, the recipe and the plots in one commit. Checkpoints and logs stay local. The run directory is only
read: a push that fails leaves it exactly as it was and says which command retries it.

Before anything is created on the Hub, a push checks that the run loads as published: ``config.json`` parses,
``model.safetensors`` reads completely and holds only finite numbers, and timm builds the model from the folder.
A sweep (:func:`dgzoo.run.zoo.push_sweep`; ``dgzoo push SWEEP_DIR PREFIX``) publishes every finished run as its own
repo, the ``dgzoo report`` tables in a results dataset repo, and a Hub collection holding them all.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

from ..errors import DGZooError
from .cards import card_license, render_card, sweep_entry
from .claim import claimed_by_another, describe_holder
from .pretrained import CONFIG, WEIGHTS, check_repo_id, create_from_folder, hub_error_reason, resolve_token
from .results import DatasetRef, RunResults
from .rundir import SAMPLES_IMAGE, nonfinite_tensors, read_json
from .unlearning_card import render_unlearn_card

# What a push uploads. Checkpoints (optimizer state, pickled RNG states) and logs are for resuming and
# debugging on the training machine, and would make every download of the model larger.
PUBLISHED_FILES = (
    CONFIG,
    WEIGHTS,
    "results.json",
    "records.jsonl",
    "train_config.json",
    "unlearn_config.json",
    "accuracy_per_domain.png",
    "training_curves.png",
    SAMPLES_IMAGE,
)
_SHA = re.compile(r"[0-9a-f]{40}")


# ---------------------------------------------------------------------- checks before a push


def _check_branch(revision: str | None, flag: str = "--hub-revision") -> None:
    """Refuse a revision that is not a branch name; ``flag`` is the option of the command that took it."""
    if revision is not None and (_SHA.fullmatch(revision) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)*", revision)):
        raise DGZooError(
            f"Hub revision '{revision}' cannot be pushed to: name a branch (created from main if "
            f"missing), e.g. {flag} v1"
        )


def _is_launch_main() -> bool:
    """Whether this is the main process of a launch (``RANK`` unset or 0), the only one that talks to the Hub."""
    return os.environ.get("RANK", "0") == "0"


def check_push_target(
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    repo_type: str = "model",
    revision_flag: str = "--hub-revision",
) -> str:
    """Check, before any training or upload, that a push to ``repo_id`` can succeed; return the token to use.

    Offline: the repo id, branch name and the presence of a token. On the main process of a launch also
    online (one ``whoami`` call, which the Hub rate-limits): the token is valid and may write, its user may
    write to the namespace, and ``private`` does not meet an existing public repo.
    """
    import huggingface_hub

    check_repo_id(repo_id)
    _check_branch(revision, revision_flag)
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise DGZooError(
            "pushing to the Hub needs the network but HF_HUB_OFFLINE is set; unset it, or train "
            "without --push-to-hub and run `dgzoo push RUN_DIR REPO_ID` later"
        )
    token = resolve_token(token)
    if not token:
        raise DGZooError(
            "pushing to the Hub needs a Hugging Face token with write access: run `hf auth login` or "
            "set HF_TOKEN (`dgzoo push` also takes --token)"
        )
    if not _is_launch_main():
        return token
    api = huggingface_hub.HfApi(token=token)
    try:
        me = api.whoami()
    except Exception as e:
        raise DGZooError(f"could not check the Hugging Face token: {hub_error_reason(e, token)}") from None
    access = (me.get("auth") or {}).get("accessToken") or {}
    if access.get("role") == "read":
        raise DGZooError(
            "the Hugging Face token is read-only; create a token with write access and run "
            "`hf auth login` or set HF_TOKEN"
        )
    namespace = repo_id.split("/")[0]
    namespaces = [me.get("name")] + [org.get("name") for org in me.get("orgs") or []]
    if me.get("type") == "user" and namespace not in namespaces:
        raise PushRefused(
            f"the token's user {me.get('name')} cannot write to '{namespace}/' (its namespaces: "
            f"{', '.join(filter(None, namespaces))}); push to one of those"
        )
    _check_visibility(api, repo_id, repo_type, private, token)
    return token


def _check_visibility(api: Any, repo_id: str, repo_type: str, private: bool, token: str) -> None:
    """Refuse to push a run meant to be private into an existing public repo (visibility is set at creation)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    if not private:
        return
    try:
        info = api.repo_info(repo_id, repo_type=repo_type)
    except RepositoryNotFoundError:
        return
    except Exception as e:
        raise DGZooError(f"could not read the Hub {repo_type} repo {repo_id}: {hub_error_reason(e, token)}") from None
    if not info.private:
        raise PushRefused(
            f"Hub {repo_type} repo {repo_id} exists and is public, so --private would not hide this "
            f"push; make the repo private in its settings first, or push to a new repo id"
        )


class PushRefused(DGZooError):
    """A push that the same command can never make: the target itself must change (another namespace, a new repo)."""


def retryable(error: BaseException) -> bool:
    """Whether the same command can succeed once the cause the message names is gone: the Hub could not be
    reached, timed out or was busy (HTTP 408, 429, 5xx), or the token is missing or invalid (fixed by logging in)
    or the network is switched off. A missing permission (HTTP 403, a namespace the token cannot write to), a
    public repo asked to be private, a request the Hub rejects (other 4xx) or anything else fails the same way
    every time, so its message names its own fix and no retry command."""
    from huggingface_hub import errors as hf_errors

    if isinstance(error, PushRefused):
        return False
    if isinstance(error, DGZooError):
        return True  # no token, a read-only token, HF_HUB_OFFLINE set: the fix is outside the command
    if isinstance(error, hf_errors.HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        return status in (401, 408, 429) or status >= 500
    return isinstance(error, (getattr(hf_errors, "HTTPError", OSError), OSError, TimeoutError))


def retry_advice(error: BaseException, retry: str) -> str:
    """``; retry with: <command>`` when a retry can fix ``error`` (:func:`retryable`), else nothing: the reason
    already says what to change."""
    return f"; retry with: {retry}" if retryable(error) else ""


# ---------------------------------------------------------------------- publishing


def retry_command(
    run_dir: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    license: str | None = None,
) -> str:
    """The ``dgzoo push`` command that repeats a push (it never includes the token)."""
    parts = ["dgzoo", "push", shlex.quote(str(Path(run_dir).resolve())), shlex.quote(repo_id)]
    if private:
        parts.append("--private")
    if revision:
        parts += ["--revision", shlex.quote(revision)]
    if commit_message:
        parts += ["--commit-message", shlex.quote(commit_message)]
    if license:
        parts += ["--license", shlex.quote(license)]
    return " ".join(parts)


def push_run(
    run_dir: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    license: str | None = None,
) -> str:
    """Publish a finished run directory to the Hub model repo ``repo_id``; return the URL of the commit.

    ``private`` applies when the repo is created (an existing public repo is refused rather than silently
    published to). ``revision`` is a branch, created from main when missing. ``license`` overrides the card's
    licence, which otherwise follows the training data's. The card is re-rendered for the repo so its usage
    code loads from the Hub; the local README.md is left as it is. Any failure raises a one-line DGZooError
    that ends with the command that retries the push.
    """
    run_dir = Path(run_dir)
    check_finished_run(run_dir)
    check_repo_id(repo_id)
    _check_branch(revision, "--revision")
    check_run_loads(run_dir)
    retry = retry_command(run_dir, repo_id, private, revision, commit_message, license)
    token = resolve_token(token)
    try:
        token = check_push_target(repo_id, token, private, revision, revision_flag="--revision")
        return upload_run(run_dir, repo_id, private, revision, commit_message, token, license)
    except Exception as e:
        raise DGZooError(
            f"push of {run_dir} to {repo_id} failed: {hub_error_reason(e, token)}. The run directory "
            f"is intact{retry_advice(e, retry)}"
        ) from None


def check_finished_run(run_dir: Path) -> None:
    """Refuse a directory that is not a finished run (one line naming what is missing)."""
    if not all((run_dir / name).is_file() for name in ("results.json", "train_config.json", CONFIG, WEIGHTS)):
        raise DGZooError(
            f"{run_dir} is not a finished dgzoo run (it needs results.json, train_config.json, {CONFIG} "
            f"and {WEIGHTS}); train it first, or point at the run's --output-dir"
        )


def check_run_loads(run_dir: str | Path) -> None:
    """Check that a run's published files load, so that nothing broken (or diverged) is ever created on the Hub.

    ``config.json`` must parse, ``model.safetensors`` must read completely (a truncated file does not) and hold
    only finite numbers, and timm must build the model from the folder with those weights. Raises a one-line
    DGZooError naming the file and the fix; reads only.
    """
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    holder = claimed_by_another(run_dir)
    if holder is not None:  # its files are still being written: the weights may be replaced mid-upload
        raise DGZooError(f"{run_dir} is still in use by {describe_holder(holder)}; push it once that has finished")
    fix = f"restore it, or train the run again (dgzoo train --config {run_dir / 'train_config.json'} --overwrite)"
    try:
        json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError) as e:
        raise DGZooError(
            f"{run_dir / 'results.json'} is not valid JSON ({str(e).splitlines()[0]}): the run stopped "
            f"while writing it; nothing was pushed: finish it (dgzoo train --config "
            f"{run_dir / 'train_config.json'} --resume), then push again"
        ) from None
    try:
        json.loads((run_dir / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise DGZooError(
            f"{run_dir / CONFIG} is not valid JSON ({str(e).splitlines()[0]}), so the run would not "
            f"load; nothing was pushed: {fix}"
        ) from None
    try:
        state = load_file(str(run_dir / WEIGHTS))
    except Exception as e:
        raise DGZooError(
            f"{run_dir / WEIGHTS} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}); it is "
            f"truncated or corrupt and nothing was pushed: {fix}"
        ) from None
    bad = nonfinite_tensors(state)
    if bad:
        raise DGZooError(
            f"{run_dir / WEIGHTS} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}): the run "
            f"diverged, so it is not published; train it again with a lower --lr (or --clip-grad-norm)"
        )
    try:
        create_from_folder(run_dir)
    except DGZooError as e:
        raise DGZooError(f"{e}; nothing was pushed") from None
    except Exception as e:
        raise DGZooError(
            f"timm cannot build the model of {run_dir} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); nothing was pushed: {fix}"
        ) from None


def upload_run(
    run_dir: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    token: str | None,
    license: str | None,
) -> str:
    """Create the repo (if missing) and upload the run's files in one commit; return the commit URL."""
    import huggingface_hub

    results = read_json(run_dir / "results.json")
    card, default_message = _card_for(run_dir, results, repo_id, license, revision)
    message = commit_message or default_message
    operations = [huggingface_hub.CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode())]
    operations += [
        huggingface_hub.CommitOperationAdd(
            path_in_repo=name, path_or_fileobj=_published_bytes(run_dir, name, repo_id, results, license)
        )
        for name in PUBLISHED_FILES
        if (run_dir / name).is_file()
    ]
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, private=private or None, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.create_commit(repo_id, operations=operations, revision=revision, commit_message=message).commit_url


def _published_bytes(
    run_dir: Path,
    name: str,
    repo_id: str | None = None,
    results: dict[str, Any] | None = None,
    license: str | None = None,
) -> bytes:
    """A run file as published: JSON files lose the absolute local paths they record (home and cache folders
    are nobody else's business and mean nothing on another machine); they keep the path's last component.
    ``config.json``'s ``pretrained_cfg`` describes the published weights (:func:`finetuned_pretrained_cfg`)."""
    data = (run_dir / name).read_bytes()
    if name == CONFIG and repo_id and results is not None:
        config = json.loads(data)
        config["pretrained_cfg"] = finetuned_pretrained_cfg(
            config.get("pretrained_cfg") or {}, repo_id, results, card_license(results, license)["license"]
        )
        return (json.dumps(config, indent=2) + "\n").encode()
    if name not in ("results.json", "train_config.json", "unlearn_config.json"):
        return data
    return (json.dumps(without_local_paths(json.loads(data)), indent=2) + "\n").encode()


def without_local_paths(value: Any) -> Any:
    """``value`` (parsed JSON) with every absolute local path replaced by its last component, at any depth."""
    if isinstance(value, dict):
        return {k: without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_local_paths(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    if isinstance(value, str) and " /" in value:  # a command line or message naming paths (a soup's command)
        return " ".join(Path(t).name if os.path.isabs(t) and Path(t).name else t for t in value.split(" "))
    return value


# timm pretrained_cfg fields that describe where a set of weights came from: true of the base weights a run
# started from, false of the fine-tuned weights it publishes.
_PROVENANCE_FIELDS = (
    "url",
    "hf_hub_id",
    "tag",
    "license",
    "origin_url",
    "paper_name",
    "paper_ids",
    "notes",
    "description",
    "hf_hub_filename",
    "source",
)


def finetuned_pretrained_cfg(
    cfg: dict[str, Any], repo_id: str, results: dict[str, Any], license: str
) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` for published dgzoo weights: the preprocessing fields (input size, mean, std,
    crop, interpolation, classifier) stay; the base weights' tag, licence, origin and papers are replaced by
    those of the fine-tuned weights (their repo, the card's licence, what they were trained for and from)."""
    import huggingface_hub

    out = {k: v for k, v in cfg.items() if k not in _PROVENANCE_FIELDS}
    res = RunResults.from_json(results)
    base = res.base_model
    kind = "unlearned" if res.kind == "unlearning" else "trained"
    out.update(
        hf_hub_id=repo_id,
        license=license,
        origin_url=f"{huggingface_hub.constants.ENDPOINT}/{repo_id}",
        description=(
            f"{res.backbone} {kind} with dgzoo ({res.algorithm}) on "
            f"{_dataset(res).title}, held-out {', '.join(res.target_domains)}"
        ),
        notes=[f"fine-tuned from {base}" if base else "trained from random initialisation"],
    )
    return out


def _card_for(
    run_dir: Path, results: dict[str, Any], repo_id: str, license: str | None, revision: str | None = None
) -> tuple[str, str]:
    """The card and default commit message of a run: a training run's, or an unlearning run's (``kind``)."""
    res = RunResults.from_json(results)
    if res.kind == "unlearning":
        info = res.require("unlearning").unlearning or {}
        return (
            render_unlearn_card(results, repo_id=repo_id, run_dir=run_dir, license=license),
            f"dgzoo: unlearn {info['forget_spec']} with {res.algorithm}",
        )
    # The published card is rendered from what is published: a soup's command names its ingredients' directories
    # and a recipe's init_from a run directory, which mean nothing on another machine (the local card keeps them).
    results = without_local_paths(results)
    card = render_card(
        results,
        without_local_paths(read_json(run_dir / "train_config.json")),
        repo_id=repo_id,
        run_dir=run_dir,
        license=license,
        sweep=sweep_entry(run_dir),
        revision=revision,
    )
    accuracy = res.require("target_accuracy").target_accuracy
    assert accuracy is not None, "a finished run records its held-out accuracy"
    return card, (
        f"dgzoo: {res.algorithm} {res.backbone} on {_dataset(res).title}, held-out "
        f"{', '.join(res.target_domains)} {100 * accuracy:.1f}%"
    )


def _dataset(res: RunResults) -> DatasetRef:
    """The run's dataset (a KeyError if its results.json names none, as every finished run does)."""
    dataset = res.require("dataset").dataset
    assert dataset is not None
    return dataset
