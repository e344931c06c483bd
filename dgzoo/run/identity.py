"""When two runs are the same run: the one rule ``dgzoo report`` and the zoo leaderboard share.

Two runs are the same run when, and only when, they trained the same resolved recipe (algorithm, backbone and
initialisation, steps, protocol and domains, every training and algorithm hyperparameter at the value used), with
the same seeds, on the same data (a Hub dataset's commit, a local dataset's content fingerprint) with the same code
(dgzoo's version and git commit). Where they ran, what they were called, which sweep spec listed them and when
they finished do not count. Counting a copy or an identical rerun twice would shrink the standard error for
nothing; merging two runs that differ in code or data would average things that are not one trial.

:func:`run_identity` is that rule, applied to a run's ``results.json`` (a :class:`~dgzoo.run.results.RunResults`,
or the parsed JSON, read through it); :func:`identity_key` its comparable form.
:func:`content_key` is the part every run of one sweep shares (the data and the code): the leaderboard keeps the
published runs of two sweeps of one spec apart when it differs, as the report keeps their run directories apart.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from .results import RunResults

# results.json fields of the resolved recipe and seeds (``hparams`` holds every training and algorithm value used)
RECIPE_FIELDS = (
    "algorithm",
    "backbone",
    "pretrained",
    "steps",
    "protocol",
    "source_domains",
    "target_domains",
    "hparams",
)
SEED_FIELDS = ("seed", "split_seed")
DATA_FIELDS = ("name", "repo_id", "revision")  # a registry or Hub dataset; a local one is its fingerprint alone


Results = RunResults | Mapping[str, Any]
"""A run's results: typed, or its results.json parsed (read with :meth:`RunResults.from_json`)."""


def run_identity(results: Results) -> dict[str, Any]:
    """What makes a run the run it is: ``{"recipe", "seeds", "data", "code"}`` from its ``results.json``.

    A local dataset counts by its content fingerprint (not its name or where it lies), a Hub dataset by repo and
    commit (and registry name: one repo may hold several). A run written before dgzoo recorded its git commit is
    identified by its dgzoo version alone.
    """
    res = RunResults.of(results)

    def held(name: str) -> Any:  # a field the file lacked counts as null, not as the schema's default
        return getattr(res, name) if res.has(name) else None

    dataset = res.dataset
    code = res.code or {"dgzoo_version": res.dgzoo_version}
    identity: dict[str, Any] = {
        "recipe": {k: held(k) for k in RECIPE_FIELDS},
        "seeds": {k: held(k) for k in SEED_FIELDS},
        "data": (
            {"fingerprint": dataset.fingerprint}
            if dataset is not None and dataset.fingerprint
            else {k: getattr(dataset, k, None) for k in DATA_FIELDS}
        ),
        "code": {k: code.get(k) for k in ("dgzoo_version", "git_commit", "git_dirty")},
    }
    soup = res.soup
    if isinstance(soup, dict):  # a weight average (dgzoo soup) is its recipe and the runs it averaged
        identity["recipe"]["soup"] = [
            soup.get("method"),
            soup.get("k"),
            sorted(_ingredient_key(i) for i in soup.get("ingredients") or []),
        ]
    return identity


def _ingredient_key(ingredient: dict[str, Any]) -> str:
    """An ingredient of a soup by its own identity (the same run wherever it lies); by its name in a soup written
    before dgzoo recorded ingredient identities."""
    if isinstance(ingredient.get("identity"), dict):
        return json.dumps(ingredient["identity"], sort_keys=True, default=str)
    return str(ingredient.get("name"))


def identity_key(results: Results) -> str:
    """:func:`run_identity` as one string: equal for two runs exactly when they are the same run."""
    return json.dumps(run_identity(results), sort_keys=True, default=str)


def same_run(a: Results, b: Results) -> bool:
    """Whether the runs with ``results.json`` contents ``a`` and ``b`` are the same run."""
    return identity_key(a) == identity_key(b)


def content_key(results: Results) -> str:
    """A short hash of the data and code of a run (:func:`run_identity`): equal for every run of one sweep."""
    identity = run_identity(results)
    text = json.dumps({"data": identity["data"], "code": identity["code"]}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


__all__ = ["content_key", "identity_key", "run_identity", "same_run"]
