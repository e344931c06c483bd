"""The loaders feed the same data faster: a step decodes each image once, and one evaluation loader with one set of
workers serves every domain split with the accuracies of a loader per split."""

import pytest
import torch

from conftest import PREPROCESSING
from dgzoo.data import (
    DomainImages,
    MultiDomainSet,
    StepBatchSampler,
    eval_loader,
    evaluation_loaders,
    make_splits,
    train_loader,
)
from dgzoo.data.transforms import eval_transform, train_transform
from dgzoo.models import create_backbone
from dgzoo.training.evaluation import evaluate, source_loss


def test_a_step_decodes_each_drawn_image_once_and_keeps_its_samples(digits, monkeypatch):
    """Draws are with replacement: from a domain of 3 images, a step of 8 names rows twice. Each distinct row is
    decoded once, and every sample (its own augmentation seed) is what indexing it alone gives."""
    rows = make_splits(digits, 0.2, 0).in_rows
    tf = train_transform(PREPROCESSING, "domainbed")
    sets = [DomainImages(digits, rows["0"][:3], tf, "0"), DomainImages(digits, rows["15"][:40], tf, "15")]
    keys = StepBatchSampler([3, 40], batch_size=8, seed=1, steps=1).keys_at(0)
    expected = [MultiDomainSet(sets)[k] for k in keys]
    decoded = []
    original = type(digits).decode_image
    monkeypatch.setattr(type(digits), "decode_image", lambda self, row: decoded.append(row) or original(self, row))
    torch.manual_seed(7)
    after = torch.rand(3)
    torch.manual_seed(7)
    (batch,) = list(train_loader(sets, batch_size=8, seed=1, steps=1))
    assert torch.equal(torch.rand(3), after)  # the caller's RNG stream is untouched
    distinct = {(d, p) for d, p, _ in keys}
    assert len(distinct) < len(keys) and len(decoded) == len(distinct)
    for d, (x, y) in enumerate(batch):
        mine = [sample for sample in expected if sample[2] == d]
        assert torch.equal(x, torch.stack([s[0] for s in mine])) and y.tolist() == [s[1] for s in mine]


def split_images(data, tf, n=None):
    splits = make_splits(data, 0.2, 0)
    return {
        d: {
            name: DomainImages(data, rows[d][:n], tf, d)
            for name, rows in (("in", splits.in_rows), ("out", splits.out_rows))
        }
        for d in data.domains
    }


def test_one_evaluation_loader_gives_every_split_the_accuracy_of_its_own_loader(digits):
    """Same accuracies and source loss per split as a loader per split, through Accelerate's prepared loaders
    (whose gather trims the last batch by the split's own size) and with workers."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = create_backbone("test_resnet", digits.num_classes, image_size=16).eval()
    images = split_images(digits, eval_transform(PREPROCESSING), n=23)  # 23 = 2 x 10 + 3: a short last batch
    old = {
        d: {name: accelerator.prepare_data_loader(eval_loader(split, 10)) for name, split in named.items()}
        for d, named in images.items()
    }
    new = evaluation_loaders(images, 10, num_workers=1, prepare=accelerator.prepare_data_loader)
    gather = accelerator.gather_for_metrics
    cpu = torch.device("cpu")
    assert evaluate(model, new, cpu, gather) == evaluate(model, old, cpu, gather)
    sources = digits.domains[:3]
    assert source_loss(model, new, sources, cpu, gather) == source_loss(model, old, sources, cpu, gather)
    assert [len(loader) for loader in new[digits.domains[0]].values()] == [3, 3]


def test_every_split_is_served_by_the_same_workers_across_evaluations(digits):
    """One set of workers for the whole run: not one per split, and not started again at each evaluation."""
    images = split_images(digits, eval_transform(PREPROCESSING), n=6)
    loaders = evaluation_loaders(images, 4, num_workers=1)
    views = [loader for named in loaders.values() for loader in named.values()]
    shared = views[0].shared.loader
    first = [[y.tolist() for _, y in view] for view in views]
    workers = list(shared._iterator._workers)
    second = [[y.tolist() for _, y in view] for view in views]
    assert len(workers) == 1 and shared._iterator._workers == workers and workers[0].is_alive()
    labels = [[split.label(i) for i in range(len(split))] for named in images.values() for split in named.values()]
    assert first == second == [[split[:4], split[4:]] for split in labels]


def test_splits_of_one_evaluation_loader_cannot_be_interleaved(digits):
    loaders = evaluation_loaders(split_images(digits, eval_transform(PREPROCESSING), n=8), 4)
    a, b = loaders[digits.domains[0]]["in"], loaders[digits.domains[1]]["out"]
    iterator = iter(a)
    next(iterator)
    with pytest.raises(RuntimeError, match="one at a time"):
        next(iter(b))
    del iterator
