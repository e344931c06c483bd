"""Regenerate the parity reference numbers in ``tests/parity/data/`` from reference checkouts outside the repository.

    python tests/parity/regenerate.py domainbed --domainbed /tmp/ref/DomainBed --site /tmp/ref/site
    python tests/parity/regenerate.py sharpness --sam /tmp/ref/sam --gsam /tmp/ref/GSAM --sagm /tmp/ref/SAGM
    python tests/parity/regenerate.py mixing --mixstyle /tmp/ref/mixstyle-release --efdm /tmp/ref/EFDM
    python tests/parity/regenerate.py miro --miro /tmp/ref/miro
    python tests/parity/regenerate.py swad --swad /tmp/ref/swad
    python tests/parity/regenerate.py ema              # timm's ModelEmaV3, from the installed timm

Each sub-command imports the reference code from the path given (never from this repository), runs it on the tiny
case of ``tinycase.py`` and writes the numbers it produced (digests of every parameter and buffer after each update,
and the losses it reported) together with the reference's git commit. Where the reference builds its own network,
it is handed the same timm network dgzoo uses, with the same initial weights, so only the update rule is compared.
See docs/parity.md.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import tinycase
from tinycase import NUM_CLASSES, NUM_DOMAINS, SHAPE, UPDATES


def commit_of(path: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(path), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def reference_import(path: Path, site: Path | None) -> None:
    """Put a reference checkout (and an optional folder of packages it needs, e.g. BackPACK) first on sys.path."""
    for p in (site, path):
        if p is not None:
            sys.path.insert(0, str(p))


# -- DomainBed ---------------------------------------------------------------------------------------------------

# dgzoo host -> DomainBed class. ARM, ADRMX and URM are not dgzoo hosts; ERM++ neither.
DOMAINBED = {
    "andmask": "ANDMask",
    "cad": "CAD",
    "causirl_coral": "CausIRL_CORAL",
    "causirl_mmd": "CausIRL_MMD",
    "cdann": "CDANN",
    "condcad": "CondCAD",
    "coral": "CORAL",
    "dann": "DANN",
    "eqrm": "EQRM",
    "erm": "ERM",
    "fish": "Fish",
    "fishr": "Fishr",
    "groupdro": "GroupDRO",
    "ib_erm": "IB_ERM",
    "ib_irm": "IB_IRM",
    "iga": "IGA",
    "irm": "IRM",
    "mixup": "Mixup",
    "mldg": "MLDG",
    "mmd": "MMD",
    "mtl": "MTL",
    "rdm": "RDM",
    "rsc": "RSC",
    "sagnet": "SagNet",
    "sandmask": "SANDMask",
    "sd": "SD",
    "selfreg": "SelfReg",
    "transfer": "Transfer",
    "trm": "TRM",
    "vrex": "VREx",
}
# Hyperparameters set for the tiny case on both sides (same names in DomainBed and dgzoo): penalties that anneal
# in at step 500-2500 start at the second update here, so both branches of the rule (and the optimizer reset that
# DomainBed does at the switch) are exercised; SANDMask's tau=1 would mask every entry (no update at all).
OVERRIDES: dict[str, dict[str, Any]] = {
    "irm": {"irm_penalty_anneal_iters": 1},
    "vrex": {"vrex_penalty_anneal_iters": 1},
    "ib_erm": {"ib_penalty_anneal_iters": 1},
    "ib_irm": {"irm_penalty_anneal_iters": 1, "ib_penalty_anneal_iters": 1},
    "rdm": {"rdm_penalty_anneal_iters": 1},
    "fishr": {"penalty_anneal_iters": 1},
    "eqrm": {"eqrm_burnin_iters": 1},
    "trm": {"iters": 1},
    "sandmask": {"tau": 0.5},
}
# Hosts whose dgzoo implementation computes in float32 whatever the parameters' dtype (the per-domain gradient
# engine's buffers, GroupDRO's domain weights, TRM's and Transfer's heads; Fishr's BackPACK side too).
FLOAT32 = {"andmask", "sandmask", "groupdro", "transfer", "trm", "fishr"}
# Hosts run in float64 whose dgzoo implementation computes a loss term in float32 on purpose (`.float()`, safe
# under mixed precision): they agree with DomainBed to float32 rounding, and are compared at float32's tolerance.
FLOAT32_TERMS = {"cad", "condcad", "eqrm", "ib_erm", "ib_irm", "iga", "irm", "mldg", "rdm", "sd", "vrex"}


class TimmFeaturizer(nn.Module):
    """Stands in for DomainBed's ``networks.Featurizer``: the tiny timm network without its classifier (the pooled
    pre-logit features dgzoo's ``featurize`` returns)."""

    def __init__(self, input_shape: tuple, hparams: dict[str, Any]):
        super().__init__()
        import timm

        self.net = timm.create_model(tinycase.BACKBONE, num_classes=0)
        self.n_outputs = self.net.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def domainbed_key(host: str, key: str) -> tuple[str, Any] | None:
    """Where dgzoo's state entry ``key`` of ``host`` lives in DomainBed's algorithm: (key, which columns or None),
    or None where DomainBed has no counterpart (dgzoo's bookkeeping buffers, TRM's per-domain heads)."""
    backbone = {"fish": ("network.net.0.net.", "network.net.1."), "sagnet": ("network_f.net.", "network_c.")}
    features, classifier = backbone.get(host, ("featurizer.net.", "classifier."))
    if key.startswith("network.fc."):
        rest = key[len("network.fc.") :]
        if host == "mtl" and rest == "weight":  # DomainBed's MTL head reads [features, noise]: its first half
            return "classifier.weight", "first"
        return classifier + rest, None
    if key.startswith("network."):
        return features + key[len("network.") :], None
    if host == "mtl" and key == "noise_head.weight":
        return "classifier.weight", "second"
    renamed = {"transfer": {"adversary.": "adv_classifier."}, "sagnet": {"style_head.": "network_s."}}
    for prefix, theirs in renamed.get(host, {}).items():
        if key.startswith(prefix):
            return theirs + key[len(prefix) :], None
    if host in ("dann", "cdann") and key.startswith(("discriminator.", "class_embeddings.")):
        return key, None
    if host == "selfreg" and key.startswith("cdpl."):
        return key, None
    if host == "groupdro" and key == "q":
        return key, None
    return None


