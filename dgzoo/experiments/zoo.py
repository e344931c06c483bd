"""The model zoo on the Hub: find published dgzoo checkpoints, rank them, fetch the best; publish a whole sweep.

Every dgzoo model card carries a ``dgzoo`` block in its front matter (dataset, held-out domains, algorithm,
backbone, seeds, and the sweep a run belongs to; :func:`dgzoo.run.cards.zoo_metadata`). :func:`list_models`
finds the cards through ``HfApi.list_models`` (tags ``dgzoo`` and ``timm``, with card data) and filters on that
block. :func:`leaderboard` downloads each listed repo's ``results.json``, ``records.jsonl`` and
``train_config.json`` at the listed commit, lays them out as the run directories (and sweep manifests) they
came from, and builds the tables with :mod:`dgzoo.experiments.report`: the numbers are those ``dgzoo report``
gives for the same runs, mean ± standard error over trial seeds, whatever the cards' rounded headline says.
:func:`best` is the repo to load: the best checkpoint of the leaderboard's top row.

:func:`push_sweep` (``dgzoo push SWEEP_DIR PREFIX``) publishes every finished run of a sweep as ``PREFIX-<run>``,
the report's tables and plots in the dataset repo ``PREFIX-results``, and a Hub collection holding them all.
Every run is checked to load before anything is created on the Hub.
"""

from __future__ import annotations

import json
import shlex
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DGZooError
from ..run.cards import card_license, slug
from ..run.hub import (
    check_finished_run,
    check_push_target,
    check_repo_id,
    check_run_loads,
    hub_error_reason,
    resolve_token,
    retry_advice,
    upload_run,
    without_local_paths,
)
from ..run.identity import content_key
from ..run.results import RunResults
from ..run.rundir import read_json, run_done
from .report import SELECTION_METHODS, Report, report_dirs

ZOO_TAGS = ("dgzoo", "timm")
MIRRORED = ("results.json", "records.jsonl", "train_config.json")  # what the report reads of a run
SINGLE = "_runs"  # mirror folder of runs published outside a sweep


@dataclass(frozen=True)
class ZooModel:
    """A published dgzoo checkpoint, as its card describes it."""

    repo_id: str
    sha: str | None
    dataset: str
    held_out: tuple[str, ...]
    algorithm: str
    backbone: str
    accuracy: float  # held-out accuracy (%) at the step the run's own selection chose
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _matches(
    meta: dict[str, Any],
    dataset: str | None,
    held_out: Sequence[str] | None,
    algorithm: str | None,
    backbone: str | None,
) -> bool:
    if dataset and dataset.lower() not in (
        str(meta.get("dataset", "")).lower(),
        str(meta.get("dataset_repo") or "").lower(),
    ):
        return False
    if held_out and {d.lower() for d in held_out} != {str(d).lower() for d in meta.get("held_out", [])}:
        return False
    if algorithm and algorithm.lower() != str(meta.get("algorithm", "")).lower():
        return False
    return not backbone or backbone == meta.get("backbone")


def list_models(
    dataset: str | None = None,
    held_out: Sequence[str] | str | None = None,
    algorithm: str | None = None,
    backbone: str | None = None,
    author: str | None = None,
    token: str | None = None,
) -> list[ZooModel]:
    """Published dgzoo checkpoints on the Hub, filtered by dataset (registry name or repo id), held-out domains,
    algorithm (e.g. ``erm`` or ``erm+gga``), backbone (timm name) and author (user or org)."""
    import huggingface_hub

    held_out = [held_out] if isinstance(held_out, str) else held_out
    token = resolve_token(token)
    try:
        infos = list(
            huggingface_hub.HfApi(token=token).list_models(
                filter=list(ZOO_TAGS), author=author, cardData=True, full=True
            )
        )
    except Exception as e:
        raise DGZooError(f"could not list dgzoo models on the Hub: {hub_error_reason(e, token)}") from None
    found = []
    for info in infos:
        card = info.card_data.to_dict() if info.card_data is not None else {}
        meta = card.get("dgzoo")
        if not isinstance(meta, dict) or not _matches(meta, dataset, held_out, algorithm, backbone):
            continue
        found.append(
            ZooModel(
                repo_id=info.id,
                sha=info.sha,
                dataset=str(meta.get("dataset")),
                held_out=tuple(meta.get("held_out", [])),
                algorithm=str(meta.get("algorithm")),
                backbone=str(meta.get("backbone")),
                accuracy=float(meta.get("held_out_accuracy", 0)),
                meta=meta,
            )
        )
    return found


