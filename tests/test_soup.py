"""Model soups and DiWA (``dgzoo soup``), and the shared initialisation they need (``init_from``).

Two tiny ERM runs start from one short ERM run (``init_from``), on the same split and held-out domain; the soups
are made from them and from copies whose weights or records are changed on purpose.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, plain_timm_logits, record_worker_starts, tiny_config
from dgzoo.errors import DGZooError

HELD_OUT = ["75"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(base, r0, r1): r0 and r1 start from base (init_from), with other seeds and learning rates, one split."""
    from dgzoo.training.engine import train

    tmp = tmp_path_factory.mktemp("soup-runs")
    base = tiny_config(tmp, output_dir=str(tmp / "base"), steps=4, eval_every=4, target_domains=HELD_OUT)
    train(base)
    paths = []
    for i, lr in enumerate((3e-3, 1e-3)):
        cfg = tiny_config(
            tmp,
            output_dir=str(tmp / f"r{i}"),
            steps=4,
            eval_every=2,
            lr=lr,
            seed=i + 1,
            split_seed=0,
            target_domains=HELD_OUT,
            init_from=base.output_dir,
        )
        train(cfg)
        paths.append(tmp / f"r{i}")
    return tmp / "base", paths[0], paths[1]


@pytest.fixture(scope="module")
def uniform_soup(runs, tmp_path_factory):
    from dgzoo.experiments.soup import soup

    out = tmp_path_factory.mktemp("uniform") / "soup"
    results = soup([runs[1], runs[2]], out, method="uniform", bn_steps=3)
    return out, results


def weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


def is_bn_buffer(key):
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


# ---------------------------------------------------------------------- init_from


def test_init_from_starts_the_run_from_the_checkpoint_and_records_it(runs, tmp_path):
    from dgzoo.training.engine import train

    base = runs[0]
    assert json.loads((runs[1] / "results.json").read_text())["init_from"]["run"] == str(base.resolve())
    # One step at a vanishing learning rate: the exported parameters are the checkpoint's, head included.
    cfg = tiny_config(tmp_path, steps=1, eval_every=1, lr=1e-12, seed=7, target_domains=HELD_OUT, init_from=str(base))
    train(cfg)
    start, after = weights(base), weights(tmp_path / "run")
    assert set(start) == set(after)
    for key in start:
        if not is_bn_buffer(key):
            assert torch.allclose(start[key], after[key], atol=1e-6), key


def test_init_from_refuses_another_architecture_or_other_labels_before_writing(runs, tmp_path):
    from dgzoo.training.engine import train

    base = runs[0]
    with pytest.raises(DGZooError, match=r"holds a test_resnet .* --backbone is resnet18"):
        train(tiny_config(tmp_path, backbone="resnet18", init_from=str(base), target_domains=HELD_OUT))
    with pytest.raises(DGZooError, match=r"predicts classes 0, 1, .* the dataset has 5-9, 0-4"):
        train(tiny_config(tmp_path, dataset="colored-digits", init_from=str(base)))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- averaging


def test_uniform_soup_is_the_parameter_average_with_batchnorm_recomputed(runs, uniform_soup):
    from dgzoo.algorithms.averaging import recompute_batchnorm
    from dgzoo.experiments.soup import SoupSettings, collect_ingredients, soup_config
    from dgzoo.models import create_backbone, data_config
    from dgzoo.training.engine import build_loop_data, create_accelerator, plan_run
    from dgzoo.training.loop import source_batches

    out, results = uniform_soup
    a, b, soup = weights(runs[1]), weights(runs[2]), weights(out)
    average = {k: (a[k].double() + b[k].double()).div(2).float() for k in a if a[k].is_floating_point()}
    for key, value in average.items():
        if not is_bn_buffer(key):
            assert torch.allclose(soup[key], value, atol=1e-6), key
    # BatchNorm statistics: recomputed on 3 source training batches, not averaged.
    bn = [k for k in soup if k.endswith("running_var")]
    assert bn and all(int(soup[k.replace("running_var", "num_batches_tracked")]) == 3 for k in bn)
    assert any(not torch.allclose(soup[k], average[k]) for k in bn)
    # ... the same statistics as recomputing them by hand on the same batches.
    cfg = soup_config(collect_ingredients([runs[1]])[0], out, True, SoupSettings())
    plan = plan_run(cfg)  # overwrite=True: the soup's own directory passes the output check
    network = create_backbone("test_resnet", 10, False, plan.image_size)
    network.load_state_dict({**network.state_dict(), **average})
    loop_data, _ = build_loop_data(plan, data_config(network, plan.image_size), 0, False)
    recompute_batchnorm(network, source_batches(loop_data, create_accelerator("no"), 0)(3))
    state = network.state_dict()
    for key in bn:
        assert torch.allclose(soup[key], state[key], atol=1e-5), key

    assert results["soup"]["used"] == 2 and [i["run"] for i in results["soup"]["ingredients"]] == [
        str(runs[1].resolve()),
        str(runs[2].resolve()),
    ]
    assert results["soup"]["shared_init"] and not results["soup"]["warnings"]
    assert set(results["accuracy"]) == {"0", "15", "30", "45", "60", "75"}
    card = (out / "README.md").read_text()
    assert "## Weight average (uniform soup)" in card and "| `r0` |" in card and "| `r1` |" in card
    assert "dgzoo soup" in card and "library_name: timm" in card
    for name in (
        "config.json",
        "model.safetensors",
        "results.json",
        "records.jsonl",
        "train_config.json",
        "accuracy_per_domain.png",
    ):
        assert (out / name).is_file(), name


