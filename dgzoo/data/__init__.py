"""Data: load DG datasets from the Hub, local files or the embedded set; split; transform; batch per domain."""

from .eval_loaders import SplitLoader, domain_split_images, evaluation_loaders
from .loaders import (
    DomainImages,
    MultiDomainSet,
    StepBatchSampler,
    collate_domains,
    eval_loader,
    loader_workers,
    train_loader,
)
from .loading import DGDataset, image_folder_table, load_dg_dataset, resolve_hub_revision
from .registry import REGISTRY, DatasetSpec, get_spec, register_dataset
from .splits import DomainSplits, Protocol, make_splits, resolve_domain, resolve_protocol, seed_hash, split_rows
from .transforms import ToRGB, eval_transform, train_transform
from .verify import ImageDecodeError, check_images, undecodable_rows

__all__ = [
    "ImageDecodeError",
    "check_images",
    "undecodable_rows",
    "DGDataset",
    "DatasetSpec",
    "DomainImages",
    "DomainSplits",
    "MultiDomainSet",
    "Protocol",
    "REGISTRY",
    "SplitLoader",
    "StepBatchSampler",
    "ToRGB",
    "collate_domains",
    "domain_split_images",
    "eval_loader",
    "eval_transform",
    "evaluation_loaders",
    "get_spec",
    "image_folder_table",
    "load_dg_dataset",
    "loader_workers",
    "make_splits",
    "register_dataset",
    "resolve_domain",
    "resolve_hub_revision",
    "resolve_protocol",
    "seed_hash",
    "split_rows",
    "train_loader",
    "train_transform",
]