@dataclass
class Leaderboard:
    """The report of the listed models, and which repo each mirrored run directory came from."""

    report: Report
    repo_of: dict[Path, str]
    models: list[ZooModel]

    def repo_for(self, path: Path) -> str:
        return self.repo_of[Path(path).resolve()]


def leaderboard(
    models: Sequence[ZooModel],
    methods: Sequence[str] = SELECTION_METHODS,
    token: str | None = None,
    workdir: str | Path | None = None,
) -> Leaderboard:
    """The ``dgzoo report`` tables of ``models``, computed from their published results and evaluation records.

    ``workdir`` keeps the mirrored run directories (default: a temporary folder, removed afterwards).
    """
    if not models:
        raise DGZooError("no published dgzoo model matches; widen the filters, or check `dgzoo zoo list`")
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="dgzoo-zoo-") as tmp:
            board = leaderboard(models, methods, token, tmp)
            board.report.notes = [n for n in board.report.notes if tmp not in n]
            return board
    root = Path(workdir)
    repo_of = _mirror(models, root, resolve_token(token))
    return Leaderboard(report_dirs([root], methods), repo_of, list(models))


def _mirror(models: Sequence[ZooModel], root: Path, token: str | None) -> dict[Path, str]:
    """Download what the report reads of each model into ``root/sweep-<sweep>-<content>/<run>/`` (with that
    sweep's manifest entries), or ``root/_runs/<repo>/`` for runs published outside a sweep.

    ``<content>`` is the runs' data and code (:func:`dgzoo.run.identity.content_key`): two published sweeps of
    one spec that trained other data or code are two sweeps, as their run directories are to ``dgzoo report``;
    the same runs published twice land in one folder and count once, as the report counts them."""
    manifests: dict[str, dict[str, dict[str, Any]]] = {}
    repo_of = {}
    for model in models:
        files = {name: _download(model, name, token) for name in MIRRORED}
        sweep = model.meta.get("sweep")
        assert files["results.json"] is not None  # only a missing train_config.json gives None (_download)
        if sweep:
            folder = f"sweep-{sweep}-{content_key(RunResults.from_json(json.loads(files['results.json'])).to_json())}"
            run_dir = root / folder / str(model.meta["run"])
            manifests.setdefault(folder, {})[run_dir.name] = {
                "run_dir": run_dir.name,
                "trial_seed": model.meta["trial_seed"],
                "hparams_seed": model.meta["hparams_seed"],
            }
        else:
            run_dir = root / SINGLE / model.repo_id.replace("/", "--")
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            if data is not None:
                (run_dir / name).write_bytes(data)
        repo_of[run_dir.resolve()] = model.repo_id
    for folder, runs in manifests.items():
        (root / folder / "sweep.json").write_text(json.dumps({"runs": list(runs.values())}, indent=2) + "\n")
    return repo_of


def _download(model: ZooModel, name: str, token: str | None) -> bytes | None:
    """The bytes of ``name`` in ``model``'s repo at its listed commit (None: a missing train_config.json)."""
    import huggingface_hub

    try:
        path = huggingface_hub.hf_hub_download(model.repo_id, name, revision=model.sha, token=token)
    except huggingface_hub.errors.EntryNotFoundError:
        if name == "train_config.json":
            return None
        raise DGZooError(
            f"{model.repo_id} has no {name}, so it cannot be ranked; publish it again with `dgzoo push`"
        ) from None
    except Exception as e:
        raise DGZooError(f"could not download {name} of {model.repo_id}: {hub_error_reason(e, token)}") from None
    return Path(path).read_bytes()


