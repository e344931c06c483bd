"""The smaller faults of issue 23, one test each: every message names the real cause and a fix that works, and
nothing is written before a refusal."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env, tiny_config
from dgzoo.errors import DGZooError

OFFLINE = r"""
import contextlib, io, json, sys
from dgzoo.cli import main
out = {}
for name in sys.argv[2:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["train", "--dataset", name, "--steps", "1", "--log-with", "none", "--output-dir",
                     sys.argv[1] + "/" + name.replace("/", "_")])
    out[name] = [code, err.getvalue()]
print(json.dumps(out))
"""


def test_offline_with_an_empty_cache_says_so_and_how_to_fix_it(tmp_path):
    env = subprocess_env(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        HF_DATASETS_CACHE=str(tmp_path / "datasets"),
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE, str(tmp_path / "runs"), "someone/dg-set", "pacs"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (code, message) in out.items():
        assert code == 2 and len(message.strip().splitlines()) == 1, (name, message)
        assert "not in the local cache" in message and "HF_HUB_OFFLINE is set" in message, message
        assert "unset HF_HUB_OFFLINE" in message and "parquet" not in message
    assert not (tmp_path / "runs").exists()


def _finished(tmp_path):
    from dgzoo.training.engine import train

    cfg = tiny_config(tmp_path, steps=3, eval_every=3, keep_checkpoints=1)
    train(cfg)
    return Path(cfg.output_dir)


def test_a_failing_resume_leaves_the_finished_runs_recipe_alone(tmp_path):
    from dgzoo.training.engine import train

    run_dir = _finished(tmp_path)
    for f in (run_dir / "checkpoints" / "step_3").iterdir():
        if f.suffix in (".bin", ".pkl", ".safetensors"):
            f.write_bytes(b"")
    before = (run_dir / "train_config.json").read_bytes()
    with pytest.raises(DGZooError, match="no intact checkpoint"):
        train(tiny_config(tmp_path, steps=6, eval_every=3, keep_checkpoints=1, resume=True))
    assert (run_dir / "train_config.json").read_bytes() == before  # still says 3 steps: what the run did


def test_resuming_a_checkpoint_of_the_old_format_says_what_works_and_never_overwrite(tmp_path):
    from dgzoo.run.rundir import CHECKPOINT_FORMAT, checkpoint_format
    from dgzoo.training.engine import train

    run_dir = _finished(tmp_path)
    checkpoint = run_dir / "checkpoints" / "step_3"
    assert checkpoint_format(checkpoint) == CHECKPOINT_FORMAT  # the marker every checkpoint now carries
    # dgzoo 0.1's checkpoints: no manifest, and not the objects 0.2 registers (its algorithm module state is absent).
    (checkpoint / "dgzoo_manifest.json").unlink()
    for f in checkpoint.glob("custom_checkpoint_*.pkl"):
        f.unlink()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != "train.log"}
    with pytest.raises(DGZooError) as error:
        train(tiny_config(tmp_path, steps=6, eval_every=3, keep_checkpoints=1, resume=True))
    message = str(error.value)
    assert "older dgzoo" in message and "--overwrite" not in message and len(message.splitlines()) == 1
    assert "dgzoo push" in message and "--output-dir NEW_DIR" in message
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != "train.log"} == before
    # The advice works: the recipe trains again into a new directory.
    command = shlex.split(message.split("another directory: ")[1].replace("NEW_DIR", str(tmp_path / "new")))
    assert command[:4] == ["dgzoo", "train", "--config", str(run_dir / "train_config.json")]
    from dgzoo.cli import main

    assert main([*command[1:], "--log-with", "none", "--num-workers", "0"]) == 0
    assert (tmp_path / "new" / "model.safetensors").is_file()


def test_a_diverged_unlearning_run_ends_in_one_line(trained_run, tmp_path, capsys):
    from dgzoo.cli import main

    out = tmp_path / "diverged"
    code = main(
        [
            "unlearn",
            str(trained_run[0]),
            "--forget",
            "class=3",
            "--method",
            "gradient_ascent",
            "--steps",
            "3",
            "--lr",
            "1e30",
            "--output-dir",
            str(out),
            "--num-workers",
            "0",
        ]
    )
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # above it only the progress bar
    assert code == 2 and "Traceback" not in err and last.startswith("dgzoo: error: unlearning diverged"), err
    assert "lower --lr" in last
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()


def test_a_bare_add_on_hparam_suggests_its_namespaced_name(tmp_path):
    from dgzoo.algorithms import resolve_hparams
    from dgzoo.training.engine import train

    with pytest.raises(DGZooError, match=r"unknown hparam 'rho' for erm \(did you mean: gga\.rho\?\)"):
        resolve_hparams("erm+gga", {"rho": 1})
    assert resolve_hparams("erm+gga", {"gga.rho": 1})["gga"]["rho"] == 1.0  # the suggestion works
    with pytest.raises(DGZooError, match=r"did you mean: gga\.rho"):
        train(tiny_config(tmp_path, algorithm="erm+gga", hparams={"rho": 1}))
    assert not (tmp_path / "run").exists()


def test_registered_names_are_normalised_like_lookups_and_not_replaced_silently(monkeypatch):
    import dataclasses

    from dgzoo.data import REGISTRY, get_spec, register_dataset

    monkeypatch.setattr("dgzoo.data.registry.REGISTRY", REGISTRY.copy())
    from dgzoo.data import registry

    pacs = registry.REGISTRY["pacs"]
    mine = dataclasses.replace(pacs, name="My_Private_Set", title="Mine")
    entry = register_dataset(mine)
    assert entry.name == "my-private-set" and get_spec("My_Private_Set") is entry and get_spec("my-private-set")
    with pytest.raises(DGZooError, match="'pacs' is already registered .*replace=True"):
        register_dataset(dataclasses.replace(pacs, title="Not PACS"))
    with pytest.raises(DGZooError, match="already registered"):
        register_dataset(dataclasses.replace(pacs, name="PACS", title="Not PACS"))
    assert get_spec("pacs") is pacs  # untouched by the refusals
    replaced = register_dataset(dataclasses.replace(pacs, title="Not PACS"), replace=True)
    assert get_spec("pacs") is replaced


def test_trm_is_cited_to_its_authors():
    """Xu & Jaakkola, "Learning Representations that Support Robust Transfer of Predictors", arXiv:2110.09940."""
    from dgzoo.algorithms import ALGORITHMS

    trm = ALGORITHMS["trm"]
    assert "author={Xu, Yilun and Jaakkola, Tommi}" in trm.citation and "2110.09940" in trm.citation
    assert trm.paper.startswith("Xu & Jaakkola")


def test_push_errors_no_retry_can_fix_name_no_retry_command(trained_run, monkeypatch):
    import importlib

    from huggingface_hub import errors as hf_errors
    from huggingface_hub.errors import HfHubHTTPError

    from dgzoo.run import publish as hub  # push_run looks its checks up in the module that defines it

    httpx = importlib.import_module(hf_errors.Response.__module__.split(".")[0])  # the HTTP client huggingface_hub uses

    def http_error(status):
        request = httpx.Request("POST", "http://hub/api/models/me/x/commit/main")
        return HfHubHTTPError(f"{status} error", response=httpx.Response(status, request=request))

    cases = {
        hub.PushRefused("the token's user me cannot write to 'them/'; push to one of those"): False,
        http_error(403): False,
        http_error(400): False,
        http_error(500): True,
        http_error(429): True,
        http_error(401): True,
        httpx.ConnectError("refused"): True,
    }
    for error, expected in cases.items():
        monkeypatch.setattr(hub, "check_push_target", lambda *a, error=error, **k: (_ for _ in ()).throw(error))
        with pytest.raises(DGZooError) as caught:
            hub.push_run(trained_run[0], "me/x")
        assert ("retry with: dgzoo push" in str(caught.value)) is expected, (error, str(caught.value))


def test_push_revision_errors_name_the_push_flag(trained_run):
    from dgzoo.run.hub import push_run

    with pytest.raises(DGZooError, match=r"e\.g\. --revision v1$") as caught:
        push_run(trained_run[0], "me/x", revision="a" * 40)
    assert "--hub-revision" not in str(caught.value)  # `dgzoo push` has no such flag; `dgzoo train` has


def test_the_unlearning_cards_command_is_shell_quoted():
    from dgzoo.config import UnlearnConfig
    from dgzoo.run.unlearning_card import reproduce_command

    config = UnlearnConfig(
        source="runs/my run", forget="class=3 domain=15", hparams={"note": "a b"}, output_dir="x"
    ).to_dict()
    argv = shlex.split(reproduce_command(config).replace("\\\n", " "))
    assert argv == [
        "dgzoo",
        "unlearn",
        "runs/my run",
        "--forget",
        "class=3",
        "--forget",
        "domain=15",
        "--hparams",
        "note=a b",
    ]
    published = shlex.split(
        reproduce_command({**config, "source": "/home/me/runs/my run"}, published=True).replace("\\\n", " ")
    )
    assert published[2] == "my run"  # no local path leaves the machine