def _slice(half: str | None, tensor: torch.Tensor, width: int) -> torch.Tensor:
    """The whole tensor, or its first ``width`` columns / the rest (MTL's head over [features, noise])."""
    if half is None:
        return tensor
    return tensor[:, :width] if half == "first" else tensor[:, width:]


def domainbed_state(host: str, algorithm: nn.Module, keys: list[str], width: int) -> dict[str, torch.Tensor]:
    """DomainBed's state under dgzoo's names (for the keys that have a counterpart)."""
    theirs = dict(algorithm.state_dict(keep_vars=True))
    out = {}
    for key in keys:
        where = domainbed_key(host, key)
        if where is not None and where[0] in theirs:
            out[key] = _slice(where[1], theirs[where[0]].detach(), width).clone()
    return out


def load_into_domainbed(host: str, algorithm: nn.Module, state: dict[str, torch.Tensor], width: int) -> list[str]:
    """Copy dgzoo's initial state into DomainBed's algorithm in place (its optimizers keep the same parameters);
    return DomainBed's trainable parameters that received nothing."""
    theirs = dict(algorithm.state_dict(keep_vars=True))
    filled = set()
    for key, value in state.items():
        where = domainbed_key(host, key)
        if where is None or where[0] not in theirs:
            continue
        with torch.no_grad():
            target = theirs[where[0]]
            if where[0] == "q" and target.numel() == 0:  # GroupDRO's q is created at its first update
                continue
            _slice(where[1], target, width).copy_(value)
        filled.add(where[0])
    return [n for n, p in algorithm.named_parameters() if n not in filled]


def domainbed(args: argparse.Namespace) -> None:
    reference_import(args.domainbed, args.site)
    nn.Module.cuda = lambda self, *a, **k: self  # TRM moves its heads with .cuda(); the tiny case runs on the CPU
    torch.Tensor.cuda = lambda self, *a, **k: self
    from domainbed import algorithms, hparams_registry, networks

    networks.Featurizer = TimmFeaturizer

    hosts = args.only or sorted(DOMAINBED)
    path = "domainbed.json"
    data = tinycase.load(path) if (tinycase.DATA / path).exists() and args.only else {"hosts": {}}
    data["reference"] = {
        "repository": "https://github.com/facebookresearch/DomainBed",
        "commit": commit_of(args.domainbed),
        "file": "domainbed/algorithms.py",
    }
    for host in hosts:
        try:
            domainbed_host(host, data, algorithms, hparams_registry)
        except Exception as e:
            print(f"{host}: FAILED {type(e).__name__}: {e}")
    tinycase.save(path, data)