def best(board: Leaderboard, method: str = "training_domain_validation") -> str:
    """The repo to load for the leaderboard's single (dataset, held-out domains) cell: among the rows, the one with
    the highest mean over trial seeds; within it, the trial whose selected checkpoint scores highest."""
    picks = board.report.picks.get(method)
    if not picks:
        raise DGZooError(f"no run could be selected by {method}; try --selection oracle")
    cells = sorted({(dataset, targets) for dataset, _, targets, _ in picks})
    if len(cells) > 1:
        listed = "; ".join(f"{d} held-out {'+'.join(t)}" for d, t in cells)
        raise DGZooError(
            f"the models span several datasets or held-out domains ({listed}); name one with --dataset and --held-out"
        )
    rows: dict[str, list[Any]] = {}
    for (_, row, _, _), pick in picks.items():
        rows.setdefault(row, []).append(pick)
    top = max(rows, key=lambda row: sum(p.test for p in rows[row]) / len(rows[row]))
    return board.repo_for(max(rows[top], key=lambda p: p.test).run.path)


# ---------------------------------------------------------------------- publishing a sweep


def sweep_repo_ids(sweep_dir: Path, prefix: str) -> dict[Path, str]:
    """``PREFIX-<run name>`` for every finished run of the sweep, checked as Hub repo ids."""
    check_repo_id(prefix, "repo id prefix")
    manifest = read_json(sweep_dir / "sweep.json")
    ids = {}
    for entry in manifest.get("runs", []):
        run_dir = sweep_dir / entry["run_dir"]
        if run_done(run_dir):  # the sweep's "done": a run cut short while finalising is not published
            ids[run_dir] = check_repo_id(f"{prefix}-{slug(entry['run_dir'])}")
    if not ids:
        raise DGZooError(f"{sweep_dir} holds no finished run; run the sweep first (dgzoo sweep SPEC)")
    if any(len(r.split("/")[1]) > 96 for r in ids.values()):
        raise DGZooError(
            f"'{prefix}' is too long: repo names like {next(iter(ids.values()))} exceed the Hub's 96 "
            f"characters; choose a shorter prefix"
        )
    return ids


