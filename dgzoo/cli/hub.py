"""``dgzoo push``, ``dgzoo eval`` and ``dgzoo datasets convert|push``: the Hub side of the command line.

    dgzoo push RUN_DIR me/pacs-resnet50-erm-sketch [--private] [--revision BRANCH] [--commit-message MSG]
    dgzoo push SWEEP_DIR me/pacs-sweep          # every run as me/pacs-sweep-<run>, a results repo, a collection
    dgzoo eval me/pacs-resnet50-erm-sketch --dataset pacs --domains sketch photo
    dgzoo datasets convert VLCS.tar.gz --push-to-hub me/vlcs [--output-dir DIR]
    dgzoo datasets push vlcs me/vlcs              # a tarball dataset, as dgzoo converted it, to a parquet repo

Each command is a thin layer over :mod:`dgzoo.run.hub`, :mod:`dgzoo.experiments.zoo`, :mod:`dgzoo.data.convert` and
:mod:`dgzoo.data.tarball`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import DGZooError

TOKEN_HELP = (
    "Hugging Face token (default: HF_TOKEN, then the `hf auth login` token; prefer those, since a flag "
    "can end up in the shell history)"
)


def register_cli(subparsers: Any, groups: dict[str, Any]) -> None:
    """Add ``push``, ``eval`` and ``datasets convert`` to the ``dgzoo`` parser."""
    push = subparsers.add_parser("push", help="publish a finished run directory (or every run of a sweep) to the Hub")
    push.add_argument("run_dir", help="the run's --output-dir, or a sweep's output_dir (it holds sweep.json)")
    push.add_argument(
        "repo_id",
        help="Hub model repo USER_OR_ORG/NAME (created if missing); for a sweep, the prefix "
        "of its repos: runs go to NAME-<run>, the report to NAME-results",
    )
    push.add_argument(
        "--private", action="store_true", help="create the repo as private (refused if it exists and is public)"
    )
    push.add_argument("--revision", help="branch to push to, created from main if missing (default: main)")
    push.add_argument("--commit-message", help="commit message (default: algorithm, data and held-out accuracy)")
    push.add_argument("--license", help="card licence, a Hub licence id (default: the training data's licence)")
    push.add_argument("--token", help=TOKEN_HELP)
    push.set_defaults(handler=_push)

    evaluate = subparsers.add_parser("eval", help="evaluate a checkpoint (run directory or Hub repo) on any domains")
    evaluate.add_argument("model", help="run directory or Hub repo id (REPO or REPO@REVISION)")
    evaluate.add_argument("--revision", help="branch, tag or commit sha of the Hub model repo")
    evaluate.add_argument("--dataset", required=True, help="registry name, Hub dataset repo id or local path")
    evaluate.add_argument("--dataset-revision", help="branch, tag or commit sha of a Hub dataset")
    evaluate.add_argument("--domains", nargs="+", metavar="DOMAIN", help="domains to evaluate (default: all)")
    evaluate.add_argument(
        "--split",
        default="all",
        choices=("all", "in", "out"),
        help="every image of each domain, or the in (80%%) / out (20%%) part of dgzoo's seeded split (default: all)",
    )
    evaluate.add_argument("--split-seed", type=int, default=0, help="seed of the in/out split (the run's seed)")
    evaluate.add_argument("--holdout-fraction", type=float, default=0.2, help="size of the out split (default: 0.2)")
    evaluate.add_argument("--batch-size", type=int, default=128, help="evaluation batch size (default: 128)")
    evaluate.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    evaluate.add_argument("--num-workers", type=int, help="data-loading workers (default: 0 on CPU, 4 on GPU)")
    evaluate.add_argument("--output", help="also write the results as JSON to this file")
    evaluate.add_argument("--token", help=TOKEN_HELP)
    evaluate.set_defaults(handler=_eval)

    convert = groups["datasets"].add_parser(
        "convert", help="convert image folders root/<domain>/<class>/* (or a .tar.gz/.zip of them) to parquet"
    )
    convert.add_argument("source", help="folder or archive holding root/<domain>/<class>/<image>")
    convert.add_argument("--push-to-hub", metavar="REPO_ID", help="push to this Hub dataset repo")
    convert.add_argument("--output-dir", help="write data/train-*.parquet into this folder")
    convert.add_argument("--title", help="dataset title for the card (default: the registry's, else the folder name)")
    convert.add_argument("--private", action="store_true", help="create the Hub repo as private")
    convert.add_argument("--revision", help="Hub branch to push to (default: main)")
    convert.add_argument("--commit-message", help="commit message of the data commit")
    convert.add_argument("--shards", type=int, help="number of parquet shards (default: about 500 MB each)")
    convert.add_argument("--token", help=TOKEN_HELP)
    convert.set_defaults(handler=_convert)

    publish = groups["datasets"].add_parser(
        "push",
        help="publish a registry dataset that exists on the Hub only as a tarball (vlcs, terra-incognita) "
        "as parquet, as dgzoo converted it",
    )
    publish.add_argument("dataset", help="registry name of a tarball dataset (see `dgzoo datasets list`)")
    publish.add_argument("repo_id", help="Hub dataset repo USER_OR_ORG/NAME (created if missing)")
    publish.add_argument("--revision", help="commit of the source repo to convert (default: dgzoo's pinned commit)")
    publish.add_argument("--private", action="store_true", help="create the Hub repo as private")
    publish.add_argument("--token", help=TOKEN_HELP)
    publish.set_defaults(handler=_datasets_push)


def _push(args: argparse.Namespace) -> int:
    from ..run.hub import push_run

    if (Path(args.run_dir) / "sweep.json").is_file():
        from ..experiments.zoo import push_sweep

        if args.revision or args.commit_message:
            raise DGZooError("--revision and --commit-message apply to one run; push a sweep without them")
        out = push_sweep(args.run_dir, args.repo_id, private=args.private, token=args.token, license=args.license)
        print(
            f"published {len(out['models'])} runs of {args.run_dir}, the report in the dataset {out['results']}, "
            f"and the collection {out['collection_url']}"
        )
        return 0
    url = push_run(
        args.run_dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        token=args.token,
        license=args.license,
    )
    print(f"published {args.run_dir} to {args.repo_id}: {url}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..training.evaluation import evaluate_pretrained

    results = evaluate_pretrained(
        args.model,
        args.dataset,
        args.domains,
        split=args.split,
        revision=args.revision,
        dataset_revision=args.dataset_revision,
        split_seed=args.split_seed,
        holdout_fraction=args.holdout_fraction,
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.num_workers,
        token=args.token,
    )
    roles = results["roles"]
    rows = [("domain", "role", "images", "accuracy (%)")]
    rows += [(d, roles[d], str(results["images"][d]), f"{100 * a:.2f}") for d, a in results["accuracy"].items()]
    rows.append(("mean", "", str(sum(results["images"].values())), f"{100 * results['mean_accuracy']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    split = results["split"] + (f", split seed {results['split_seed']}" if results["split"] != "all" else "")
    print(f"{results['model']} on {results['dataset']['name']} ({split} split)")
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if results["split"] != "out" and "source" in roles.values():
        print("note: source domains were trained on; their accuracy on this split includes training images")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ..data.convert import (
        convert_image_folders,
        domain_counts,
        image_folder_root,
        known_spec,
        num_shards,
        push_dataset,
        write_parquet,
    )
    from ..run.hub import check_push_target

    if not args.push_to_hub and not args.output_dir:
        raise DGZooError("say where the converted dataset goes: --push-to-hub REPO_ID, --output-dir DIR, or both")
    if args.shards is not None and args.shards <= 0:
        raise DGZooError(f"--shards must be positive, got {args.shards}")
    token = (
        check_push_target(
            args.push_to_hub, args.token, args.private, args.revision, "dataset", revision_flag="--revision"
        )
        if args.push_to_hub
        else None
    )
    with image_folder_root(args.source) as root:
        table = convert_image_folders(root)
        counts = domain_counts(table)
        domains, spec = list(counts), known_spec(list(counts))
        title = args.title or (spec.title if spec else Path(args.source).name.split(".")[0])
        print(
            f"{title}: {len(table)} images, {len(table.features['label'].names)} classes, domains "
            + ", ".join(f"{d} ({n})" for d, n in counts.items())
        )
        shards = args.shards or num_shards(table)  # sizing reads every image file's size: once for both outputs
        if args.output_dir:
            files = write_parquet(table, args.output_dir, shards)
            print(f"wrote {len(files)} parquet file(s) to {Path(args.output_dir) / 'data'}")
        if args.push_to_hub:
            try:
                sha = push_dataset(
                    table,
                    args.push_to_hub,
                    title,
                    args.source,
                    private=args.private,
                    revision=args.revision,
                    commit_message=args.commit_message,
                    token=token,
                    shards=shards,
                )
            except DGZooError:
                raise
            except Exception as e:
                from ..run.hub import hub_error_reason

                raise DGZooError(
                    f"pushing the dataset to {args.push_to_hub} failed: {hub_error_reason(e, token)}; "
                    f"run the same command again"
                ) from None
            print(
                f"pushed to the Hub dataset {args.push_to_hub} at commit {sha}; train with: dgzoo train "
                f'--dataset {args.push_to_hub} --target-domains "{domains[-1]}"'
            )
    return 0


def _datasets_push(args: argparse.Namespace) -> int:
    from ..data.convert import push_dataset
    from ..data.registry import get_spec
    from ..data.tarball import converted_archive, load_archive
    from ..run.hub import check_push_target, hub_error_reason

    spec = get_spec(args.dataset)
    if spec is None or spec.kind != "tarball":
        from ..data.registry import REGISTRY

        names = ", ".join(s.name for s in REGISTRY.values() if s.kind == "tarball")
        raise DGZooError(
            f"'{args.dataset}' is not a tarball dataset of the registry ({names}); convert other image "
            f"folders with `dgzoo datasets convert`"
        )
    token = check_push_target(args.repo_id, args.token, args.private, None, "dataset")
    table, sha = load_archive(spec, args.revision, token)
    folder, _ = converted_archive(spec, sha, token)
    shards = len(list((folder / "data").glob("*.parquet")))
    source = f"{spec.repo_id}/{spec.archive}@{sha[:12]}"
    try:
        pushed = push_dataset(
            table,
            args.repo_id,
            spec.title,
            source,
            private=args.private,
            token=token,
            shards=shards,
            commit_message=f"dgzoo datasets push {spec.name}: {source}",
        )
    except DGZooError:
        raise
    except Exception as e:
        raise DGZooError(
            f"pushing {spec.name} to {args.repo_id} failed: {hub_error_reason(e, token)}; run the same command again"
        ) from None
    print(
        f"pushed {spec.title} ({len(table)} images, from {source}) to the Hub dataset {args.repo_id} at commit "
        f'{pushed}; train with: dgzoo train --dataset {args.repo_id} --target-domains "{spec.domains[-1]}"'
    )
    return 0
