"""Read DomainBed sweep output directories, so ``dgzoo report`` puts DomainBed runs and dgzoo runs in one table.

DomainBed's ``train.py`` writes one directory per run holding ``results.jsonl`` (one JSON record per evaluation:
``step``, ``env{i}_in_acc`` / ``env{i}_out_acc`` for every environment ``i``, ``hparams``, and ``args`` with
``dataset``, ``algorithm``, ``test_envs``, ``hparams_seed``, ``trial_seed``, ``seed``, ...) and, once finished, an
empty-ish ``done`` file. This module turns such a directory into the pieces the report needs: domain names (the
dgzoo registry's when the dataset is one dgzoo knows, DomainBed's environment names otherwise), source and held-out
domains, the trial seed and hparam sample (from ``args``, as DomainBed's ``reporting.get_grouped_records``), and the
evaluation records in dgzoo's form ``{"step", "acc": {domain: {"in", "out"}}}``, so the same three selection
methods apply unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import get_spec

RESULTS = "results.jsonl"
DONE = "done"

# DomainBed's ``ENVIRONMENTS`` of each dataset class (``domainbed/datasets.py``): names for its environment indices.
ENVIRONMENTS: dict[str, tuple[str, ...]] = {
    "ColoredMNIST": ("+90%", "+80%", "-90%"),
    "RotatedMNIST": ("0", "15", "30", "45", "60", "75"),
    "VLCS": ("C", "L", "S", "V"),
    "PACS": ("A", "C", "P", "S"),
    "OfficeHome": ("A", "C", "P", "R"),
    "TerraIncognita": ("L100", "L38", "L43", "L46"),
    "DomainNet": ("clip", "info", "paint", "quick", "real", "sketch"),
    "SVIRO": ("aclass", "escape", "hilux", "i3", "lexus", "tesla", "tiguan", "tucson", "x5", "zoe"),
}
# DomainBed datasets that are the same images as a dgzoo registry entry (its MNIST ones are not: dgzoo's embedded
# digits are scikit-learn's 8x8 digits, a different dataset, so they keep DomainBed's name).
SAME_DATASET = {
    "VLCS": "vlcs",
    "PACS": "pacs",
    "OfficeHome": "office-home",
    "TerraIncognita": "terra-incognita",
    "DomainNet": "domainnet",
}


@dataclass(frozen=True)
class DomainBedRun:
    """A finished DomainBed run directory, in the report's terms."""

    path: Path
    dataset: str
    dataset_title: str
    algorithm: str
    backbone: str
    domains: tuple[str, ...]
    targets: tuple[str, ...]
    trial_seed: int
    hparams_seed: int
    hparams: dict[str, Any]
    fingerprint: str  # what makes two runs the same run: every argument but where it was written, and the hparams
    records: tuple[dict[str, Any], ...]

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(d for d in self.domains if d not in self.targets)


def is_domainbed_run(path: Path) -> bool:
    """Whether ``path`` is a DomainBed run directory (finished or not)."""
    return (path / RESULTS).is_file()


def is_finished(path: Path) -> bool:
    return (path / DONE).exists()


def domain_names(dataset: str, n_envs: int) -> tuple[str, tuple[str, ...]]:
    """(dataset name in the report, names of environments ``0 .. n_envs-1``) for a DomainBed dataset class."""
    names = ENVIRONMENTS.get(dataset)
    spec = get_spec(SAME_DATASET[dataset]) if dataset in SAME_DATASET else None
    if spec is not None and len(spec.domains) == n_envs:
        letters = names or spec.domains
        return spec.name, tuple(spec.canonical_domain(n) or n for n in letters)
    if names is not None and len(names) == n_envs:
        return dataset, names
    return dataset, tuple(f"env{i}" for i in range(n_envs))


def load_domainbed_run(path: Path) -> DomainBedRun:
    """Read a finished DomainBed run directory. Raises ValueError/KeyError on a malformed one (the report names it
    and skips it)."""
    lines = [line for line in (path / RESULTS).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{RESULTS} is empty")
    raw = [json.loads(line) for line in lines]
    args = raw[0]["args"]
    n_envs = 0
    while f"env{n_envs}_out_acc" in raw[0]:  # DomainBed's own count (model_selection.py)
        n_envs += 1
    if n_envs == 0:
        raise ValueError(f"{RESULTS} has no env0_out_acc")
    dataset, domains = domain_names(str(args["dataset"]), n_envs)
    test_envs = [int(e) for e in args["test_envs"]]
    if any(not 0 <= e < n_envs for e in test_envs):
        raise ValueError(f"test_envs {test_envs} outside the {n_envs} environments")
    records = tuple(
        {
            "step": int(r["step"]),
            "acc": {
                d: {"in": float(r[f"env{i}_in_acc"]), "out": float(r[f"env{i}_out_acc"])} for i, d in enumerate(domains)
            },
        }
        for r in raw
    )
    hparams = dict(raw[0].get("hparams") or {})
    spec = get_spec(dataset)
    identity = {k: v for k, v in args.items() if k not in ("output_dir", "data_dir")}
    return DomainBedRun(
        path=path,
        dataset=dataset,
        dataset_title=spec.title if spec else dataset,
        algorithm=str(args["algorithm"]),
        backbone=_backbone(str(args["dataset"]), hparams),
        domains=domains,
        targets=tuple(domains[e] for e in sorted(set(test_envs))),
        trial_seed=int(args["trial_seed"]),
        hparams_seed=int(args["hparams_seed"]),
        hparams=hparams,
        fingerprint=json.dumps({"domainbed": identity, "hparams": hparams}, sort_keys=True, default=str),
        records=tuple(sorted(records, key=lambda r: r["step"])),
    )


def _backbone(dataset: str, hparams: dict[str, Any]) -> str:
    """DomainBed's network: its MNIST CNN for the MNIST datasets, else torchvision's ResNet-50 (ResNet-18 with
    ``hparams['resnet18']``). Named so it never merges with a timm backbone of the same family in one row."""
    if dataset.endswith("MNIST"):
        return "DomainBed MNIST_CNN"
    return "DomainBed ResNet-18" if hparams.get("resnet18") else "DomainBed ResNet-50"