def domainbed_host(host: str, data: dict[str, Any], algorithms: Any, hparams_registry: Any) -> None:
    """Run DomainBed's ``host`` on the tiny case from dgzoo's initial state; store its numbers in ``data``."""
    name = DOMAINBED[host]
    overrides = OVERRIDES.get(host, {})
    hparams = hparams_registry.default_hparams(name, "RotatedMNIST")  # a small-image dataset's defaults
    hparams.update(overrides)
    dtype = "float32" if host in FLOAT32 else "float64"
    with tinycase.numerics(dtype):
        ours = tinycase.build_dgzoo(host, overrides)
        differing = {
            k: (v, hparams[k]) for k, v in ours.resolved_hparams[host].items() if k in hparams and hparams[k] != v
        }
        if differing:
            print(f"  {host}: dgzoo's hparams (left) differ from DomainBed's: {differing}")
        initial = {k: v.detach().clone() for k, v in ours.host.state_dict().items()}
        keys = [k for k in initial if domainbed_key(host, k) is not None]
        width = ours.host.network.num_features
        torch.manual_seed(tinycase.INIT_SEED)
        theirs = algorithms.get_algorithm_class(name)(SHAPE, NUM_CLASSES, NUM_DOMAINS, hparams)
        unfilled = load_into_domainbed(host, theirs, initial, width)
        if unfilled:
            print(f"  {host}: DomainBed parameters dgzoo has no counterpart for: {unfilled}")
        updates = []
        for update in range(UPDATES):
            tinycase.seed_everything(update)
            patches = randomness_patches(host, ours, update, algorithms)
            batches = tinycase.minibatches(update)
            metrics = with_patches(patches, lambda b=batches: theirs.update(b))
            state = domainbed_state(host, theirs, keys, width)
            if COMPARE:
                compare(host, update, state, ours)
            updates.append(
                {
                    "metrics": {k: float(v) for k, v in metrics.items()},
                    "state": tinycase.changes(state, {k: initial[k] for k in keys}),
                }
            )
    data["hosts"][host] = {
        "domainbed": name,
        "hparams": hparams,
        "overrides": overrides,
        "dtype": dtype,
        "tolerance": "float32" if host in FLOAT32 | FLOAT32_TERMS else "float64",
        "initial": tinycase.total(tinycase.digests({k: initial[k] for k in keys})),
        "updates": updates,
    }
    print(f"{host}: {len(keys)} tensors, losses {[u['metrics'] for u in updates]}")


COMPARE = False


def compare(host: str, update: int, state: dict[str, torch.Tensor], ours: Any) -> None:
    """Diagnostics (--compare): run dgzoo's update too and print the tensors that differ most."""
    tinycase.seed_everything(update)
    ours.update(tinycase.minibatches(update), update)
    mine = ours.host.state_dict()
    diffs = sorted(((float((mine[k].double() - v.double()).abs().max()), k) for k, v in state.items()), reverse=True)
    worst = [f"{k}={d:.2e}" for d, k in diffs[:4] if d > 0]
    print(f"  {host} update {update + 1}: max |dgzoo - reference| {worst}")


class _Draws:
    """Hands out pre-drawn values in order, one per call (DomainBed's np.random.* / torch.randperm calls)."""

    def __init__(self, values: list[Any]):
        self.values = list(values)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.values.pop(0)


