"""Two CPU processes (gloo) on the same global batch train the same model as one process."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_processes


def run_recipe(output_dir, nproc, *extra):
    """Run recipes/train.py under torchrun with ``nproc`` CPU processes (1 = plain python)."""
    args = [
        "--backbone",
        "test_resnet",
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--batch-size",
        "8",
        "--log-with",
        "none",
        "--num-workers",
        "0",
        "--output-dir",
        str(output_dir),
        *extra,
    ]
    run_processes(nproc, [ROOT / "recipes" / "train.py", *args])
    return json.loads((output_dir / "results.json").read_text())


@pytest.mark.slow
def test_erm_on_two_processes_matches_one_process(tmp_path):
    # Frozen BatchNorm and no dropout: otherwise each process normalises its own half batch and draws its own
    # dropout masks, as in any DDP run, and equality with one process holds only in distribution.
    one = run_recipe(tmp_path / "one", 1, "--freeze-bn")
    two = run_recipe(tmp_path / "two", 2, "--freeze-bn")
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    a = load_file(tmp_path / "one" / "checkpoints" / "step_6" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoints" / "step_6" / "model.safetensors")
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key
    records_one = [json.loads(r) for r in (tmp_path / "one" / "records.jsonl").read_text().splitlines()]
    records_two = [json.loads(r) for r in (tmp_path / "two" / "records.jsonl").read_text().splitlines()]
    assert [r["acc"] for r in records_one] == [r["acc"] for r in records_two]  # evaluation gathers every sample
    # the logged loss is a mean of per-process means: equal up to float32 summation order, not bit for bit
    assert [r["loss"] for r in records_one] == pytest.approx([r["loss"] for r in records_two], abs=1e-4)
