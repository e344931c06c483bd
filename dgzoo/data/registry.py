"""The DG datasets dgzoo knows by name.

A registry entry says where a dataset lives (a Hub repo id, or the embedded builder), which columns hold the
image, label and domain, the domain names in DomainBed's order with their DomainBed letters as aliases, the
class names, and how it should be trained on by default (native image size, augmentation).

Revisions: an entry may pin a commit sha. Where none is pinned, the loader resolves the branch to its current
commit sha *once*, loads exactly that commit, and records the sha in results.json and the model card, so every
run says which bytes it trained on and can be repeated with ``--revision SHA``.
"""
from __future__ import annotations

import re

from dataclasses import dataclass, field

from ..errors import DGZooError, suggest


@dataclass(frozen=True)
class DatasetSpec:
    """Everything dgzoo needs to know about one named DG dataset."""

    name: str
    title: str
    domains: tuple[str, ...]
    repo_id: str | None = None
    revision: str | None = None
    kind: str = "hub"  # hub | builtin | imagefolder (no parquet on the Hub: give a local path)
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
    license: str = "unknown"
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


_PACS_CITATION = """@inproceedings{li2017deeper,
  title={Deeper, Broader and Artier Domain Generalization},
  author={Li, Da and Yang, Yongxin and Song, Yi-Zhe and Hospedales, Timothy M.},
  booktitle={ICCV}, year={2017}}"""

_OFFICE_HOME_CLASSES = (
    "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator", "Calendar", "Candles",
    "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp", "Drill", "Eraser", "Exit_Sign", "Fan",
    "File_Cabinet", "Flipflops", "Flowers", "Folder", "Fork", "Glasses", "Hammer", "Helmet", "Kettle", "Keyboard",
    "Knives", "Lamp_Shade", "Laptop", "Marker", "Monitor", "Mop", "Mouse", "Mug", "Notebook", "Oven", "Pan",
    "Paper_Clip", "Pen", "Pencil", "Postit_Notes", "Printer", "Push_Pin", "Radio", "Refrigerator", "Ruler",
    "Scissors", "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda", "Speaker", "Spoon", "TV", "Table", "Telephone",
    "ToothBrush", "Toys", "Trash_Can", "Webcam")

REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset to the registry (used at import time, and by users with private datasets)."""
    REGISTRY[spec.name] = spec
    return spec


register_dataset(DatasetSpec(
    name="rotated-digits", title="Rotated Digits", kind="builtin", small_images=True,
    domains=("0", "15", "30", "45", "60", "75"),
    classes=tuple(str(i) for i in range(10)), num_classes=10, image_size=32, augment="none",
    default_targets=("75",), license="bsd-3-clause",
    homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#optical-recognition-of-handwritten-digits-dataset",
    citation="""@misc{alpaydin1998optical, title={Optical Recognition of Handwritten Digits},
  author={Alpaydin, E. and Kaynak, C.}, year={1998}, publisher={UCI Machine Learning Repository}}""",
    notes="Embedded, needs no network: scikit-learn's 1,797 handwritten 8x8 digits, upsampled to 24x24 on a 32x32 "
          "canvas, split disjointly into six rotation domains as in DomainBed's RotatedMNIST."))

register_dataset(DatasetSpec(
    name="colored-digits", title="Colored Digits", kind="builtin", small_images=True,
    domains=("+90%", "+80%", "-90%"),  # DomainBed's names; `--target-domains -90` avoids argparse's leading '-'
    aliases={"+90": "+90%", "+80": "+80%", "-90": "-90%", "90": "+90%", "80": "+80%"},
    classes=("5-9", "0-4"), num_classes=2, image_size=28, augment="none",
    default_targets=("-90%",), license="bsd-3-clause",
    homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#optical-recognition-of-handwritten-digits-dataset",
    citation="""@article{arjovsky2019invariant, title={Invariant Risk Minimization},
  author={Arjovsky, Martin and Bottou, L{\\'e}on and Gulrajani, Ishaan and Lopez-Paz, David},
  journal={arXiv preprint arXiv:1907.02893}, year={2019}}""",
    notes="Embedded, needs no network: DomainBed's ColoredMNIST on scikit-learn's 1,797 8x8 digits (20x20 on a "
          "28x28 canvas), dealt into three domains of 599. Label = digit < 5 with 25% label noise; colour (red or "
          "green channel, blue zero) agrees with the label 90% / 80% / 10% of the time."))

register_dataset(DatasetSpec(
    name="pacs", title="PACS", repo_id="flwrlabs/pacs",
    domains=("art_painting", "cartoon", "photo", "sketch"),
    aliases={"A": "art_painting", "C": "cartoon", "P": "photo", "S": "sketch", "art": "art_painting"},
    classes=("dog", "elephant", "giraffe", "guitar", "horse", "house", "person"), num_classes=7,
    license="unknown", homepage="https://huggingface.co/datasets/flwrlabs/pacs", citation=_PACS_CITATION,
    notes="9,991 images (photo 1,670 / art 2,048 / cartoon 2,344 / sketch 3,929), one parquet file."))

register_dataset(DatasetSpec(
    name="office-home", title="OfficeHome", repo_id="flwrlabs/office-home",
    domains=("Art", "Clipart", "Product", "Real World"),
    aliases={"A": "Art", "C": "Clipart", "P": "Product", "R": "Real World", "real_world": "Real World",
             "RealWorld": "Real World", "Real_World": "Real World"},
    classes=_OFFICE_HOME_CLASSES, num_classes=65, license="other (fair use, non-commercial research)",
    homepage="https://www.hemanthdv.org/officeHomeDataset.html",
    citation="""@inproceedings{venkateswara2017deep, title={Deep Hashing Network for Unsupervised Domain Adaptation},
  author={Venkateswara, Hemanth and Eusebio, Jose and Chakraborty, Shayok and Panchanathan, Sethuraman},
  booktitle={CVPR}, year={2017}}""",
    notes="15,588 images in 65 classes; the 'Real World' domain name contains a space."))

register_dataset(DatasetSpec(
    name="domainnet", title="DomainNet", repo_id="wltjr1007/DomainNet",
    domains=("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
    aliases={"clip": "clipart", "info": "infograph", "paint": "painting", "quick": "quickdraw"},
    num_classes=345, splits=("train", "test"), license="other (fair use, non-commercial research)",
    homepage="https://ai.bu.edu/M3SDA/",
    citation="""@inproceedings{peng2019moment, title={Moment Matching for Multi-Source Domain Adaptation},
  author={Peng, Xingchao and Bai, Qinxun and Xia, Xide and Huang, Zijun and Saenko, Kate and Wang, Bo},
  booktitle={ICCV}, year={2019}}""",
    notes="586,575 images; the official train and test splits are concatenated, as DomainBed does."))

register_dataset(DatasetSpec(
    name="vlcs", title="VLCS", kind="imagefolder",
    domains=("Caltech101", "LabelMe", "SUN09", "VOC2007"),
    aliases={"C": "Caltech101", "L": "LabelMe", "S": "SUN09", "V": "VOC2007"},
    classes=("bird", "car", "chair", "dog", "person"), num_classes=5,
    homepage="https://huggingface.co/datasets/PTeterwak/DomainBed_EasyHard",
    notes="No parquet copy on the Hub: extract all/VLCS.tar.gz from PTeterwak/DomainBed_EasyHard and pass the folder "
          "(root/<domain>/<class>/*), or convert it once with `dgzoo datasets convert`."))

register_dataset(DatasetSpec(
    name="terra-incognita", title="TerraIncognita", kind="imagefolder",
    domains=("location_100", "location_38", "location_43", "location_46"),
    aliases={"L100": "location_100", "L38": "location_38", "L43": "location_43", "L46": "location_46"},
    classes=("bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel"),
    num_classes=10, license="cdla-permissive-1.0",
    homepage="https://huggingface.co/datasets/PTeterwak/DomainBed_EasyHard",
    notes="No parquet copy on the Hub: extract all/terra_incognit.tar.gz from PTeterwak/DomainBed_EasyHard and pass "
          "the folder, or convert it once with `dgzoo datasets convert`."))


def get_spec(name: str) -> DatasetSpec | None:
    """Return the registry entry for a name (case-insensitive) or a known repo id, else None."""
    key = name.lower().replace("_", "-")
    if key in REGISTRY:
        return REGISTRY[key]
    for spec in REGISTRY.values():
        if spec.repo_id and spec.repo_id.lower() == name.lower():
            return spec
    return None


def unknown_dataset_error(name: str) -> DGZooError:
    return DGZooError(f"dataset '{name}' is not a registry name, an existing local path or a Hub repo id"
                      f"{suggest(name, REGISTRY)}; run `dgzoo datasets list` for the known ones")


def hub_license(text: str, link: str | None = None) -> dict[str, str]:
    """Card licence fields for a registry licence string: a Hub licence id as is, anything else as ``other``
    with a ``license_name`` made from the text and ``license_link``."""
    if re.fullmatch(r"[a-z0-9][a-z0-9.-]*", text):
        return {"license": text}
    name = re.sub(r"[^a-z0-9]+", "-", text.lower().removeprefix("other")).strip("-") or "other"
    return {"license": "other", "license_name": name, **({"license_link": link} if link else {})}