def test_soup_loads_with_plain_timm_in_a_fresh_process(uniform_soup, tmp_path):
    from dgzoo.run.hub import from_pretrained

    out, _ = uniform_soup
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = from_pretrained(out).model(x)
    assert torch.allclose(plain_timm_logits(out, x, tmp_path), expected, atol=1e-5)


def _copy_with(run_dir, dest, change=None, results_change=None, config_change=None):
    shutil.copytree(run_dir, dest)
    if change is not None:
        state = weights(dest)
        change(state)
        save_file(state, str(dest / "model.safetensors"))
    for name, edit in (("results.json", results_change), ("config.json", config_change)):
        if edit is not None:
            data = json.loads((dest / name).read_text())
            edit(data)
            (dest / name).write_text(json.dumps(data))
    return dest


def test_greedy_keeps_the_best_ingredient_when_every_addition_lowers_source_validation(uniform_soup, tmp_path):
    from dgzoo.experiments.soup import soup

    good = _copy_with(uniform_soup[0], tmp_path / "good")

    def scale_head(factor):
        def change(state):
            for key in ("fc.weight", "fc.bias"):
                state[key] = state[key] * factor

        return change

    # Averaged with the good network, these cancel its head (-1: logits 0) or reverse it (-3): worse soups.
    cancel = _copy_with(good, tmp_path / "cancel", scale_head(-1.0))
    reverse = _copy_with(good, tmp_path / "reverse", scale_head(-3.0))
    results = soup([cancel, good, reverse], tmp_path / "greedy", method="greedy", bn_steps=2)
    trace = results["soup"]["greedy"]
    assert trace[0]["ingredient"] == str(good.resolve()) and trace[0]["kept"]
    assert [step["kept"] for step in trace[1:]] == [False, False]
    assert all(step["source_val_acc"] < trace[0]["source_val_acc"] for step in trace[1:])
    used = [i["name"] for i in results["soup"]["ingredients"] if i["used"]]
    assert used == [str(good.resolve())] and results["soup"]["used"] == 1
    # top-k picks by the ingredients' own source validation, the good one first.
    top = soup([cancel, good, reverse], tmp_path / "top1", method="top-k", k=1, bn_steps=2)
    assert [i["name"] for i in top["soup"]["ingredients"] if i["used"]] == [str(good.resolve())]


def test_a_greedy_soup_starts_its_evaluation_workers_once(uniform_soup, tmp_path, monkeypatch):
    """Every ingredient and every candidate is scored on every domain split through one evaluation loader, whose
    workers start once per soup (before: one loader, with its own workers, per domain split)."""
    from dgzoo.experiments.soup import soup

    good = _copy_with(uniform_soup[0], tmp_path / "good")
    other = _copy_with(good, tmp_path / "other")
    started = record_worker_starts(monkeypatch)
    results = soup([good, other], tmp_path / "greedy", method="greedy", bn_steps=2, num_workers=1)
    assert len(results["soup"]["greedy"]) == 2
    assert started.count("SplitsDataset") == 1 and "DomainImages" not in started, started


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "what, results_change, config_change",
    [
        ("split seed", lambda r: r.update(split_seed=3), None),
        ("held-out domains", lambda r: r.update(target_domains=["60"]), None),
        ("dataset revision", lambda r: r["dataset"].update(revision="abc"), None),
        ("label names", None, lambda c: c.update(label_names=[str(9 - i) for i in range(10)])),
        ("architecture", None, lambda c: c.update(architecture="resnet18")),
    ],
)
def test_incompatible_ingredients_are_refused_before_anything_is_written(
    runs, tmp_path, what, results_change, config_change
):
    from dgzoo.experiments.soup import soup

    other = _copy_with(runs[2], tmp_path / "other", results_change=results_change, config_change=config_change)
    with pytest.raises(DGZooError, match=f"has {what} ") as error:
        soup([runs[1], other], tmp_path / "soup")
    assert "\n" not in str(error.value) and not (tmp_path / "soup").exists()


