"""Load dgzoo (or any timm) checkpoints from a run directory or the Hugging Face Hub, and the Hub basics (repo
ids, tokens, one-line reasons for failed calls) that publishing (:mod:`dgzoo.run.publish`) shares.

Loading (:func:`from_pretrained`) resolves a Hub revision to its commit, checks that the commit holds
``model.safetensors``, downloads only ``config.json`` and ``model.safetensors`` and builds the model with timm
from that folder. dgzoo therefore never unpickles a downloaded file, whatever the repo's config asks for.

Tokens come from where huggingface_hub looks (``HF_TOKEN``, then the login stored by ``hf auth login``), or
from an explicit ``token`` argument. A token is never written to a file, a log, a card or an error message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from torch import nn

from ..errors import DGZooError
from ..hubhttp import install_hub_timeouts

install_hub_timeouts()  # every Hub call of this module (and of those importing it) ends: timeouts, bounded retry

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class Pretrained(NamedTuple):
    """``model, transform = dgzoo.from_pretrained(...)``; class names are ``.class_names``."""

    model: nn.Module
    transform: Callable

    @property
    def class_names(self) -> list[str]:
        return label_names(self.model)


def label_names(model: nn.Module) -> list[str]:
    names = model.pretrained_cfg.get("label_names") or []
    return list(names.values()) if isinstance(names, dict) else list(names)


# ---------------------------------------------------------------------- repo ids, tokens, errors


def check_repo_id(repo_id: str, what: str = "Hub repo id") -> str:
    """Return ``repo_id`` if it is a valid ``namespace/name`` Hub id, else raise a one-line DGZooError.

    A namespace is required (rather than defaulting to the token's user) so the model card, the usage code and
    the retry command all name the repo that will actually exist.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise DGZooError(
            f"{what} '{repo_id}' is invalid: use USER_OR_ORG/NAME with letters, digits, '-', '_' or "
            f"'.', e.g. me/pacs-resnet50-erm"
        ) from None
    if "/" not in repo_id:
        raise DGZooError(f"{what} '{repo_id}' has no namespace: write it as USER_OR_ORG/{repo_id}")
    return repo_id


def resolve_token(token: str | None = None) -> str | None:
    """The token to use: ``token`` if given, else huggingface_hub's lookup (``HF_TOKEN``, then ``hf auth login``)."""
    from huggingface_hub import get_token

    return token or get_token()


def hub_error_reason(error: BaseException, token: str | None = None) -> str:
    """A one-line, token-free description of a failed Hub call."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    transport = getattr(hf_errors, "HTTPError", ())  # httpx's base error: connection refused, timeouts, ...
    first = str(error).splitlines()[0] if str(error) else ""
    if isinstance(error, hf_errors.HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        detail = (error.server_message or str(error).splitlines()[0]).strip().rstrip(".")
        hint = {
            401: "the token is invalid or expired; run `hf auth login` or set HF_TOKEN",
            403: "the token may not write to this repo",
        }.get(status)
        text = f"HTTP {status}: {detail}" + (f"; {hint}" if hint else "")
    elif isinstance(error, DGZooError):
        text = str(error)
    elif isinstance(error, transport):
        text = f"cannot reach the Hub at {constants.ENDPOINT} ({type(error).__name__}: {first})"
    else:
        text = f"{type(error).__name__}: {first}"
    text = " ".join(text.split())
    return text.replace(token, "***") if token else text


# ---------------------------------------------------------------------- loading


def _split_reference(name_or_path: str | Path, revision: str | None) -> tuple[Path | None, str | None, str | None]:
    """Turn ``DIR``, ``local-dir:DIR``, ``REPO``, ``hf-hub:REPO`` or ``REPO@REV`` into (dir, repo id, revision)."""
    text = str(name_or_path)
    if text.startswith("local-dir:"):
        return Path(text[len("local-dir:") :]).expanduser(), None, None
    path = Path(text).expanduser()
    if path.is_dir():
        return path, None, None
    for prefix in ("hf-hub:", "hf_hub:"):
        text = text[len(prefix) :] if text.startswith(prefix) else text
    repo_id, _, at = text.partition("@")
    if at and revision and at != revision:
        raise DGZooError(f"'{name_or_path}' names revision {at} but revision={revision} was also given; pass one")
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        raise DGZooError(f"{name_or_path} is not a directory; point at a dgzoo run directory or a Hub repo id")
    check_repo_id(repo_id, "model")
    return None, repo_id, revision or at or None


def resolve_checkpoint(
    name_or_path: str | Path, revision: str | None = None, token: str | None = None
) -> tuple[Path, str | None, str | None]:
    """Return ``(folder, repo_id, commit sha)``: a local folder holding ``config.json`` + ``model.safetensors``.

    Hub checkpoints are pinned to one commit, checked for safetensors weights, and only those two files are
    downloaded (into the huggingface_hub cache). With ``HF_HUB_OFFLINE=1`` the cache answers.
    """
    folder, repo_id, revision = _split_reference(name_or_path, revision)
    if folder is not None:
        if not (folder / CONFIG).is_file():
            raise DGZooError(f"{folder} has no {CONFIG}; point at a dgzoo run directory or a timm Hub export")
        if not (folder / WEIGHTS).is_file():
            raise DGZooError(f"{folder} has no {WEIGHTS}; dgzoo loads safetensors weights only (never pickles)")
        return folder, None, None
    assert repo_id is not None  # not a folder: _split_reference gives a Hub repo id
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    from ..data.loading import resolve_hub_revision

    token = resolve_token(token)
    revision = resolve_hub_revision(repo_id, revision, "model", token)  # a commit sha, unless offline
    try:
        if not huggingface_hub.constants.HF_HUB_OFFLINE:
            files = set(huggingface_hub.HfApi(token=token).list_repo_files(repo_id, revision=revision))
            if WEIGHTS not in files:
                pickled = sorted(f for f in files if f.endswith((".bin", ".pth", ".pt", ".ckpt", ".pkl")))
                raise DGZooError(
                    f"Hub repo {repo_id} has no {WEIGHTS}"
                    f"{' (only ' + ', '.join(pickled) + ')' if pickled else ''}; dgzoo loads "
                    f"safetensors weights only and never unpickles a download"
                )
            if CONFIG not in files:
                raise DGZooError(f"Hub repo {repo_id} has no {CONFIG}, so it is not a timm checkpoint")
        paths = [
            huggingface_hub.hf_hub_download(repo_id, name, revision=revision, token=token) for name in (CONFIG, WEIGHTS)
        ]
    except hf_errors.LocalEntryNotFoundError:
        raise DGZooError(
            f"{repo_id} is not in the local cache and HF_HUB_OFFLINE is set; unset it to download"
        ) from None
    except DGZooError:
        raise
    except Exception as e:
        raise DGZooError(f"could not load {repo_id} from the Hub: {hub_error_reason(e, token)}") from None
    return Path(paths[0]).parent, repo_id, revision


def create_from_folder(folder: Path) -> nn.Module:
    import timm

    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise DGZooError(f"{folder / CONFIG} is not valid JSON ({e}); re-export or re-download it") from None
    arch = config.get("architecture")
    if not arch:
        raise DGZooError(f"{folder / CONFIG} has no 'architecture', so it is not a timm checkpoint")
    if not timm.is_model(arch):
        raise DGZooError(f"the checkpoint's architecture '{arch}' is unknown to timm {timm.__version__}; upgrade timm")
    try:
        return timm.create_model(f"local-dir:{folder}", pretrained=True)
    except RuntimeError as e:
        raise DGZooError(
            f"the weights in {folder / WEIGHTS} do not fit '{arch}' as {CONFIG} describes it ({str(e).splitlines()[0]})"
        ) from None
    except Exception as e:
        raise DGZooError(
            f"{folder / WEIGHTS} cannot be read ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); it is truncated or corrupt: re-export or "
            f"re-download it"
        ) from None


def from_pretrained(name_or_path: str | Path, revision: str | None = None, token: str | None = None) -> Pretrained:
    """Load a dgzoo/timm checkpoint in eval mode with its eval transform (and ``.class_names``).

    ``name_or_path`` is a run directory (``local-dir:`` optional) or a Hub repo id (``hf-hub:`` and
    ``@revision`` optional); ``revision`` is a branch, tag or commit sha of a Hub repo. The model is the plain
    timm model that ``timm.create_model("hf-hub:REPO", pretrained=True)`` builds; only safetensors weights are
    accepted.
    """
    import timm

    from ..data.transforms import eval_transform

    folder, repo_id, _ = resolve_checkpoint(name_or_path, revision, token)
    model = create_from_folder(folder)
    if repo_id:
        model.pretrained_cfg["hf_hub_id"] = repo_id  # where it came from, as timm records for hf-hub: loads
    model.eval()
    return Pretrained(model, eval_transform(timm.data.resolve_model_data_config(model)))