def randomness_patches(host: str, ours: Any, update: int, algorithms: Any) -> list[tuple[Any, str, Any]]:
    """(object, attribute, value) patches that make DomainBed take the random decisions dgzoo takes at ``update``
    (dgzoo draws them from a generator seeded with the run seed and the step, DomainBed from the global RNGs).
    Empty where both draw from the same global RNG in the same order."""
    import types

    import numpy as np

    from dgzoo.algorithms.meta import meta_train_test_pairs
    from dgzoo.algorithms.robust import mixup_pairs
    from dgzoo.algorithms.seeding import derive_seed

    seed = derive_seed(getattr(ours.host, "seed", 0), update)
    batches = tinycase.minibatches(update)
    if host in ("causirl_coral", "causirl_mmd"):
        generator = torch.Generator().manual_seed(seed)
        cuts = [int(torch.randint(0, len(x), (1,), generator=generator)) for x, _ in batches]
        shim = types.SimpleNamespace(random=types.SimpleNamespace(randint=_Draws(cuts)))
        return [(algorithms, "np", shim)]
    if host == "mixup":
        triples = mixup_pairs(len(batches), ours.host.hparams["mixup_alpha"], seed)
        pairs = [(batches[i], batches[j]) for i, j, _ in triples]
        shim = types.SimpleNamespace(random=types.SimpleNamespace(beta=_Draws([lam for *_, lam in triples])))
        return [(algorithms, "np", shim), (algorithms, "random_pairs_of_minibatches", lambda mb: pairs)]
    if host == "mldg":
        pairs = meta_train_test_pairs(
            len(batches), ours.host.hparams["n_meta_test"], torch.Generator().manual_seed(seed)
        )
        return [(algorithms, "split_meta_train_test", lambda mb, num_meta_test=1: [(mb[i], mb[j]) for i, j in pairs])]
    if host == "fishr":
        # BackPACK 1.7 under torch 2.x fills grad_batch only when the backward pass reaches the classifier's input:
        # Fishr's `loss.backward(inputs=<classifier parameters>, ...)` stops short of it and BackPACK records
        # nothing. Without `inputs` the same per-sample gradients are recorded; the extra .grad it accumulates in
        # the featurizer is cleared by Fishr's own zero_grad() before its real backward pass.
        backward = torch.Tensor.backward

        def without_inputs(self: torch.Tensor, *args: Any, inputs: Any = None, **kwargs: Any) -> None:
            return backward(self, *args, **kwargs)

        return [(torch.Tensor, "backward", without_inputs)]
    if host == "selfreg":
        rng = np.random.default_rng(seed)
        lam = float(rng.beta(0.5, 0.5))
        labels = torch.sort(torch.cat([y for _, y in batches]), stable=True)[0]
        _, counts = torch.unique_consecutive(labels, return_counts=True)
        perms = [torch.as_tensor(rng.permutation(c)) for c in counts.tolist() for _ in range(2)]
        draws = _Draws(perms)
        randperm = torch.randperm
        shim = types.SimpleNamespace(random=types.SimpleNamespace(beta=_Draws([lam])))
        return [(algorithms, "np", shim), (torch, "randperm", lambda n, *a, **k: draws() if n > 0 else randperm(0))]
    return []


def with_patches(patches: list[tuple[Any, str, Any]], fn: Callable[[], Any]) -> Any:
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    for obj, attr, value in patches:
        setattr(obj, attr, value)
    try:
        return fn()
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


# -- SAM, GSAM, SAGM: the official optimizers on ERM's pooled cross-entropy ------------------------------------------

SHARPNESS = {
    "sam": "https://github.com/davda54/sam",
    "gsam": "https://github.com/juntang-zhuang/GSAM",
    "sagm": "https://github.com/Wang-pengfei/SAGM",
}


def sharpness(args: argparse.Namespace) -> None:
    import torch.nn.functional as F

    paths = {"sam": args.sam, "gsam": args.gsam, "sagm": args.sagm}
    for path in paths.values():
        reference_import(path, None)
    sys.path.insert(0, str(args.sagm / "domainbed"))  # SAGM's optimizer package, without its DomainBed fork
    from gsam import GSAM, LinearScheduler
    from sagm import SAGM
    from sam import SAM

    data: dict[str, Any] = {"hosts": {}}
    for host, repository in SHARPNESS.items():
        with tinycase.numerics("float64"):
            ours = tinycase.build_dgzoo(host, {})
            hp = ours.resolved_hparams[host]
            network = copy.deepcopy(ours.host.network)
            initial = {f"network.{k}": v.detach().clone() for k, v in network.state_dict().items()}
            adam = torch.optim.Adam  # its epsilon is tinycase.ADAM_EPS here, as dgzoo's optimizer's
            if host == "sam":
                optimizer = SAM(network.parameters(), adam, rho=hp["rho"], adaptive=False, lr=tinycase.LR)
            else:
                # A constant rho, as SAGM's DomainBed algorithm schedules it (max = min = rho).
                rho = LinearScheduler(T_max=5000, max_value=hp["rho"], min_value=hp["rho"])
                base = adam(network.parameters(), lr=tinycase.LR)
                cls, alpha = (GSAM, "gsam_alpha") if host == "gsam" else (SAGM, "alpha")
                optimizer = cls(
                    params=network.parameters(),
                    base_optimizer=base,
                    model=network,
                    rho_scheduler=rho,
                    adaptive=False,
                    **{alpha: hp["alpha"]},
                )
            updates = []
            for update in range(UPDATES):
                tinycase.seed_everything(update)
                batches = tinycase.minibatches(update)
                x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
                if host == "sam":  # davda54/sam's README usage: two closures around first_step/second_step
                    loss = F.cross_entropy(network(x), y)
                    loss.backward()
                    optimizer.first_step(zero_grad=True)
                    F.cross_entropy(network(x), y).backward()
                    optimizer.second_step(zero_grad=True)
                else:  # the official usage (SAGM's DomainBed algorithm): set_closure, step, update_rho_t
                    optimizer.set_closure(F.cross_entropy, x, y)
                    _, loss = optimizer.step()
                    optimizer.update_rho_t()
                state = {f"network.{k}": v for k, v in network.state_dict().items()}
                updates.append({"metrics": {"loss": float(loss.detach())}, "state": tinycase.changes(state, initial)})
        data["hosts"][host] = {
            "reference": {"repository": repository, "commit": commit_of(paths[host])},
            "overrides": {},
            "hparams": hp,
            "dtype": "float64",
            "tolerance": "float64",
            "initial": tinycase.total(tinycase.digests(initial)),
            "updates": updates,
        }
        print(f"{host}: losses {[u['metrics'] for u in updates]}")
    tinycase.save("sharpness.json", data)


