"""What to forget, and the data every unlearning method and every evaluation works on.

A forget set is written as one or more clauses (``--forget``):

    class=3               every training image of class 3 (full-class unlearning; several: class=3,5)
    class=3:0.1           a seeded 10% of class 3's training images (partial-class unlearning)
    domain=15             every training image of source domain 15 (several: domain=15,30)
    class=3 domain=15     class 3's training images in domain 15 (clauses intersect)
    indices=4,17,100-199  these rows of the dataset table (random unlearning)
    indices-file=PATH     the same, one or more indices per line

The data of the source run is rebuilt exactly from its recipe (dataset revision, protocol, split seed, holdout
fraction), then divided into:

- ``forget``: the training rows the spec selects, and ``retain``: every other training row;
- the source domains' validation rows, which the source run never trained on, split once more (per domain,
  seeded) into ``validation``, the unseen data an unlearning method may use (SURE's second domain), and
  ``test``, which no method ever touches: test accuracy and the non-members of the membership attacks;
- ``held_out``: the target domains' rows, the domain-generalization accuracy.

"Matched" subsets keep only the rows of the forget set's distribution (its classes and domains): the matched
test rows are what the attacks compare the forget set with, the matched validation rows are SURE's default
second domain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import DGDataset, DomainSplits, seed_hash
from ..errors import DGZooError, suggest

CLAUSES = ("class", "domain", "indices", "indices-file")
SYNTAX = "class=C, class=C:FRACTION, domain=D, indices=I,J,K-L or indices-file=PATH"


@dataclass(frozen=True)
class ForgetSpec:
    """A parsed ``--forget`` value. Class and domain names are resolved against the dataset later."""

    text: str
    classes: tuple[str, ...] = ()
    fraction: float | None = None
    domains: tuple[str, ...] = ()
    indices: tuple[int, ...] = ()

    @property
    def scenario(self) -> str:
        """``full-class``, ``partial-class``, ``domain``, ``class-in-domain`` or ``random`` (explicit indices)."""
        if self.indices:
            return "random"
        if self.classes:
            if self.fraction is not None:
                return "partial-class"
            return "class-in-domain" if self.domains else "full-class"
        return "domain"


def parse_forget_spec(text: str) -> ForgetSpec:
    """Parse ``--forget`` clauses (see the module docstring); raise a one-line DGZooError on bad syntax."""
    clauses = text.replace(";", " ").split()
    if not clauses:
        raise DGZooError(f"--forget is empty; give one of {SYNTAX}")
    values: dict[str, str] = {}
    for clause in clauses:
        key, sep, value = clause.partition("=")
        key = key.strip().lower().replace("_", "-")
        if not sep or not value.strip():
            raise DGZooError(f"--forget clause '{clause}' is not KEY=VALUE; write {SYNTAX}")
        if key not in CLAUSES:
            raise DGZooError(f"--forget clause '{clause}': unknown key '{key}'{suggest(key, CLAUSES)}; write {SYNTAX}")
        if key in values:
            raise DGZooError(f"--forget gives '{key}=' twice; list several values in one clause, e.g. {key}=a,b")
        values[key] = value.strip()
    if ("indices" in values or "indices-file" in values) and len(values) > 1:
        raise DGZooError(
            "--forget indices= / indices-file= cannot be combined with other clauses; the indices "
            "already name the exact rows to forget"
        )
    if "indices" in values:
        return ForgetSpec(text, indices=_parse_indices(values["indices"], "indices="))
    if "indices-file" in values:
        return ForgetSpec(text, indices=_read_indices_file(values["indices-file"]))
    classes: tuple[str, ...] = ()
    fraction: float | None = None
    if "class" in values:
        names, _, raw_fraction = values["class"].partition(":")
        classes = _split_names(names, "class")
        if raw_fraction:
            try:
                fraction = float(raw_fraction)
            except ValueError:
                fraction = float("nan")
            if not 0.0 < fraction <= 1.0:
                raise DGZooError(
                    f"--forget class={values['class']}: the fraction '{raw_fraction}' must be a number "
                    f"in (0, 1], e.g. class={names}:0.1 forgets 10% of the class"
                )
            if fraction == 1.0:
                fraction = None
    domains = _split_names(values["domain"], "domain") if "domain" in values else ()
    return ForgetSpec(text, classes=classes, fraction=fraction, domains=domains)


def _split_names(raw: str, key: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    if not names:
        raise DGZooError(f"--forget {key}= names nothing; write e.g. {key}=3")
    if len(set(names)) != len(names):
        raise DGZooError(f"--forget {key}={raw} lists a name twice; list each once")
    return names


def _parse_indices(raw: str, where: str) -> tuple[int, ...]:
    found: list[int] = []
    for token in re.split(r"[,\s]+", raw.strip()):
        if not token:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", token)
        if not match:
            raise DGZooError(
                f"--forget {where}: '{token}' is not a row index or a range such as 100-199 "
                f"(indices are non-negative integers)"
            )
        start, stop = int(match.group(1)), int(match.group(2) or match.group(1))
        if stop < start:
            raise DGZooError(f"--forget {where}: the range '{token}' ends before it starts; write LOW-HIGH")
        found.extend(range(start, stop + 1))
    if not found:
        raise DGZooError(f"--forget {where} names no row; give at least one index")
    return tuple(sorted(set(found)))


def _read_indices_file(path: str) -> tuple[int, ...]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise DGZooError(f"--forget indices-file={path}: no such file; give a text file of row indices")
    return _parse_indices(file.read_text(), f"indices-file={path}")


@dataclass
class UnlearningData:
    """Dataset rows (indices into ``data.table``) of every set an unlearning run uses."""

    spec: ForgetSpec
    forget: np.ndarray
    retain: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    matched_validation: np.ndarray
    matched_test: np.ndarray
    retained_validation: np.ndarray  # validation rows outside the forgotten classes (what the model keeps)
    held_out: dict[str, np.ndarray]
    classes: tuple[int, ...]  # class indices named by the spec (empty for domain/indices specs)
    domains: tuple[str, ...]  # source domains named by the spec (empty when not restricted)
    description: str

    def sizes(self) -> dict[str, int]:
        sets = ("forget", "retain", "validation", "test", "matched_validation", "matched_test", "retained_validation")
        return {name: int(len(getattr(self, name))) for name in sets} | {
            "held_out": int(sum(len(r) for r in self.held_out.values()))
        }


def split_for_unlearning(
    spec: ForgetSpec,
    data: DGDataset,
    splits: DomainSplits,
    sources: list[str],
    targets: list[str],
    validation_fraction: float,
    split_seed: int,
    seed: int,
    already_forgotten: np.ndarray | None = None,
) -> UnlearningData:
    """Resolve ``spec`` against the source run's data and build every set (see the module docstring).

    ``split_seed`` is the source run's; it also seeds the validation/test split of the unseen rows, so every
    unlearning run of one source (and its retrained reference) sees the same sets. ``seed`` picks the rows of a
    fractional forget set. ``already_forgotten`` rows (when the source is itself an unlearned run) are no longer
    training data: they are neither forgotten again nor retained.
    """
    train = np.sort(np.concatenate([splits.in_rows[d] for d in sources]))
    if already_forgotten is not None and len(already_forgotten):
        train = np.setdiff1d(train, already_forgotten)
    validation, test = [], []
    for d in sources:
        rows = splits.out_rows[d]
        order = np.random.RandomState(seed_hash(split_seed, d, "unlearning")).permutation(len(rows))
        n_val = int(round(len(rows) * validation_fraction))
        validation.append(rows[order[:n_val]])
        test.append(rows[order[n_val:]])
    validation_rows, test_rows = np.sort(np.concatenate(validation)), np.sort(np.concatenate(test))
    classes = tuple(_class_index(data, c) for c in spec.classes)
    domains = tuple(_source_domain(data, d, sources, targets) for d in spec.domains)

    def matched(rows: np.ndarray) -> np.ndarray:
        keep = np.ones(len(rows), dtype=bool)
        if classes:
            keep &= np.isin(data.labels[rows], classes)
        if domains:
            keep &= np.isin(data.domain_of_row[rows], [data.domains.index(d) for d in domains])
        return rows[keep]

    if spec.indices:
        forget = _training_indices(spec, data, train)
        description = f"{len(forget)} training image(s) given by row index"
    else:
        candidates = matched(train)
        if spec.fraction is not None:
            forget = _sample_fraction(candidates, data.labels, classes, spec.fraction, seed_hash(seed, spec.text))
        else:
            forget = candidates
        description = _describe(data, classes, domains, spec.fraction, len(forget), len(candidates))
    if len(forget) == 0:
        raise DGZooError(
            f"--forget {spec.text} selects no training image (the source run trained on "
            f"{', '.join(sources)}); check the class and domain names"
        )
    retain = np.setdiff1d(train, forget)
    if len(retain) == 0:
        raise DGZooError(
            f"--forget {spec.text} selects every training image, leaving nothing to retain; forget a smaller set"
        )
    return UnlearningData(
        spec=spec,
        forget=forget,
        retain=retain,
        validation=validation_rows,
        test=test_rows,
        matched_validation=matched(validation_rows),
        matched_test=matched(test_rows),
        retained_validation=validation_rows[~np.isin(data.labels[validation_rows], classes)],
        held_out={d: splits.in_rows[d] for d in targets},
        classes=classes,
        domains=domains,
        description=description,
    )


def _class_index(data: DGDataset, name: str) -> int:
    if name in data.class_names:
        return data.class_names.index(name)
    lowered = {c.lower(): i for i, c in enumerate(data.class_names)}
    if name.lower() in lowered:
        return lowered[name.lower()]
    if name.isdigit() and int(name) < data.num_classes:
        return int(name)
    shown = ", ".join(data.class_names[:12]) + (", ..." if data.num_classes > 12 else "")
    raise DGZooError(
        f"--forget: unknown class '{name}'{suggest(name, data.class_names)}; classes of "
        f"{data.name}: {shown} (or an index 0-{data.num_classes - 1})"
    )


def _source_domain(data: DGDataset, name: str, sources: list[str], targets: list[str]) -> str:
    found = data.canonical_domain(name)
    if found is None:
        raise DGZooError(
            f"--forget: unknown domain '{name}'{suggest(name, data.domains)}; the source run "
            f"trained on: {', '.join(sources)}"
        )
    if found not in sources:
        raise DGZooError(
            f"--forget: domain '{found}' was {'held out' if found in targets else 'not used'} in the "
            f"source run, so there is nothing of it to forget; choose one of: {', '.join(sources)}"
        )
    return found


def _training_indices(spec: ForgetSpec, data: DGDataset, train: np.ndarray) -> np.ndarray:
    rows = np.asarray(spec.indices, dtype=np.int64)
    outside = rows[rows >= len(data.labels)]
    if len(outside):
        raise DGZooError(
            f"--forget: row index {int(outside[0])} is past the end of {data.name} ({len(data.labels)} rows)"
        )
    unseen = rows[~np.isin(rows, train)]
    if len(unseen):
        shown = ", ".join(str(int(r)) for r in unseen[:5]) + (", ..." if len(unseen) > 5 else "")
        raise DGZooError(
            f"--forget: {len(unseen)} of the {len(rows)} rows ({shown}) were never trained on "
            f"(validation rows or held-out domains); give training rows only"
        )
    return rows


def _sample_fraction(
    rows: np.ndarray, labels: np.ndarray, classes: tuple[int, ...], fraction: float, seed: int
) -> np.ndarray:
    """A seeded ``fraction`` of each named class's rows, at least one image per class that has any."""
    rng = np.random.RandomState(seed)
    chosen = []
    for c in classes:
        of_class = rows[labels[rows] == c]
        if len(of_class):
            count = max(1, int(round(fraction * len(of_class))))
            chosen.append(rng.choice(of_class, size=count, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)


def _describe(
    data: DGDataset,
    classes: tuple[int, ...],
    domains: tuple[str, ...],
    fraction: float | None,
    count: int,
    candidates: int,
) -> str:
    what = " and ".join(f"class '{data.class_names[c]}'" for c in classes) or "all classes"
    where = f" of domain {', '.join(domains)}" if domains else ""
    if fraction is not None:
        return f"{count} of the {candidates} training images ({100 * fraction:g}%) of {what}{where}"
    return f"all {count} training images of {what}{where}"