def push_sweep(
    sweep_dir: str | Path,
    prefix: str,
    private: bool = False,
    token: str | None = None,
    license: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Publish every finished run of a sweep, its report in ``PREFIX-results`` and a collection holding them.

    Nothing is created on the Hub unless every run loads (:func:`dgzoo.run.hub.check_run_loads`) and the report
    builds. Repos and the collection are reused when they exist, so a failed push is retried by the same command.
    Returns the collection's slug and URL, the results repo and each run's repo id and commit URL.
    """
    import huggingface_hub

    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "sweep.json").is_file():
        raise DGZooError(
            f"{sweep_dir} has no sweep.json, so it is not a sweep; push one run with `dgzoo push RUN_DIR REPO_ID`"
        )
    ids = sweep_repo_ids(sweep_dir, prefix)
    unfinished = len(read_json(sweep_dir / "sweep.json").get("runs", [])) - len(ids)
    if unfinished:
        log(
            f"{unfinished} run(s) of {sweep_dir} are not finished and are not published; rerun the sweep, then push "
            f"again to add them"
        )
    for run_dir in ids:
        check_finished_run(run_dir)
        check_run_loads(run_dir)
    report = report_dirs([sweep_dir])
    retry = " ".join(
        [
            "dgzoo",
            "push",
            shlex.quote(str(sweep_dir.resolve())),
            shlex.quote(prefix),
            *(["--private"] if private else []),
            *(["--license", shlex.quote(license)] if license else []),
        ]
    )
    namespace, results_repo = prefix.split("/")[0], check_repo_id(f"{prefix}-results")
    token = resolve_token(token)
    try:
        token = check_push_target(results_repo, token, private, None, "dataset")
        api = huggingface_hub.HfApi(token=token)
        models = {}
        for run_dir, repo_id in ids.items():
            models[repo_id] = upload_run(run_dir, repo_id, private, None, None, token, license)
            log(f"published {run_dir.name} to {repo_id}")
        _upload_results(api, sweep_dir, report, ids, results_repo, private, license)
        collection = api.create_collection(
            title=f"dgzoo sweep: {prefix.split('/')[1]}"[:59],
            namespace=namespace,
            private=private,
            exists_ok=True,
            description=f"{len(ids)} runs of a dgzoo sweep; the tables are in {results_repo}"[:150],
        )
        api.add_collection_item(
            collection.slug,
            results_repo,
            "dataset",
            exists_ok=True,
            note="dgzoo report: held-out accuracy, mean ± standard error over trial seeds",
        )
        for run_dir, repo_id in ids.items():
            results = RunResults.load(run_dir / "results.json").require("backbone", "target_domains")
            accuracy = results.require("target_accuracy").target_accuracy
            assert accuracy is not None, "a finished run records its held-out accuracy"
            note = (
                f"{results.algorithm} {results.backbone}, held-out {', '.join(results.target_domains)}: "
                f"{100 * accuracy:.1f}% ({run_dir.name})"
            )
            api.add_collection_item(collection.slug, repo_id, "model", note=note[:500], exists_ok=True)
    except Exception as e:
        raise DGZooError(
            f"push of the sweep {sweep_dir} failed: {hub_error_reason(e, token)}. The run directories "
            f"are intact{retry_advice(e, retry)}"
        ) from None
    return {"collection": collection.slug, "collection_url": collection.url, "results": results_repo, "models": models}


def _upload_results(
    api: Any, sweep_dir: Path, report: Report, ids: dict[Path, str], repo_id: str, private: bool, license: str | None
) -> None:
    """The results dataset repo: the report in every format, the plots, and the sweep's manifest (no local paths)."""
    import huggingface_hub

    # Local paths become what names them elsewhere: a run its repo, the sweep its folder name, a local dataset its
    # base name (the run's results.json records it so); whatever else the texts hold.
    local = {str(p.resolve()): r for p, r in ids.items()}
    local[str(sweep_dir.resolve())] = sweep_dir.resolve().name
    for run_dir in ids:
        dataset = RunResults.load(run_dir / "results.json").dataset
        path = dataset.path if dataset is not None else None
        if path:
            local[str(path)] = Path(path).name
    manifest = read_json(sweep_dir / "sweep.json")
    spec = without_local_paths(
        {**manifest.get("spec", {}), "output_dir": Path(str(manifest.get("spec", {}).get("output_dir", ""))).name}
    )
    runs = [
        without_local_paths({k: v for k, v in entry.items() if k != "command"})
        | {"repo_id": ids.get(sweep_dir / entry["run_dir"])}
        for entry in manifest.get("runs", [])
    ]
    import yaml

    first = RunResults.load(next(iter(ids)) / "results.json").to_json()
    # `configs` tells `datasets.load_dataset(repo)` which files are its tables (the repo also holds Markdown, LaTeX,
    # JSON and plots, which it could not read as one table): the report, and the run each cell selected.
    configs = [
        {"config_name": "default", "data_files": [{"split": "train", "path": "report.csv"}]},
        {"config_name": "selected_runs", "data_files": [{"split": "train", "path": "selected_runs.csv"}]},
    ]
    front = yaml.safe_dump(
        {
            **card_license(first, license),
            "pretty_name": repo_id.split("/")[1],
            "tags": ["dgzoo", "domain-generalization", "leaderboard"],
            "configs": configs,
        },
        sort_keys=False,
    ).strip()
    readme = (
        f"---\n{front}\n---\n\n# {repo_id.split('/')[1]}\n\nThe `dgzoo report` of a sweep of {len(ids)} runs, "
        f"each published as its own model repo ({', '.join(f'`{r}`' for r in ids.values())}).\n\n" + report.markdown()
    )
    files = {
        "README.md": readme,
        "report.md": report.markdown(),
        "report.csv": report.csv(),
        "report.tex": report.latex(),
        "selected_runs.csv": report.selected_runs_csv(),
        "sweep.json": json.dumps({"spec": spec, "runs": runs}, indent=2, default=str) + "\n",
    }
    for name, text in files.items():
        for path, public in sorted(local.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(path, public)
        files[name] = text
    operations = [
        huggingface_hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=text.encode())
        for name, text in files.items()
    ]
    with tempfile.TemporaryDirectory(prefix="dgzoo-plots-") as tmp:
        for plot in report.plot(tmp):
            operations.append(
                huggingface_hub.CommitOperationAdd(path_in_repo=plot.name, path_or_fileobj=plot.read_bytes())
            )
        api.create_repo(repo_id, repo_type="dataset", private=private or None, exist_ok=True)
        api.create_commit(
            repo_id, repo_type="dataset", operations=operations, commit_message=f"dgzoo: report of {len(ids)} runs"
        )