# -- EMA: timm's ModelEmaV3 at a constant decay over ERM's trajectory -------------------------------------------------


def erm_step(network: nn.Module, optimizer: torch.optim.Optimizer, update: int) -> torch.Tensor:
    """One step of DomainBed's ERM (pooled cross-entropy, Adam) on the tiny case's minibatches of ``update``."""
    import torch.nn.functional as F

    tinycase.seed_everything(update)
    batches = tinycase.minibatches(update)
    loss = F.cross_entropy(network(torch.cat([b[0] for b in batches])), torch.cat([b[1] for b in batches]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


EMA_DECAY = 0.5  # a decay at which two updates move the average visibly


def ema(args: argparse.Namespace) -> None:
    import timm
    from timm.utils.model_ema import ModelEmaV3

    data: dict[str, Any] = {"hosts": {}}
    overrides = {"ema.decay": EMA_DECAY, "ema.warmup": False}  # the constant decay; the warm-up: test_averaging.py
    with tinycase.numerics("float64"):
        ours = tinycase.build_dgzoo("erm+ema", overrides)
        network = copy.deepcopy(ours.host.network)
        average = ModelEmaV3(network, decay=EMA_DECAY)  # update(model) without a step: the constant decay
        initial = {
            **{f"network.{k}": v.detach().clone() for k, v in network.state_dict().items()},
            **{f"evaluated.{k}": v.detach().clone() for k, v in network.state_dict().items()},
        }
        optimizer = torch.optim.Adam(network.parameters(), lr=tinycase.LR)
        updates = []
        for update in range(UPDATES):
            loss = erm_step(network, optimizer, update)
            average.update(network)
            state = {
                **{f"network.{k}": v for k, v in network.state_dict().items()},
                **{f"evaluated.{k}": v for k, v in average.module.state_dict().items()},
            }
            updates.append({"metrics": {"loss": float(loss)}, "state": tinycase.changes(state, initial)})
    data["hosts"]["erm+ema"] = {
        "reference": {
            "repository": "https://github.com/huggingface/pytorch-image-models",
            "version": timm.__version__,
            "code": "timm.utils.model_ema.ModelEmaV3",
        },
        "overrides": overrides,
        "dtype": "float64",
        "tolerance": "float64",
        "initial": tinycase.total(tinycase.digests(initial)),
        "updates": updates,
    }
    print(f"erm+ema: losses {[u['metrics'] for u in updates]}")
    tinycase.save("ema.json", data)


# -- SWAD: the official LossValley and AveragedModel on scripted validation-loss curves --------------------------------


def swad_weights(step: int) -> torch.Tensor:
    """The scripted weights of the tiny SWAD model after ``step`` steps: distinct per step, so an average over a
    window of steps identifies the window."""
    t = float(step)
    return torch.tensor([[t, np.sin(t), t * t / 10.0]], dtype=torch.float64)


# name -> (validation loss at each evaluation, hyperparameters). An evaluation every SWAD_EVERY steps; the run ends at
# the last one. Defaults are the official n_converge=3, n_tolerance=6, tolerance_ratio=0.3.
SWAD_EVERY = 2
SWAD_CURVES: dict[str, tuple[list[float], dict[str, Any]]] = {
    "converges at the third evaluation": ([0.5, 0.6, 0.7, 0.6, 0.55, 0.6, 0.7, 0.8, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0], {}),
    "converges at the third evaluation, ends in the valley": ([0.5, 0.6, 0.7] + [0.6] * 27, {}),
    "a valley after a descent": (
        [2.0, 1.5, 1.2, 1.0, 0.9, 0.85, 0.8, 0.82, 0.84, 0.83, 0.85, 0.9, 0.95, 1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.2],
        {},
    ),
    "the valley dies": ([1.0, 0.9, 0.95, 0.97, 0.93, 0.95, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0], {}),
    "the run ends inside the valley": ([2.0, 1.5, 1.0, 1.1, 1.2, 1.05, 1.1, 1.0, 1.15], {}),
    "a descent that never converges": ([2.0, 1.8, 1.6, 1.4, 1.2, 1.0, 0.9, 0.8], {}),
    "n_tolerance below n_converge": (
        [2.0, 1.0, 1.2, 1.1, 1.3, 1.2, 1.25, 2.5, 3.0, 3.5, 4.0],
        {"n_converge": 4, "n_tolerance": 2},
    ),
    "n_tolerance above n_converge, high losses before": (
        [0.9, 5.0, 0.8, 0.7, 0.75, 0.72, 0.74, 0.73, 0.76, 0.8, 0.9, 1.5, 2.0, 2.0, 2.0, 2.0, 2.0],
        {},
    ),
}
SWAD_DEFAULTS = {"n_converge": 3, "n_tolerance": 6, "tolerance_ratio": 0.3}


def swad(args: argparse.Namespace) -> None:
    reference_import(args.swad, None)
    nn.Module.cuda = lambda self, *a, **k: self  # get_final_model moves the average to the GPU
    from domainbed import swad as swad_module
    from domainbed.lib import swa_utils

    class Logger:  # the evaluator's logger, called when the run never converged
        def error(self, message: str) -> None:
            print(f"  (LossValley: {message})")

    data: dict[str, Any] = {
        "reference": {
            "repository": "https://github.com/khanrc/swad",
            "commit": commit_of(args.swad),
            "code": "domainbed/swad.py LossValley, domainbed/lib/swa_utils.py",
        },
        "every": SWAD_EVERY,
        "cases": {},
    }
    for name, (losses, overrides) in SWAD_CURVES.items():
        hp = {**SWAD_DEFAULTS, **overrides}
        model = nn.Linear(3, 1, bias=False).double()
        valley = swad_module.LossValley(type("Evaluator", (), {"logger": Logger()})(), **hp)
        segment = swa_utils.AveragedModel(model)
        for step in range(1, SWAD_EVERY * len(losses) + 1):  # the official loop, steps counted from 1
            with torch.no_grad():
                model.weight.copy_(swad_weights(step))
            segment.update_parameters(model, step=step)
            if step % SWAD_EVERY == 0:
                valley.update_and_evaluate(segment, 0.0, losses[step // SWAD_EVERY - 1], lambda *a: None)
                if valley.dead_valley:
                    break
                segment = swa_utils.AveragedModel(model)
        final = valley.get_final_model()
        averaged = isinstance(final, swa_utils.AveragedModel)
        weights = (final.module if averaged else final).weight.detach().flatten().tolist()
        data["cases"][name] = {
            "losses": losses,
            "hparams": hp,
            "converged": valley.is_converged,
            "weights": weights,
            "n_averaged": int(final.n_averaged),
            "window": [int(final.start_step), int(final.end_step)],
        }
        print(f"{name}: window {data['cases'][name]['window']} n={int(final.n_averaged)} weights {weights}")
    tinycase.save("swad.json", data)


# -- MixStyle, EFDMix: the official modules after layer1..3, ERM's update ---------------------------------------------


def load_file(path: Path, name: str) -> Any:
    """Import one reference source file as a module (the released MixStyle/EFDMix files stand alone). EFDM's
    efdmix.py ends in a stray line-continuation backslash, a syntax error; it is dropped."""
    import types

    source = path.read_text().rstrip()
    module = types.ModuleType(name)
    exec(compile(source.rstrip("\\"), str(path), "exec"), module.__dict__)
    return module


MIXING = {
    "mixstyle": ("https://github.com/KaiyangZhou/mixstyle-release", "reid/models/mixstyle.py", "MixStyle"),
    "efdmix": ("https://github.com/YBZh/EFDM", "DomainGeneralization/reid/models/efdmix.py", "EFDMix"),
}
# p = 1: every training pass mixes at every stage. dgzoo draws the p-decision from torch's RNG (torch.rand), the
# official modules from Python's `random`; at p = 1 neither decides anything, and the reference draws (and drops)
# one torch.rand before each module so that the Beta weights and the permutation come from the same torch stream.
MIXING_OVERRIDES = {"p": 1.0}


def mixing(args: argparse.Namespace) -> None:
    paths = {"mixstyle": args.mixstyle, "efdmix": args.efdm}
    data: dict[str, Any] = {"hosts": {}}
    for addon, (repository, file, cls) in MIXING.items():
        official = getattr(load_file(paths[addon] / file, f"reference_{addon}"), cls)
        overrides = {f"{addon}.{k}": v for k, v in MIXING_OVERRIDES.items()}
        with tinycase.numerics("float64"):
            ours = tinycase.build_dgzoo(f"erm+{addon}", overrides)
            hp = ours.resolved_hparams[addon]
            network = copy.deepcopy(ours.host.network)
            for hook in network._forward_hooks.copy():  # the copy carries dgzoo's (disabled) hooks: drop them
                network._forward_hooks.pop(hook)
            for stage in ("layer1", "layer2", "layer3"):
                module = getattr(network, stage)
                module._forward_hooks.clear()
                kwargs = {"eps": hp["eps"]} if "eps" in hp else {}
                mixer = official(p=hp["p"], alpha=hp["alpha"], mix=hp["mix"], **kwargs)

                def hook(m: nn.Module, inputs: Any, output: torch.Tensor, mixer: nn.Module = mixer) -> torch.Tensor:
                    torch.rand(())
                    mixer.train(m.training)
                    return mixer(output)

                module.register_forward_hook(hook)
            initial = {f"network.{k}": v.detach().clone() for k, v in network.state_dict().items()}
            optimizer = torch.optim.Adam(network.parameters(), lr=tinycase.LR)
            updates = []
            for update in range(UPDATES):
                loss = erm_step(network, optimizer, update)
                state = {f"network.{k}": v for k, v in network.state_dict().items()}
                updates.append({"metrics": {"loss": float(loss)}, "state": tinycase.changes(state, initial)})
        data["hosts"][f"erm+{addon}"] = {
            "reference": {"repository": repository, "commit": commit_of(paths[addon]), "file": file},
            "overrides": overrides,
            "hparams": hp,
            "dtype": "float64",
            "tolerance": "float64",
            "initial": tinycase.total(tinycase.digests(initial)),
            "updates": updates,
        }
        print(f"erm+{addon}: losses {[u['metrics'] for u in updates]}")
    tinycase.save("mixing.json", data)


# -- MIRO: the official algorithm on the tiny network's ResNet taps ---------------------------------------------------


class _HParams(dict):
    """The official MIRO reads its hyperparameters both as keys and as attributes."""

    def __getattr__(self, name: str) -> Any:
        return self[name]


class TimmURFeaturizer(nn.Module):
    """Stands in for MIRO's ``URFeaturizer``: the tiny timm network without its classifier, its features tapped
    where the official ``BLOCKNAMES['resnet']`` with ``feat_layers='stem_block'`` taps a ResNet (the stem's last
    module, ``maxpool``, and ``layer1``..``layer4``). ``freeze='all'`` (the oracle) freezes it and keeps it in eval
    mode, as the official frozen-BatchNorm oracle; the trained copy's BatchNorm trains, as dgzoo's network does."""

    TAPS = ("maxpool", "layer1", "layer2", "layer3", "layer4")

    def __init__(
        self,
        input_shape: tuple,
        hparams: Any,
        preserve_readout: bool = False,
        freeze: Any = None,
        feat_layers: Any = None,
    ):
        super().__init__()
        import timm

        self.net = timm.create_model(tinycase.BACKBONE, num_classes=0)
        self.n_outputs = self.net.num_features
        self._features: list[torch.Tensor] = []
        for name, module in self.net.named_modules():
            if name in self.TAPS:
                module.register_forward_hook(lambda m, i, o: self._features.append(o))
        self.frozen = freeze == "all"
        if self.frozen:
            self.net.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> TimmURFeaturizer:
        return super().train(mode and not self.frozen)

    def forward(self, x: torch.Tensor, ret_feats: bool = False) -> Any:
        self._features.clear()
        out = self.net(x)
        return (out, self._features) if ret_feats else out


def miro(args: argparse.Namespace) -> None:
    import types

    reference_import(args.miro, None)
    sys.modules.setdefault("clip", types.ModuleType("clip"))  # imported by its backbones module for CLIP models only
    from domainbed.algorithms import miro as miro_module

    miro_module.URFeaturizer = TimmURFeaturizer

    data: dict[str, Any] = {"hosts": {}}
    with tinycase.numerics("float64"):
        ours = tinycase.build_dgzoo("miro", {})
        hp = ours.resolved_hparams["miro"]
        initial = {k: v.detach().clone() for k, v in ours.host.state_dict().items()}
        hparams = _HParams(
            lr=tinycase.LR,
            weight_decay=0.0,
            optimizer="adam",
            ld=hp["ld"],
            lr_mult=hp["lr_mult"],
            feat_layers="stem_block",
            resnet_dropout=0.0,
        )
        torch.manual_seed(tinycase.INIT_SEED)
        theirs = miro_module.MIRO(SHAPE, NUM_CLASSES, NUM_DOMAINS, hparams)
        where = {}
        for key in initial:
            if key.startswith("network.fc."):
                where[key] = "classifier." + key[len("network.fc.") :]
            elif key.startswith("network."):
                where[key] = "featurizer.net." + key[len("network.") :]
            elif key.startswith("reference.") and not key.startswith("reference.fc."):
                where[key] = "pre_featurizer.net." + key[len("reference.") :]
            elif key.startswith("variances."):
                where[key] = f"var_encoders.{key.split('.')[1]}.b"
        state = dict(theirs.state_dict(keep_vars=True))
        with torch.no_grad():
            for key, theirs_key in where.items():
                state[theirs_key].copy_(initial[key].view_as(state[theirs_key]))
        updates = []
        for update in range(UPDATES):
            tinycase.seed_everything(update)
            batches = tinycase.minibatches(update)
            metrics = theirs.update([b[0] for b in batches], [b[1] for b in batches])
            now = {k: state[t].detach().reshape(initial[k].shape) for k, t in where.items()}
            updates.append(
                {
                    "metrics": {"loss": float(metrics["loss"])},
                    "state": tinycase.changes(now, {k: initial[k] for k in where}),
                }
            )
    data["hosts"]["miro"] = {
        "reference": {
            "repository": "https://github.com/kakaobrain/miro",
            "commit": commit_of(args.miro),
            "file": "domainbed/algorithms/miro.py",
        },
        "overrides": {},
        "hparams": dict(hparams),
        "dtype": "float64",
        "tolerance": "float64",
        "initial": tinycase.total(tinycase.digests({k: initial[k] for k in where})),
        "updates": updates,
    }
    print(f"miro: losses {[u['metrics'] for u in updates]}")
    tinycase.save("miro.json", data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="reference", required=True)
    p = sub.add_parser("domainbed", help="the DomainBed hosts from domainbed/algorithms.py")
    p.add_argument("--domainbed", type=Path, required=True, help="a DomainBed checkout")
    p.add_argument("--site", type=Path, help="a folder of packages DomainBed imports (BackPACK for Fishr)")
    p.add_argument("--only", nargs="*", help="regenerate these hosts only, keeping the others")
    p.add_argument("--compare", action="store_true", help="also run dgzoo and print where it differs")
    p.set_defaults(run=domainbed)
    p = sub.add_parser("sharpness", help="SAM, GSAM and SAGM from their official optimizers")
    p.add_argument("--sam", type=Path, required=True, help="a davda54/sam checkout")
    p.add_argument("--gsam", type=Path, required=True, help="a juntang-zhuang/GSAM checkout")
    p.add_argument("--sagm", type=Path, required=True, help="a Wang-pengfei/SAGM checkout")
    p.set_defaults(run=sharpness)
    p = sub.add_parser("ema", help="the EMA add-on from the installed timm's ModelEmaV3")
    p.set_defaults(run=ema)
    p = sub.add_parser("swad", help="SWAD's loss valley from the official khanrc/swad code")
    p.add_argument("--swad", type=Path, required=True, help="a khanrc/swad checkout")
    p.set_defaults(run=swad)
    p = sub.add_parser("mixing", help="MixStyle and EFDMix from their released modules")
    p.add_argument("--mixstyle", type=Path, required=True, help="a KaiyangZhou/mixstyle-release checkout")
    p.add_argument("--efdm", type=Path, required=True, help="a YBZh/EFDM checkout")
    p.set_defaults(run=mixing)
    p = sub.add_parser("miro", help="MIRO from the official kakaobrain/miro algorithm")
    p.add_argument("--miro", type=Path, required=True, help="a kakaobrain/miro checkout")
    p.set_defaults(run=miro)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    global COMPARE
    COMPARE = getattr(args, "compare", False)
    args.run(args)


if __name__ == "__main__":
    main()
