"""Run the official khanrc/swad LossValley on loss sequences and write each segment's weight in its final model.

Each segment's parameter is the one-hot vector e_i (float64), so the final model's parameter is the vector of the
segments' weights. Not imported by the tests: it needs a khanrc/swad checkout outside this repository, e.g.
    git clone https://github.com/khanrc/swad /tmp/ref/swad
    PYTHONPATH=/tmp/ref/swad python tests/data/make_swad_lossvalley.py $(git -C /tmp/ref/swad rev-parse HEAD) out.json
then keep losses, segments, hparams, converge_step, dead and weights of each case in
tests/data/swad_lossvalley_reference.json (the committed data came from commit 252190e).
"""

import json
import logging
import random
import sys

import torch
from domainbed import swad as swad_module
from domainbed.lib import swa_utils
from torch import nn

swa_utils.AveragedModel.cuda = lambda self: self  # CPU only


class Eval:
    logger = logging.getLogger("ref")


def run(losses, steps_per_segment, n_converge, n_tolerance, tolerance_ratio):
    n = len(losses)
    valley = swad_module.LossValley(Eval(), n_converge, n_tolerance, tolerance_ratio)
    segments = []
    for i, loss in enumerate(losses):
        net = nn.Module()
        net.w = nn.Parameter(torch.zeros(n, dtype=torch.float64))
        with torch.no_grad():
            net.w[i] = 1.0
        seg = swa_utils.AveragedModel(net)
        start, end = i * steps_per_segment + 1, (i + 1) * steps_per_segment
        for s in range(start, end + 1):
            seg.update_parameters(net, step=s)
        segments.append([start, end])
        valley.update_and_evaluate(seg, 0.0, loss, lambda *a: None)
        if valley.dead_valley:  # the official trainer stops here
            break
    final = valley.get_final_model()
    n_averaged = int(getattr(final, "n_averaged", torch.tensor(-1)))
    module = final.module if isinstance(final, swa_utils.AveragedModel) and hasattr(final.module, "w") else final
    if hasattr(module, "module"):
        module = module.module
    weights = module.w.detach().tolist()
    return {
        "losses": losses,
        "segments": segments,
        "n_converge": n_converge,
        "n_tolerance": n_tolerance,
        "tolerance_ratio": tolerance_ratio,
        "converge_step": valley.converge_step,
        "dead": bool(valley.dead_valley),
        "n_averaged": n_averaged,
        "official_start_end": [getattr(final, "start_step", None), getattr(final, "end_step", None)],
        "weights": weights,
    }


cases = []
# converges at its third evaluation (the oldest of the first three is the lowest)
cases.append(run([0.5, 0.6, 0.7, 0.55, 0.6, 0.58, 0.62, 0.61, 0.66, 0.7], 2, 3, 6, 0.3))
# the 60-step run of issue 23 (evaluations every 4 steps, converged at step 4)
cases.append(
    run([0.40, 0.45, 0.50, 0.48, 0.47, 0.49, 0.50, 0.46, 0.52, 0.55, 0.51, 0.53, 0.50, 0.49, 0.54], 4, 3, 6, 0.3)
)
# the hand-worked curve of tests/test_averaging.py, 15 evaluations and cut at 12
hand = [2.0, 1.5, 1.0, 0.8, 0.9, 0.85, 0.95, 1.0, 0.9, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7]
cases.append(run(hand, 2, 3, 6, 0.3))
cases.append(run(hand[:12], 2, 3, 6, 0.3))
cases.append(run(hand[:9], 2, 3, 3, 0.3))
cases.append(run(hand, 2, 3, 3, 0.3))
# never converges (strictly decreasing): the official final model is the last segment
cases.append(run([1.0, 0.9, 0.8, 0.7, 0.6], 3, 3, 6, 0.3))
rng = random.Random(23)
for _ in range(24):
    n = rng.randint(3, 24)
    dip = rng.uniform(0.1, 0.9)
    losses = [round(abs(1.0 + 2.0 * (t / n - dip) ** 2 + rng.gauss(0, 0.12)), 4) for t in range(n)]
    n_c, n_t = rng.choice([(3, 6), (3, 6), (3, 6), (3, 3), (4, 2), (2, 5), (1, 1), (3, 8)])
    cases.append(run(losses, rng.randint(1, 5), n_c, n_t, rng.choice([0.0, 0.05, 0.3])))
with open(sys.argv[2], "w") as f:
    json.dump({"reference": "khanrc/swad " + sys.argv[1], "cases": cases}, f)
