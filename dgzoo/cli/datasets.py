"""``dgzoo datasets inspect``: what a dataset holds, and what its domains look like, before training on it.

    dgzoo datasets inspect rotated-digits                 # table on stdout, rotated-digits_samples.png here
    dgzoo datasets inspect ./my_set --samples sheet.png   # a local folder, the sheet where you want it
    dgzoo datasets inspect flwrlabs/pacs --json           # the numbers as JSON

The table counts every image (labels and domains only, nothing decoded); sizes and modes come from the file
headers of a sample per domain. The contact sheet shows one row of samples per domain, the same classes in the
same columns.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from ..errors import DGZooError


def register_cli(subparsers: Any, groups: dict[str, Any]) -> None:
    """Add ``datasets inspect`` to the ``dgzoo`` parser."""
    inspect = groups["datasets"].add_parser(
        "inspect", help="domains, images per domain and class, image sizes, label balance, and a contact sheet"
    )
    inspect.add_argument("dataset", help="registry name (see `dgzoo datasets list`), Hub repo id, or local path")
    inspect.add_argument("--revision", help="branch, tag or commit sha of a Hub dataset")
    inspect.add_argument("--image-column", help="image column (default: the registry's, else 'image')")
    inspect.add_argument("--label-column", help="label column (default: the registry's, else 'label')")
    inspect.add_argument("--domain-column", help="domain column (default: the registry's, else 'domain')")
    inspect.add_argument(
        "--samples", metavar="PATH", help="where to write the contact sheet PNG (default: ./<name>_samples.png)"
    )
    inspect.add_argument("--no-samples", action="store_true", help="write no contact sheet")
    inspect.add_argument("--per-domain", type=int, default=8, help="samples per domain in the sheet (default: 8)")
    inspect.add_argument(
        "--sample-sizes",
        type=int,
        default=200,
        metavar="N",
        help="read the size and mode of up to N images per domain (default: 200)",
    )
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    inspect.set_defaults(handler=_inspect)


def default_samples_path(name: str) -> Path:
    """``./<name>_samples.png`` with the dataset's name made file-safe (a repo id's ``/`` becomes ``_``)."""
    return Path(re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name.rstrip("/")).name or name) + "_samples.png")


def _inspect(args: argparse.Namespace) -> int:
    from ..data import load_dg_dataset
    from ..data.inspect import columns_used, contact_sheet, format_summary, summarize

    if args.per_domain <= 0 or args.sample_sizes <= 0:
        raise DGZooError("--per-domain and --sample-sizes must be positive")
    samples = None if args.no_samples else Path(args.samples) if args.samples else default_samples_path(args.dataset)
    if samples is not None and samples.suffix.lower() != ".png":
        raise DGZooError(f"--samples {samples} must end in .png (the contact sheet is a PNG)")
    if samples is not None and samples.is_dir():
        raise DGZooError(f"--samples {samples} is a directory; give a file path ending in .png")
    data = load_dg_dataset(args.dataset, args.revision, args.image_column, args.label_column, args.domain_column)
    summary = summarize(
        data, columns_used(data.spec, args.image_column, args.label_column, args.domain_column), args.sample_sizes
    )
    if samples is not None:
        contact_sheet(data, samples, per_domain=args.per_domain)
    if args.json:
        print(json.dumps({**summary.as_dict(), "samples": str(samples) if samples else None}, indent=2))
    else:
        print(format_summary(summary))
        if samples is not None:
            print(
                f"contact sheet ({len(data.domains)} rows, one per domain; {args.per_domain} samples each): {samples}"
            )
    return 0