def test_unshared_initialisation_is_a_warning_and_a_sweep_folder_needs_one_cell(runs, tmp_path):
    from dgzoo.experiments.soup import check_compatible, collect_ingredients, soup

    scratch = _copy_with(runs[2], tmp_path / "sweep" / "scratch", results_change=lambda r: r.update(init_from=None))
    warnings = check_compatible(collect_ingredients([runs[1], scratch]))
    assert len(warnings) == 1 and "do not share an initialisation" in warnings[0] and "init_from" in warnings[0]

    _copy_with(runs[1], tmp_path / "sweep" / "a")
    _copy_with(runs[1], tmp_path / "sweep" / "b", results_change=lambda r: r.update(split_seed=5))
    with pytest.raises(
        DGZooError,
        match=r"holds runs of 2 cells \(rotated-digits/erm/75/trial0, "
        r"rotated-digits/erm/75/trial5\); pass --cell",
    ):
        soup([tmp_path / "sweep"], tmp_path / "soup")
    found = collect_ingredients([tmp_path / "sweep"], cell="rotated-digits/erm/75/trial0")
    assert sorted(i.run_dir.name for i in found) == ["a", "scratch"]
    assert not (tmp_path / "soup").exists()


def test_cli_refuses_top_k_without_k_in_one_line(runs, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dgzoo.cli",
            "soup",
            str(runs[1]),
            str(runs[2]),
            "--output-dir",
            str(tmp_path / "soup"),
            "--method",
            "top-k",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "--method top-k needs --k between 1 and the 2 ingredients" in proc.stderr
    assert not (tmp_path / "soup").exists()


# ---------------------------------------------------------------------- report and sweep spec


def test_report_shows_the_soup_beside_the_runs(runs, uniform_soup, tmp_path):
    from dgzoo.experiments.report import report_dirs

    for path in (runs[1], runs[2], uniform_soup[0]):
        shutil.copytree(path, tmp_path / "all" / path.name)
    report = report_dirs([tmp_path / "all"], ["training_domain_validation"])
    rows = report.tables[0].rows
    assert "erm" in rows and "erm (uniform soup of 2)" in rows
    soup_cell = rows["erm (uniform soup of 2)"][0]
    assert soup_cell.n == 1 and abs(soup_cell.mean - 100 * uniform_soup[1]["target_accuracy"]) < 1e-9


def test_sweep_spec_soup_section_is_validated():
    from dgzoo.experiments.sweep import SweepSpec

    base = {"datasets": ["rotated-digits"], "algorithms": ["erm"], "output_dir": "x"}
    spec = SweepSpec.from_dict({**base, "soup": {"methods": ["uniform", "greedy"], "bn_steps": 10}})
    assert spec.soup == {"methods": ["uniform", "greedy"], "bn_steps": 10} and spec.to_dict()["soup"] == spec.soup
    assert "soup" not in SweepSpec.from_dict(base).to_dict()  # existing sweeps keep their manifest (and zoo id)
    with pytest.raises(DGZooError, match=r"soup method 'greedi'.*did you mean: greedy"):
        SweepSpec.from_dict({**base, "soup": {"methods": ["greedi"]}})
    with pytest.raises(DGZooError, match="k goes with the top-k method"):
        SweepSpec.from_dict({**base, "soup": {"methods": ["top-k"]}})
    with pytest.raises(DGZooError, match="unknown key 'bn_step'"):
        SweepSpec.from_dict({**base, "soup": {"bn_step": 3}})


# ---------------------------------------------------------------------- Hub ingredients


HUB_SOUP = """
import json, sys
import huggingface_hub
from dgzoo.run.hub import push_run
from dgzoo.experiments.soup import soup
r0, r1, repo_a, repo_b, out = sys.argv[1:6]
push_run(r0, repo_a)
push_run(r1, repo_b)
sha = huggingface_hub.HfApi().model_info(repo_a).sha
results = soup([f"{repo_a}@{sha}", repo_b], out, bn_steps=2)
print(json.dumps({"sha": sha, "ingredients": results["soup"]["ingredients"]}))
"""


@pytest.mark.slow
def test_soup_of_hub_ingredients_pins_their_revisions(runs, hub_server, tmp_path):
    repo_a, repo_b = hub_server.unique_repo_id("soup-a"), hub_server.unique_repo_id("soup-b")
    out = tmp_path / "hub-soup"
    proc = subprocess.run(
        [sys.executable, "-c", HUB_SOUP, str(runs[1]), str(runs[2]), repo_a, repo_b, str(out)],
        env=hub_server.env(tmp_path / "hf", token=True, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    first, second = answer["ingredients"]
    assert (first["repo_id"], first["revision"]) == (repo_a, answer["sha"])
    assert second["repo_id"] == repo_b and len(second["revision"]) == 40  # the commit `main` resolved to
    a, b, soup = weights(runs[1]), weights(runs[2]), weights(out)
    assert torch.allclose(soup["fc.weight"], (a["fc.weight"] + b["fc.weight"]) / 2, atol=1e-6)
    card = (out / "README.md").read_text()
    assert f"[`{repo_a}`](https://huggingface.co/{repo_a}) @ `{answer['sha'][:12]}`" in card
    assert hub_server.errors == []


@pytest.mark.slow
def test_soups_benchmark_runs_at_smoke_size(tmp_path):
    """benchmarks/soups.py end to end on one spec: shared init, the sweep with its soup: section, the tables."""
    out = tmp_path / "soups.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "soups.py"),
            "--smoke",
            "--root",
            str(tmp_path / "sweeps"),
            "--specs",
            str(ROOT / "benchmarks" / "sweeps" / "soups_rotated_digits.yaml"),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| rotated-digits |"))
    assert row.count(" X ") == 0 and row.rstrip().endswith("| 1 |")  # every column filled, one trial
    assert "erm (uniform soup of 2)" in text and "erm (greedy soup of 2)" in text and "erm (top-1 soup of 2)" in text
    soups = sorted(p.name for p in (tmp_path / "sweeps" / "soups-rotated-digits" / "soups").iterdir())
    assert soups == [
        "rotated-digits-erm-75-greedy_soup-trial0",
        "rotated-digits-erm-75-topk_soup-trial0",
        "rotated-digits-erm-75-uniform_soup-trial0",
    ]


# ---------------------------------------------------------------------- provenance


def test_soup_records_the_provenance_a_trained_run_does_and_its_ingredients_identities(runs, uniform_soup):
    from dgzoo.run.identity import identity_key, run_identity
    from dgzoo.run.provenance import code_version

    out, results = uniform_soup
    ingredient = json.loads((runs[1] / "results.json").read_text())
    assert results["code"] == code_version() == ingredient["code"]
    assert results["dataset"]["fingerprint"] == ingredient["dataset"]["fingerprint"]
    assert json.loads((out / "results.json").read_text())["code"] == results["code"]
    recipe = json.loads((out / "train_config.json").read_text())
    recorded = json.loads((runs[1] / "train_config.json").read_text())["provenance"]
    assert recipe["provenance"]["code"] == recorded["code"] and recipe["provenance"]["dataset"] == recorded["dataset"]
    identities = [run_identity(json.loads((r / "results.json").read_text())) for r in runs[1:]]
    assert [i["identity"] for i in results["soup"]["ingredients"]] == identities
    assert recipe["provenance"]["ingredients"] == identities

    # A soup is its method and its ingredients' identities: not where the ingredients lay (a copy of the same runs
    # elsewhere is the same soup), but another ingredient (here: another seed) is another soup.
    moved = json.loads(json.dumps(results))
    for i in moved["soup"]["ingredients"]:
        i["name"] = i["run"] = "/elsewhere/" + str(i["name"]).rsplit("/", 1)[-1]
    assert identity_key(moved) == identity_key(results)
    other = json.loads(json.dumps(results))
    other["soup"]["ingredients"][1]["identity"]["seeds"]["seed"] = 99
    assert identity_key(other) != identity_key(results)
    assert identity_key({**results, "soup": {**results["soup"], "method": "greedy"}}) != identity_key(results)


@pytest.mark.slow
def test_a_pushed_soup_holds_no_absolute_local_path(runs, uniform_soup, hub_server, tmp_path):
    from test_hub import dgzoo_cli, ok, run

    out, _ = uniform_soup
    repo = hub_server.unique_repo_id("soup-paths")
    before = {p for p in hub_server.storage_dir.rglob("*") if p.is_file()}  # other tests' pushes: not this soup's
    ok(run(hub_server, tmp_path / "hf", dgzoo_cli("push", out, repo)))
    secrets = [str(runs[1].parent), str(out.parent)]
    assert any(s in (out / "results.json").read_text() for s in secrets)  # kept locally: the soup can be remade
    stored = [p for p in hub_server.storage_dir.rglob("*") if p.is_file() and p not in before]
    published = [p for p in stored if b"uniform soup of 2" in p.read_bytes()]
    assert published, "the soup's card was not pushed"
    leaks = [str(p) for p in stored if any(s.encode() in p.read_bytes() for s in secrets)]
    assert leaks == []
    assert hub_server.errors == []
