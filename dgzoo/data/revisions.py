"""Pinned commits of registry datasets, and the column mapping of whichever commit is loaded.

A registry entry pins the commit its columns were verified at (:attr:`DatasetSpec.revision`). :func:`resolve_pinned`
turns that pin (or the user's ``--revision``) into what the Hub should be asked for, and says in one line when
the Hub no longer serves the pinned commit. :func:`apply_layout` picks the entry's :class:`ColumnLayout` for the
loaded commit and, where that commit has no domain column, derives the domain from each image's stored path.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from ..errors import DGZooError
from ..hubhttp import install_hub_timeouts
from .registry import DatasetSpec

SHA_LENGTH = 40


def resolve_pinned(
    spec: DatasetSpec, revision: str | None, repo_type: str = "dataset", token: str | None = None
) -> str | None:
    """The revision to load for ``spec``: ``revision`` when the user gave one, else the pinned commit as a full sha.

    A pin the Hub no longer serves raises a one-line DGZooError naming it and ``--revision``. A short pin (a
    commit id as the Hub's pages show it) is expanded through the repo's commit list; offline it is used as is.
    """
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    if revision or not spec.revision:
        return revision
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return spec.revision
    gone = DGZooError(
        f"the Hub no longer serves {spec.repo_id} at dgzoo's pinned commit {spec.revision}; pass "
        f"--revision main (or another commit of {spec.repo_id}) to load what it serves now"
    )
    assert spec.repo_id is not None  # a pin is a commit of the spec's Hub repo
    api = huggingface_hub.HfApi(token=token)
    try:
        if len(spec.revision) == SHA_LENGTH:
            api.repo_info(spec.repo_id, repo_type=repo_type, revision=spec.revision)
            return spec.revision
        for commit in api.list_repo_commits(spec.repo_id, repo_type=repo_type):
            if commit.commit_id.startswith(spec.revision):
                return commit.commit_id
    except hf_errors.RevisionNotFoundError:
        raise gone from None
    except hf_errors.RepositoryNotFoundError:
        raise DGZooError(
            f"Hub {repo_type} '{spec.repo_id}' does not exist or is private; log in with `hf auth login` "
            f"if it is private, or pass a local copy with --dataset PATH"
        ) from None
    except (hf_errors.HfHubHTTPError, OSError, getattr(hf_errors, "HTTPError", OSError)) as e:  # + httpx errors
        raise DGZooError(
            f"cannot reach the Hub at {huggingface_hub.constants.ENDPOINT} to load {spec.repo_id} "
            f"({type(e).__name__}); check the connection, or set HF_HUB_OFFLINE=1 to use a cached "
            f"copy"
        ) from None
    raise gone  # the short id matches no commit on main: the history was rewritten


def apply_layout(
    table: Any, spec: DatasetSpec, sha: str | None, columns: dict[str, str], given: dict[str, str | None]
) -> tuple[Any, dict[str, str]]:
    """The table and the image/label/domain columns to read at commit ``sha`` of ``spec``'s repo.

    Columns the user named (``given``) win; the others follow the commit's layout. A layout without a domain
    column takes the table's ``domain`` column if it has one, else adds one derived from the image paths.
    """
    layout = spec.layout_at(sha, list(table.column_names))
    if not layout.images:
        raise DGZooError(
            f"{spec.repo_id} at commit {sha} holds {layout.note or 'no images'}, so it cannot be "
            f"trained on; pass --revision {spec.revision} (dgzoo's pinned commit) or a later one"
        )
    out = {
        "image": given["image"] or layout.image,
        "label": given["label"] or layout.label,
        "domain": given["domain"] or layout.domain or "domain",
    }
    if not given["domain"] and layout.domain is None and "domain" not in table.column_names:
        table = table.add_column("domain", domains_from_paths(table, out["image"], spec))
    return table, {**columns, **out}


def domain_of_path(path: str, spec: DatasetSpec) -> str | None:
    """The domain an image's stored path names: a path component that is a domain (``real/zebra/x.jpg``), else a
    file-name prefix (DomainNet's ``real_345_000001.jpg``), matched against the registry's domain names."""
    parts = PurePosixPath(str(path).replace("\\", "/")).parts
    for part in parts:
        found = spec.canonical_domain(part)
        if found is not None:
            return found
    prefix = parts[-1].split("_")[0] if parts else ""
    return spec.canonical_domain(prefix) if prefix else None


def domains_from_paths(table: Any, image_column: str, spec: DatasetSpec) -> list[str]:
    """The domain of every row, from the file path stored with its image (the image bytes are not decoded)."""
    import datasets

    stored = table.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    out = []
    for row, item in enumerate(stored[image_column]):
        domain = domain_of_path((item or {}).get("path") or "", spec)
        if domain is None:
            raise DGZooError(
                f"{spec.repo_id} has no domain column and row {row}'s image path "
                f"'{(item or {}).get('path')}' names no domain of {', '.join(spec.domains)}; pass "
                f"--domain-column NAME or --revision {spec.revision}"
            )
        out.append(domain)
    return out


def commit_of(repo_id: str, revision: str | None, repo_type: str = "dataset", token: str | None = None) -> str:
    """The commit sha a branch, tag or sha of a Hub repo points at now (one-line DGZooErrors, as the loader's)."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    install_hub_timeouts()  # this call, and the downloads after it, end on a Hub that never answers
    try:
        sha = huggingface_hub.HfApi(token=token).repo_info(repo_id, repo_type=repo_type, revision=revision).sha
    except hf_errors.RevisionNotFoundError:
        raise DGZooError(
            f"revision '{revision}' does not exist in the Hub {repo_type} {repo_id}; pass an existing "
            f"branch, tag or commit sha with --revision"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise DGZooError(
            f"Hub {repo_type} '{repo_id}' does not exist or is private; check the id, or log in with "
            f"`hf auth login` for private repos"
        ) from None
    except (hf_errors.HfHubHTTPError, OSError, getattr(hf_errors, "HTTPError", OSError)) as e:
        raise DGZooError(
            f"cannot reach the Hub at {huggingface_hub.constants.ENDPOINT} to load {repo_id} "
            f"({type(e).__name__}); check the connection, or set HF_HUB_OFFLINE=1 to use a cached "
            f"copy"
        ) from None
    assert sha is not None  # the Hub names the commit of every revision it resolves
    return sha


__all__ = ["apply_layout", "commit_of", "domain_of_path", "domains_from_paths", "resolve_pinned"]
