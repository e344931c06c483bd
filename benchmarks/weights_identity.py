"""The sha256 of every exported tensor of a few short recipes, to check that two dgzoo trees train the same weights.

    PYTHONPATH=/tmp/dgzoo-prev python benchmarks/weights_identity.py prev.json   # a worktree of the previous release
    python benchmarks/weights_identity.py new.json                               # this tree
    diff prev.json new.json
    python benchmarks/weights_identity.py --smoke out.json                      # tiny: checks the script runs

Each recipe is the default job (or an algorithm on it), shortened; results land in a temporary directory. Names after
the output file pick recipes (``... new.json default erm+iu``); none: every recipe below.
"""

import argparse
import hashlib
import json
import sys
import tempfile

from safetensors.torch import load_file

import dgzoo
from dgzoo.config import TrainConfig
from smoke import add_smoke

try:  # a tree from before the layered package (tried first: an editable install may map dgzoo.training)
    from dgzoo.engine import train
except ImportError:
    from dgzoo.training.engine import train

CASES = {
    "default": dict(steps=200, eval_every=100),
    "erm+gga": dict(
        algorithm="erm+gga", steps=40, eval_every=20, hparams={"gga.start": 5, "gga.end": 12, "gga.candidates": 6}
    ),
    "erm+gga_l": dict(algorithm="erm+gga_l", steps=30, eval_every=15),
    "erm+iu": dict(algorithm="erm+iu", steps=24, eval_every=12),
    "equilibrium": dict(algorithm="equilibrium", steps=30, eval_every=15),
    "pcgrad": dict(algorithm="pcgrad", steps=20, eval_every=10),
    # An annealed penalty whose optimizer reset falls inside the run, and an add-on on every step and evaluation.
    "irm": dict(algorithm="irm", steps=30, eval_every=15, hparams={"irm_penalty_anneal_iters": 10}),
    "erm+swad": dict(
        algorithm="erm+swad",
        steps=30,
        eval_every=5,
        hparams={"swad.n_converge": 1, "swad.n_tolerance": 1, "swad.bn_steps": 2},
    ),
}
SMOKE_CASES = {
    "default": dict(backbone="test_resnet", steps=2, eval_every=2, batch_size=4),
    "erm+gga": dict(
        backbone="test_resnet",
        algorithm="erm+gga",
        steps=2,
        eval_every=2,
        batch_size=4,
        hparams={"gga.start": 0, "gga.end": 1, "gga.candidates": 2},
    ),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="JSON file of each recipe's weights' sha256")
    parser.add_argument("cases", nargs="*", help=f"recipes to train (default: all of {', '.join(CASES)})")
    add_smoke(parser)
    args = parser.parse_args()
    cases = SMOKE_CASES if args.smoke else CASES
    if args.smoke:
        print("--smoke: two tiny recipes of test_resnet (the hashes are not comparable with full ones)")
    out = {}
    root = tempfile.mkdtemp()
    print(dgzoo.__file__, file=sys.stderr)
    for name in args.cases or list(cases):
        cfg = TrainConfig.from_dict({**cases[name], "output_dir": f"{root}/{name}", "log_with": "none"})
        res = train(cfg)
        w = load_file(f"{root}/{name}/model.safetensors")
        h = hashlib.sha256()
        for k in sorted(w):
            h.update(k.encode())
            h.update(w[k].contiguous().numpy().tobytes())
        out[name] = {"sha": h.hexdigest(), "target_accuracy": res["target_accuracy"], "step": res["selection"]["step"]}
        print(name, out[name], file=sys.stderr)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
