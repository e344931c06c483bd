"""Where a run came from: the code that trained it and the exact data it read.

A published number is only as good as the way back to what made it. Every run records, in ``train_config.json``
(its ``provenance`` block), ``results.json`` (``code`` and ``dataset``), the model card and the published
``config.json`` (its ``dgzoo`` block):

- the code: dgzoo's version and, when dgzoo runs from a git checkout, the commit and whether the work tree had
  uncommitted changes (a version number alone does not tell two development builds apart);
- the data: a Hub dataset's resolved commit sha (never a branch, which moves), a local dataset's base name and
  content fingerprint (never its absolute path, which names nothing elsewhere).

``train_config.json`` also holds the resolved revision and every value the run derived, so
``dgzoo train --config train_config.json`` trains on the same commit with the same settings after the dataset's
``main`` has moved or a default has changed.
"""

from __future__ import annotations

import functools
import logging
import subprocess
from pathlib import Path
from typing import Any

from .._version import __version__

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=1)
def _git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout dgzoo is imported from, or (None, None) when it is not a git checkout."""
    if not (PACKAGE_ROOT / ".git").exists():
        return None, None
    try:
        commit = subprocess.run(
            ["git", "-C", str(PACKAGE_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(PACKAGE_ROOT), "status", "--porcelain", "--untracked-files=no", "--", "dgzoo"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):  # no git, or not a repository after all
        return None, None
    return (commit or None), bool(status.strip())


def code_version() -> dict[str, Any]:
    """``{"dgzoo_version", "git_commit", "git_dirty"}``: the code that trains this run (git fields None outside a
    checkout; ``git_dirty`` says whether dgzoo's own files differ from that commit)."""
    commit, dirty = _git_state()
    return {"dgzoo_version": __version__, "git_commit": commit, "git_dirty": dirty}


def data_provenance(info: dict[str, Any]) -> dict[str, Any]:
    """What names a run's data anywhere: registry/base name, source, Hub repo and commit, local fingerprint."""
    return {k: info.get(k) for k in ("name", "source", "repo_id", "revision", "fingerprint")}


def resolved_config(
    config: dict[str, Any],
    info: dict[str, Any],
    derived: dict[str, dict[str, Any]],
    hparams: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``config`` (a TrainConfig as a dict) with what the run resolved written in, so it repeats this run exactly:
    the Hub dataset's commit sha as ``revision``, the held-out domains, split seed, augmentation and image size
    that were derived, and every algorithm hyperparameter at the value used (``hparams``: flat ``key: value``
    as ``--hparams`` takes them). Settings that change no result (output folder, workers) are left as given."""
    out = dict(config)
    if info.get("source") == "hub" and info.get("revision"):
        out["revision"] = info["revision"]
    values: dict[str, Any] = {name: item.get("value") for name, item in derived.items()}
    if not out.get("source_domains") and values.get("target_domains"):
        out["target_domains"] = list(values["target_domains"])
    if "split_seed" in values:
        out["split_seed"] = values["split_seed"]
    if values.get("augment"):
        out["augment"] = values["augment"]
    if values.get("image_size"):
        out["image_size"] = values["image_size"]
    if hparams is not None:
        out["hparams"] = {**hparams, **(config.get("hparams") or {})}
    return out


def provenance_block(info: dict[str, Any], cpu_threads: int | None = None) -> dict[str, Any]:
    """The ``provenance`` block of ``train_config.json``: the code and the data (read back only to compare), and for
    a run computed on a CPU, torch's compute threads (``cpu_threads``): they fix the order in which its parallel
    sums add up, so the same code and data on the same CPU give other weights with another thread count."""
    block: dict[str, Any] = {"code": code_version(), "dataset": data_provenance(info)}
    if cpu_threads is not None:
        block["cpu_threads"] = cpu_threads
    return block


def _code_text(code: dict[str, Any]) -> str:
    commit = code.get("git_commit")
    where = f" (commit {str(commit)[:12]}{', uncommitted changes' if code.get('git_dirty') else ''})" if commit else ""
    return f"dgzoo {code.get('dgzoo_version')}{where}"


def _data_text(data: dict[str, Any]) -> str | None:
    if data.get("fingerprint"):
        return f"local data fingerprint {data['fingerprint']}"
    if data.get("revision"):
        return f"{data.get('repo_id') or data.get('name')} at commit {data['revision']}"
    return None  # a registry dataset built into dgzoo: its bytes are the code's


def repeat_differences(
    recorded: dict[str, Any] | None, info: dict[str, Any], cpu_threads: int | None = None
) -> list[str]:
    """How a run about to train on ``info`` (a dataset's ``info()``) with this code differs from the run whose
    ``train_config.json`` ``provenance`` block is ``recorded``: ``what: recorded -> now`` for the code (version,
    git commit, dirty flag), the data (local fingerprint or Hub commit) and, when both compute on a CPU, torch's
    compute threads (``cpu_threads``: this run's, None on an accelerator). Empty when nothing recorded differs."""
    if not isinstance(recorded, dict):
        return []
    out = []
    code, now = recorded.get("code"), code_version()
    if isinstance(code, dict) and any(code.get(k) != now[k] for k in now):
        out.append(f"code {_code_text(code)} -> {_code_text(now)}")
    data = recorded.get("dataset")
    before, after = (_data_text(data), _data_text(info)) if isinstance(data, dict) else (None, None)
    if before is not None and before != after:
        out.append(f"data {before} -> {after or info.get('name')}")
    threads = recorded.get("cpu_threads")
    if isinstance(threads, int) and cpu_threads is not None and threads != cpu_threads:
        out.append(f"CPU compute threads {threads} -> {cpu_threads} (set OMP_NUM_THREADS={threads} to match)")
    return out


def warn_if_not_a_repeat(
    recorded: dict[str, Any] | None, info: dict[str, Any], cpu_threads: int | None = None
) -> list[str]:
    """Log one warning line when a recipe read from a run's ``train_config.json`` (its ``provenance`` block
    ``recorded``) will train with other code, data or CPU compute threads than that run did: the repeat is then
    not bit for bit. Returns the differences (:func:`repeat_differences`)."""
    differences = repeat_differences(recorded, info, cpu_threads)
    if differences:
        logging.getLogger("dgzoo").warning(
            "warning: this run repeats a recorded run's recipe with different %s; its results may differ from the "
            "recorded run's",
            "; ".join(differences),
        )
    return differences


__all__ = [
    "code_version",
    "data_provenance",
    "provenance_block",
    "repeat_differences",
    "resolved_config",
    "warn_if_not_a_repeat",
]
