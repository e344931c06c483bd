"""The DG datasets dgzoo knows by name.

A registry entry says where a dataset lives (a Hub repo id, or the embedded builder), which columns hold the
image, label and domain, the domain names in DomainBed's order with their DomainBed letters as aliases, the
class names, and how it should be trained on by default (native image size, augmentation).

Revisions: every Hub entry pins the commit its columns were verified at (``revision``; how each was verified is
in ``docs/datasets.md``), so a run trains on the same bytes next year as today and records that sha in results.json
and the model card. ``--revision`` loads another commit; where a repo changed its columns across commits, the
entry's ``layouts`` say which columns hold the image, label and domain at which commits, and a commit it does not
list gets the first layout whose columns it has. Datasets that exist on the Hub only as DomainBed-layout tarballs
(``kind="tarball"``: VLCS, TerraIncognita) name the archive inside the repo; :mod:`dgzoo.data.tarball` downloads
it at the pinned commit and converts it once to parquet in dgzoo's cache.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..errors import DGZooError, suggest
from ..registry import Registry


@dataclass(frozen=True)
class ColumnLayout:
    """Which columns hold the image, the label and the domain at some commits of a Hub dataset.

    ``domain=None`` means the commit has no domain column: the domain is the first component of the image's stored
    file path (or, for DomainNet-style names ``<domain>_<class id>_<n>.jpg``, the file name's prefix).
    ``images=False`` marks commits that hold no image bytes at all (file names only), which cannot be trained on.
    """

    revisions: tuple[str, ...]
    image: str = "image"
    label: str = "label"
    domain: str | None = "domain"
    images: bool = True
    note: str = ""

    def fits(self, columns: list[str]) -> bool:
        return all(c in columns for c in (self.image, self.label, *([self.domain] if self.domain else [])))


@dataclass(frozen=True)
class DatasetSpec:
    """Everything dgzoo needs to know about one named DG dataset."""

    name: str
    title: str
    domains: tuple[str, ...]
    repo_id: str | None = None
    revision: str | None = None  # the pinned commit: a full sha, or a verified short id expanded via the commit list
    kind: str = "hub"  # hub | builtin | tarball (an archive in a Hub repo) | imagefolder (a local path)
    aliases: dict[str, str] = field(default_factory=dict)
    classes: tuple[str, ...] | None = None
    num_classes: int | None = None
    image_column: str = "image"
    label_column: str = "label"
    domain_column: str = "domain"
    splits: tuple[str, ...] | None = None  # Hub splits to concatenate; None = all of them
    image_size: int | None = None  # native training resolution; None = the backbone's default
    augment: str = "domainbed"
    small_images: bool = False  # DomainBed's small-image datasets (MNIST-like): its other hparam defaults/searches
    default_targets: tuple[str, ...] | None = None
    layouts: tuple[ColumnLayout, ...] = ()  # column mappings at other commits than the pinned one
    archive: str | None = None  # kind="tarball": the archive's path inside repo_id
    license: str = "unknown"  # a Hub licence id, as the dataset's own card or site gives it
    license_name: str | None = None  # with license="other": the name of the dataset's own terms
    license_link: str | None = None  # with license="other": where those terms are written
    homepage: str = ""
    citation: str = ""
    notes: str = ""

    def canonical_domain(self, name: str) -> str | None:
        """Map a user-given domain (exact, DomainBed letter, or case-insensitive) to its canonical name."""
        if name in self.domains:
            return name
        if name in self.aliases:
            return self.aliases[name]
        lowered = {d.lower(): d for d in self.domains}
        return lowered.get(str(name).lower())

    def layout_at(self, revision: str | None, columns: list[str]) -> ColumnLayout:
        """The column layout of commit ``revision`` whose table has ``columns``: the one listing that commit, else
        the first (the pinned commit's own first) whose columns are all present, else the pinned one."""
        pinned = ColumnLayout((self.revision or "",), self.image_column, self.label_column, self.domain_column)
        layouts = (pinned, *self.layouts)
        for layout in layouts:
            if revision and any(r and revision.startswith(r) for r in layout.revisions):
                return layout
        return next((layout for layout in layouts if layout.fits(columns)), pinned)


_PACS_CITATION = """@inproceedings{li2017deeper,
  title={Deeper, Broader and Artier Domain Generalization},
  author={Li, Da and Yang, Yongxin and Song, Yi-Zhe and Hospedales, Timothy M.},
  booktitle={ICCV}, year={2017}}"""

_OFFICE_HOME_CLASSES = (
    "Alarm_Clock",
    "Backpack",
    "Batteries",
    "Bed",
    "Bike",
    "Bottle",
    "Bucket",
    "Calculator",
    "Calendar",
    "Candles",
    "Chair",
    "Clipboards",
    "Computer",
    "Couch",
    "Curtains",
    "Desk_Lamp",
    "Drill",
    "Eraser",
    "Exit_Sign",
    "Fan",
    "File_Cabinet",
    "Flipflops",
    "Flowers",
    "Folder",
    "Fork",
    "Glasses",
    "Hammer",
    "Helmet",
    "Kettle",
    "Keyboard",
    "Knives",
    "Lamp_Shade",
    "Laptop",
    "Marker",
    "Monitor",
    "Mop",
    "Mouse",
    "Mug",
    "Notebook",
    "Oven",
    "Pan",
    "Paper_Clip",
    "Pen",
    "Pencil",
    "Postit_Notes",
    "Printer",
    "Push_Pin",
    "Radio",
    "Refrigerator",
    "Ruler",
    "Scissors",
    "Screwdriver",
    "Shelf",
    "Sink",
    "Sneakers",
    "Soda",
    "Speaker",
    "Spoon",
    "TV",
    "Table",
    "Telephone",
    "ToothBrush",
    "Toys",
    "Trash_Can",
    "Webcam",
)


# PTeterwak/DomainBed_EasyHard's main ("Update README.md", after "add all" 027ab24 added all/). The Hub's pages show
# only this short id for it; the loader expands it to the full sha through the repo's commit list.
_EASYHARD = "673d299"


def registry_key(name: str) -> str:
    """A registry name as lookups compare it: lower case, ``_`` read as ``-`` (``Office_Home`` is ``office-home``)."""
    return str(name).lower().replace("_", "-")


REGISTRY: Registry[DatasetSpec] = Registry("dataset", normalize=registry_key, describe=lambda spec: spec.title)


def register_dataset(spec: DatasetSpec, replace: bool = False) -> DatasetSpec:
    """Add a dataset to the registry (used at import time, and by users with private datasets); return the entry.

    The name is stored as :func:`get_spec` looks it up (:func:`registry_key`), so the entry is found by the name
    it was given. A name already registered (``pacs``) is refused unless ``replace=True``: silently replacing a
    built-in entry would change what every later ``--dataset pacs`` loads.
    """
    key = REGISTRY.key(spec.name)
    if key and spec.name != key:
        spec = dataclasses.replace(spec, name=key)
    REGISTRY.add(key, spec, replace, fix="register yours under another name, or pass replace=True to replace the entry")
    return spec


register_dataset(
    DatasetSpec(
        name="rotated-digits",
        title="Rotated Digits",
        kind="builtin",
        small_images=True,
        domains=("0", "15", "30", "45", "60", "75"),
        classes=tuple(str(i) for i in range(10)),
        num_classes=10,
        image_size=32,
        augment="none",
        default_targets=("75",),
        license="bsd-3-clause",
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#optical-recognition-of-handwritten-digits-dataset",
        citation="""@misc{alpaydin1998optical, title={Optical Recognition of Handwritten Digits},
  author={Alpaydin, E. and Kaynak, C.}, year={1998}, publisher={UCI Machine Learning Repository}}""",
        notes="Embedded, needs no network: scikit-learn's 1,797 handwritten 8x8 digits, upsampled to 24x24 on a 32x32 "
        "canvas, split disjointly into six rotation domains as in DomainBed's RotatedMNIST.",
    )
)

register_dataset(
    DatasetSpec(
        name="colored-digits",
        title="Colored Digits",
        kind="builtin",
        small_images=True,
        domains=("+90%", "+80%", "-90%"),  # DomainBed's names; `--target-domains -90` avoids argparse's leading '-'
        aliases={"+90": "+90%", "+80": "+80%", "-90": "-90%", "90": "+90%", "80": "+80%"},
        classes=("5-9", "0-4"),
        num_classes=2,
        image_size=28,
        augment="none",
        default_targets=("-90%",),
        license="bsd-3-clause",
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#optical-recognition-of-handwritten-digits-dataset",
        citation="""@article{arjovsky2019invariant, title={Invariant Risk Minimization},
  author={Arjovsky, Martin and Bottou, L{\\'e}on and Gulrajani, Ishaan and Lopez-Paz, David},
  journal={arXiv preprint arXiv:1907.02893}, year={2019}}""",
        notes="Embedded, needs no network: DomainBed's ColoredMNIST on scikit-learn's 1,797 8x8 digits (20x20 on a "
        "28x28 canvas), dealt into three domains of 599. Label = digit < 5 with 25% label noise; colour (red or "
        "green channel, blue zero) agrees with the label 90% / 80% / 10% of the time.",
    )
)

register_dataset(
    DatasetSpec(
        name="pacs",
        title="PACS",
        repo_id="flwrlabs/pacs",
        revision="394113073258ead631f617d2e13bb377c0715c4b",
        domains=("art_painting", "cartoon", "photo", "sketch"),
        aliases={"A": "art_painting", "C": "cartoon", "P": "photo", "S": "sketch", "art": "art_painting"},
        classes=("dog", "elephant", "giraffe", "guitar", "horse", "house", "person"),
        num_classes=7,
        license="unknown",
        homepage="https://huggingface.co/datasets/flwrlabs/pacs",
        citation=_PACS_CITATION,
        notes="9,991 images (photo 1,670 / art 2,048 / cartoon 2,344 / sketch 3,929), one parquet file; columns image, "
        "domain (string), label (ClassLabel of 7).",
    )
)

register_dataset(
    DatasetSpec(
        name="office-home",
        title="OfficeHome",
        repo_id="flwrlabs/office-home",
        revision="d430d44779e929b335be368ab3456484e5de36bb",
        domains=("Art", "Clipart", "Product", "Real World"),
        aliases={
            "A": "Art",
            "C": "Clipart",
            "P": "Product",
            "R": "Real World",
            "real_world": "Real World",
            "RealWorld": "Real World",
            "Real_World": "Real World",
        },
        classes=_OFFICE_HOME_CLASSES,
        num_classes=65,
        license="other",
        license_name="fair-use-notice",
        license_link="https://www.hemanthdv.org/officeHomeDataset.html",
        homepage="https://www.hemanthdv.org/officeHomeDataset.html",
        citation="""@inproceedings{venkateswara2017deep, title={Deep Hashing Network for Unsupervised Domain Adaptation},
  author={Venkateswara, Hemanth and Eusebio, Jose and Chakraborty, Shayok and Panchanathan, Sethuraman},
  booktitle={CVPR}, year={2017}}""",
        notes="15,588 images in 65 classes; the 'Real World' domain name contains a space.",
    )
)

register_dataset(
    DatasetSpec(
        name="domainnet",
        title="DomainNet",
        repo_id="wltjr1007/DomainNet",
        # 8f5b9a1 ("Update README.md") is the newest commit whose columns the Hub's pages show in full: image, domain
        # (string), category (string), y (ClassLabel of 345). Later and earlier commits are in `layouts`.
        revision="8f5b9a174c161881d17be113cce1d7fe946ccc52",
        label_column="y",
        layouts=(
            # "Upload dataset" (main since): image + label (ClassLabel of 345); no domain column was visible, so the
            # domain comes from the column if it has one, else from each image's stored file path.
            ColumnLayout(
                ("ee20570ae7a29c51571e55a9a17983f7625295d6",),
                image="image",
                label="label",
                domain=None,
                note="image + label; domain from the image path",
            ),
            # 7cc2add / 6a9c18c / 8f2da9b: README edits over the 79c9129 data (image, domain, category, y int64, path).
            ColumnLayout(
                (
                    "7cc2add8164cd9179af0c58c6195bc88ddde29aa",
                    "6a9c18cdf408ce9113d2ba30dd5245ef8910160b",
                    "8f2da9b7698afd950c481fb2a0e43dbb2341c9a8",
                ),
                image="image",
                label="y",
                domain="domain",
            ),
            # cd16ade, the first upload: file names, domain, category and y only, no image bytes.
            ColumnLayout(
                ("cd16ade672a036d4ac99e4a00b80ffd31d83eca5",),
                image="file_name",
                label="y",
                domain="domain",
                images=False,
                note="file names only",
            ),
        ),
        domains=("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
        aliases={"clip": "clipart", "info": "infograph", "paint": "painting", "quick": "quickdraw"},
        num_classes=345,
        splits=("train", "test"),
        license="other",
        license_name="fair-use-notice",
        license_link="https://ai.bu.edu/M3SDA/",
        homepage="https://ai.bu.edu/M3SDA/",
        citation="""@inproceedings{peng2019moment, title={Moment Matching for Multi-Source Domain Adaptation},
  author={Peng, Xingchao and Bai, Qinxun and Xia, Xide and Huang, Zijun and Saenko, Kate and Wang, Bo},
  booktitle={ICCV}, year={2019}}""",
        notes="586,575 images; the official train and test splits are concatenated, as DomainBed does.",
    )
)

register_dataset(
    DatasetSpec(
        name="vlcs",
        title="VLCS",
        kind="tarball",
        repo_id="PTeterwak/DomainBed_EasyHard",
        revision=_EASYHARD,
        archive="all/VLCS.tar.gz",
        domains=("Caltech101", "LabelMe", "SUN09", "VOC2007"),
        aliases={"C": "Caltech101", "L": "LabelMe", "S": "SUN09", "V": "VOC2007"},
        classes=("bird", "car", "chair", "dog", "person"),
        num_classes=5,
        homepage="https://huggingface.co/datasets/PTeterwak/DomainBed_EasyHard",
        notes="On the Hub only as a DomainBed-layout tarball (all/VLCS.tar.gz of PTeterwak/DomainBed_EasyHard, the "
        "unsplit data): dgzoo downloads it once and converts it to parquet in its cache.",
    )
)

register_dataset(
    DatasetSpec(
        name="terra-incognita",
        title="TerraIncognita",
        kind="tarball",
        repo_id="PTeterwak/DomainBed_EasyHard",
        revision=_EASYHARD,
        archive="all/terra_incognit.tar.gz",
        domains=("location_100", "location_38", "location_43", "location_46"),
        aliases={"L100": "location_100", "L38": "location_38", "L43": "location_43", "L46": "location_46"},
        classes=("bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel"),
        num_classes=10,
        license="cdla-permissive-1.0",
        homepage="https://huggingface.co/datasets/PTeterwak/DomainBed_EasyHard",
        notes="On the Hub only as a DomainBed-layout tarball (all/terra_incognit.tar.gz of PTeterwak/DomainBed_EasyHard, "
        "the unsplit data): dgzoo downloads it once and converts it to parquet in its cache.",
    )
)


def get_spec(name: str) -> DatasetSpec | None:
    """Return the registry entry for a name (case-insensitive) or a known repo id, else None. A repo holding
    several registry datasets as archives (DomainBed_EasyHard) names none of them."""
    key = registry_key(name)
    if key in REGISTRY:
        return REGISTRY[key]
    matches = [spec for spec in REGISTRY.values() if spec.repo_id and spec.repo_id.lower() == name.lower()]
    return matches[0] if len(matches) == 1 else None


def unknown_dataset_error(name: str) -> DGZooError:
    return DGZooError(
        f"dataset '{name}' is not a registry name, an existing local path or a Hub repo id"
        f"{suggest(name, REGISTRY)}; run `dgzoo datasets list` for the known ones"
    )


def hub_license(spec: DatasetSpec | None) -> dict[str, str]:
    """Card licence fields of a dataset, as its own card or site states them: ``license`` (a Hub id), plus
    ``license_name`` and ``license_link`` for ``other``. A dataset dgzoo does not know gives ``unknown``."""
    if spec is None:
        return {"license": "unknown"}
    fields = {"license": spec.license}
    if spec.license == "other":
        fields["license_name"] = spec.license_name or re.sub(r"[^a-z0-9]+", "-", spec.name.lower())
        if spec.license_link or spec.homepage:
            fields["license_link"] = spec.license_link or spec.homepage
    return fields
