"""Fault injection, second round (issue 26): data loss, silent wrong results, lost work, hangs, tracebacks and
messages found by held-out fault injection. Each test reproduces the fault and checks dgzoo's one-line answer and
that nothing already written is lost (README, "What dgzoo guarantees").
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from dgzoo.errors import DGZooError
from dgzoo.run.claim import CLAIM_FILE, RunDirClaimed, claim_holder, claim_run_dir


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---------------------------------------------------------------------- claims across hosts


def _foreign_claim(run_dir: Path, mtime: float, heartbeat_s: float = 0.1) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CLAIM_FILE
    path.write_text(
        json.dumps({"pid": 1, "host": "other-node", "purpose": "dgzoo train erm", "heartbeat_s": heartbeat_s})
    )
    os.utime(path, (mtime, mtime))
    return path


def test_a_live_claim_from_a_host_whose_clock_lags_is_not_taken_over(tmp_path):
    # Another node's clock is 10 minutes behind: its heartbeat looks 10 minutes old here, but it keeps beating.
    path = _foreign_claim(tmp_path / "run", time.time() - 600)
    stop = threading.Event()

    def beat():
        while not stop.wait(0.05):
            t = time.time() - 600
            os.utime(path, (t, t))

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    try:
        assert claim_holder(tmp_path / "run")["host"] == "other-node"
        with pytest.raises(RunDirClaimed, match="in use by dgzoo train erm"):
            with claim_run_dir(tmp_path / "run", "second"):
                pass
        assert json.loads(path.read_text())["host"] == "other-node"  # its claim was not replaced
    finally:
        stop.set()
        beating.join()
    assert claim_holder(tmp_path / "run") is None  # once it stops beating, the claim is stale


def test_a_claim_whose_heartbeat_lies_in_the_future_does_not_block_once_it_stops(tmp_path):
    _foreign_claim(tmp_path / "run", time.time() + 3600)  # a dead job on a host whose clock is an hour ahead
    start = time.monotonic()
    with claim_run_dir(tmp_path / "run", "second"):
        assert claim_holder(tmp_path / "run")["purpose"] == "second"
    assert time.monotonic() - start < 10


def test_a_claim_on_a_full_disk_is_one_line_and_leaves_no_claim(tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        if "w" in mode and CLAIM_FILE in str(file):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(DGZooError, match=rf"cannot write .*run/{CLAIM_FILE}: no space left on the device"):
        with claim_run_dir(tmp_path / "run", "first"):
            pass
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "run").iterdir()] == []  # no claim, no temporary file


def test_an_empty_claim_left_by_a_crash_does_not_block(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CLAIM_FILE).write_text("")
    assert claim_holder(tmp_path / "run") is None
    with claim_run_dir(tmp_path / "run", "next"):
        assert claim_holder(tmp_path / "run")["purpose"] == "next"


# ---------------------------------------------------------------------- unlearning


def _copy_run(trained_run, tmp_path: Path) -> Path:
    import shutil

    run_dir = tmp_path / "source"
    shutil.copytree(trained_run[0], run_dir)
    return run_dir


def test_unlearn_refuses_an_output_dir_that_is_its_source(trained_run, tmp_path):
    from dgzoo.config import UnlearnConfig
    from dgzoo.unlearning.recipe import unlearn

    source = _copy_run(trained_run, tmp_path)
    before = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    with pytest.raises(DGZooError, match=r"--output-dir .* is the source run itself.*choose another --output-dir"):
        unlearn(
            UnlearnConfig(
                str(source), "class=0", method="finetune", output_dir=str(source) + "/", overwrite=True, steps=1
            )
        )
    assert {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()} == before


def test_unlearn_from_a_half_written_results_json_is_one_line(trained_run, tmp_path):
    from dgzoo.config import UnlearnConfig
    from dgzoo.unlearning.recipe import unlearn

    source = _copy_run(trained_run, tmp_path)
    (source / "results.json").write_text((source / "results.json").read_text()[:50])
    with pytest.raises(DGZooError, match=r"results.json is not valid JSON .*--resume"):
        unlearn(UnlearnConfig(str(source), "class=0", method="finetune", output_dir=str(tmp_path / "out"), steps=1))
    assert not (tmp_path / "out").exists()


def test_a_killed_unlearn_is_rerun_with_overwrite(trained_run, tmp_path):
    from dgzoo.config import UnlearnConfig
    from dgzoo.unlearning.recipe import unlearn

    out = tmp_path / "out"
    out.mkdir()  # what `dgzoo unlearn` writes first; then it was killed
    (out / "unlearn_config.json").write_text("{}\n")
    (out / "unlearn.log").write_text("")
    cfg = dict(source=str(trained_run[0]), forget="class=0", method="finetune", output_dir=str(out), steps=1)
    with pytest.raises(DGZooError, match=r"already holds a run; pass --overwrite to replace it"):
        unlearn(UnlearnConfig(**cfg))
    results = unlearn(UnlearnConfig(**cfg, overwrite=True))  # the suggested fix works
    assert (out / "results.json").exists() and results


# ---------------------------------------------------------------------- resume checks what it resumes


def _image_folder(root: Path, domains: dict[str, int], start: int = 0, size: tuple[int, int] = (16, 16)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(start)
    for domain, n in domains.items():
        for i in range(start, start + n):
            folder = root / domain / ("cat" if i % 2 else "dog")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return root


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(tmp_path):
    from dgzoo.training.engine import train

    cfg = tiny_config(tmp_path, steps=6, eval_every=3, checkpoint_every=3)
    train(cfg)
    run_dir = Path(cfg.output_dir)
    (run_dir / "results.json").unlink()  # killed after its last checkpoint, before results.json
    with pytest.raises(DGZooError, match=r"--steps 4 is fewer than the 6 steps .* resume with --steps 6 or more"):
        train(tiny_config(tmp_path, steps=4, eval_every=3, checkpoint_every=3, resume=True))
    assert not (run_dir / "results.json").exists()
    assert train(tiny_config(tmp_path, steps=6, eval_every=3, checkpoint_every=3, resume=True))["steps"] == 6


def test_resume_after_images_were_added_to_a_local_dataset_is_refused(tmp_path):
    from dgzoo.training.engine import train

    data = _image_folder(tmp_path / "data", {"a": 8, "b": 8, "c": 8})
    base = dict(dataset=str(data), target_domains=["c"], image_size=16, eval_every=3, checkpoint_every=3)
    train(tiny_config(tmp_path, steps=3, **base))
    records = (tmp_path / "run" / "records.jsonl").read_text()
    _image_folder(data, {"a": 4, "b": 4}, start=100)  # the user adds images, then resumes
    with pytest.raises(
        DGZooError,
        match=r"dataset .* changed since .* \(24 images then, 32 now\).*redraw the splits"
        r".*restore the dataset",
    ):
        train(tiny_config(tmp_path, steps=6, resume=True, **base))
    assert (tmp_path / "run" / "records.jsonl").read_text() == records


def test_resume_after_a_new_commit_of_a_hub_dataset_is_refused_with_the_commit_to_pin(tmp_path, monkeypatch):
    from dgzoo.training import engine, plan

    real = plan.load_dg_dataset
    commit = {"now": "a" * 40}

    def hub_dataset(name, revision=None, *args):  # a Hub dataset whose main branch moves to a new commit
        data = real(name, None, *args)
        data.revision, data.repo_id = revision or commit["now"], "me/set"
        return data

    monkeypatch.setattr(plan, "load_dg_dataset", hub_dataset)
    base = dict(eval_every=3, checkpoint_every=3)
    engine.train(tiny_config(tmp_path, steps=3, **base))
    commit["now"] = "b" * 40
    with pytest.raises(
        DGZooError,
        match=r"now at commit b{40}, but .* trained on commit a{40}; resume on the "
        r"data it trained on with --revision a{40}",
    ):
        engine.train(tiny_config(tmp_path, steps=6, resume=True, **base))
    results = engine.train(tiny_config(tmp_path, steps=6, resume=True, revision="a" * 40, **base))  # the fix works
    assert results["dataset"]["revision"] == "a" * 40


def test_a_checkpoint_whose_rng_state_was_altered_is_skipped_not_resumed(tmp_path):
    import torch
    from safetensors.torch import load_file

    from dgzoo.training.engine import train

    train(tiny_config(tmp_path / "ref", steps=9, eval_every=3, checkpoint_every=3))
    cfg = tiny_config(tmp_path, steps=6, eval_every=3, checkpoint_every=3)
    train(cfg)
    run_dir = Path(cfg.output_dir)
    (run_dir / "results.json").unlink()
    rng = run_dir / "checkpoints" / "step_6" / "random_states_0.pkl"
    raw = bytearray(rng.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(64)  # same size, other bytes: still unpickles, a different generator state
    rng.write_bytes(bytes(raw))
    train(tiny_config(tmp_path, steps=9, eval_every=3, checkpoint_every=3, resume=True))
    log = (run_dir / "train.log").read_text()
    assert "skipped checkpoint step_6: random_states_0.pkl does not match the checksum" in log
    ref = load_file(tmp_path / "ref" / "run" / "model.safetensors")
    weights = load_file(run_dir / "model.safetensors")
    assert all(torch.equal(ref[k], weights[k]) for k in ref)  # resumed from step_3: exact


# ---------------------------------------------------------------------- eval and push on broken runs


def _cli(args: list[str], capsys) -> tuple[int, str]:
    from dgzoo.cli import main

    code = main(args)
    err = capsys.readouterr().err
    return code, err


def test_eval_refuses_non_finite_weights_as_push_does(trained_run, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    run_dir = _copy_run(trained_run, tmp_path)
    weights = load_file(run_dir / "model.safetensors")
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, run_dir / "model.safetensors", metadata={"format": "pt"})
    code, err = _cli(["eval", str(run_dir), "--dataset", "rotated-digits"], capsys)
    assert code == 2 and "holds non-finite weights" in err and len(err.strip().splitlines()) == 1, err


def test_eval_on_truncated_weights_is_one_line(trained_run, tmp_path, capsys):
    run_dir = _copy_run(trained_run, tmp_path)
    weights = run_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, err = _cli(["eval", str(run_dir), "--dataset", "rotated-digits"], capsys)
    assert code == 2 and "model.safetensors cannot be read" in err and "truncated or corrupt" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_push_of_a_half_written_results_json_names_the_file_and_the_fix(trained_run, tmp_path, capsys):
    from dgzoo.run.hub import push_run

    run_dir = _copy_run(trained_run, tmp_path)
    (run_dir / "results.json").write_text('{"algorithm": "erm", "accur')
    with pytest.raises(
        DGZooError,
        match=r"results.json is not valid JSON .*nothing was pushed: finish it \(dgzoo "
        r"train --config .*train_config.json --resume\)",
    ):
        push_run(run_dir, "me/some-run")  # refused before any Hub call


# ---------------------------------------------------------------------- data that would train silently wrong


def _sixteen_bit_folder(root: Path) -> Path:
    from PIL import Image

    for domain in ("a", "b"):
        for i in range(4):
            folder = root / domain / ("bright" if i % 2 else "dark")
            folder.mkdir(parents=True, exist_ok=True)
            level = 60000 if i % 2 else 20000  # both far above 255: PIL's RGB conversion clips both to white
            Image.fromarray(np.full((8, 8), level, dtype=np.uint16)).save(folder / f"{i}.png")
    return root


def test_sixteen_bit_images_are_scaled_not_clipped_and_convert_says_so(tmp_path, caplog):
    from dgzoo.data import DomainImages, load_dg_dataset
    from dgzoo.data.convert import convert_image_folders
    from dgzoo.data.transforms import ToRGB

    root = _sixteen_bit_folder(tmp_path / "data")
    with caplog.at_level("WARNING"):
        convert_image_folders(root)
    assert "8 image(s) under" in caplog.text and "I;16" in caplog.text and "scales them to 8 bits" in caplog.text
    data = load_dg_dataset(str(root))
    images = DomainImages(data, data.rows_by_domain["a"], ToRGB(), "a")
    pixels = {data.class_names[images.label(i)]: np.asarray(images[i][0]) for i in range(len(images))}
    assert pixels["dark"].shape == (8, 8, 3)
    assert np.all(pixels["dark"] == round(20000 * 255 / 65535)) and np.all(
        pixels["bright"] == round(60000 * 255 / 65535)
    )


def test_a_one_class_dataset_is_refused_before_anything_is_written(tmp_path):
    from PIL import Image

    from dgzoo.training.engine import train

    for domain in ("a", "b", "c"):
        (tmp_path / "data" / domain / "cat").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / "data" / domain / "cat" / f"{i}.png")
    cfg = tiny_config(
        tmp_path, dataset=str(tmp_path / "data"), target_domains=["c"], image_size=16, steps=2, eval_every=2
    )
    with pytest.raises(DGZooError, match=r"has a single class \('cat'\).*would read 1.000.*add the other classes"):
        train(cfg)
    assert not Path(cfg.output_dir).exists()


def test_a_held_out_class_no_source_has_is_said_before_training(tmp_path, capsys):
    from PIL import Image

    from dgzoo.training.engine import train

    data = _image_folder(tmp_path / "data", {"a": 6, "b": 6, "c": 6})
    (data / "c" / "bird").mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (0, i * 60, 0)).save(data / "c" / "bird" / f"{i}.png")
    cfg = tiny_config(tmp_path, dataset=str(data), target_domains=["c"], image_size=16, steps=2, eval_every=2)
    train(cfg)
    log = (Path(cfg.output_dir) / "train.log").read_text()
    assert "1 class(es) of the held-out domain(s) appear in no source domain ('bird')" in log


def test_a_one_domain_dataset_gets_advice_that_works(tmp_path):
    from dgzoo.training.engine import train

    data = _image_folder(tmp_path / "data", {"only": 8})
    cfg = tiny_config(tmp_path, dataset=str(data), image_size=16, steps=2, eval_every=2)
    with pytest.raises(DGZooError, match=r"has a single domain \('only'\).*needs two or more.*root/<domain>/<class>"):
        train(cfg)
    with pytest.raises(DGZooError, match=r"has a single domain"):  # the same answer whatever domain flag is tried
        train(tiny_config(tmp_path, dataset=str(data), target_domains=["only"], image_size=16, steps=2))
    assert not Path(cfg.output_dir).exists()


def test_one_odd_image_size_does_not_rescale_the_run_silently(tmp_path):
    from PIL import Image

    from dgzoo.data import load_dg_dataset
    from dgzoo.training.derived import resolve_image_size

    data_dir = _image_folder(tmp_path / "data", {"a": 6, "b": 6, "c": 6}, size=(32, 32))
    Image.new("RGB", (10000, 10)).save(data_dir / "b" / "cat" / "001.png")  # one strip among 32x32 images
    data = load_dg_dataset(str(data_dir))
    size, source, warning = resolve_image_size(tiny_config(tmp_path, dataset=str(data_dir)), data)
    assert size == 32 and "small" in source  # the typical images decide, as without the strip
    assert warning and "far from the typical 32-pixel side (e.g. 10000x10)" in warning


# ---------------------------------------------------------------------- lost work


def test_an_image_corrupted_in_place_after_a_checked_run_is_caught_before_the_next_run(tmp_path):
    from dgzoo.data.verify import ImageDecodeError
    from dgzoo.training.engine import train

    data = _image_folder(tmp_path / "data", {"a": 8, "b": 8, "c": 8})
    base = dict(dataset=str(data), target_domains=["c"], image_size=16, steps=2, eval_every=2)
    train(tiny_config(tmp_path / "first", **base))  # decodes every image once and remembers it
    bad = data / "c" / "cat" / "003.png"
    bad.write_bytes(bad.read_bytes()[:60])  # the same file, corrupted in place
    cfg = tiny_config(tmp_path / "second", **base)
    with pytest.raises(ImageDecodeError, match=r"c/cat/003.png\) does not decode"):
        train(cfg)
    assert not Path(cfg.output_dir).exists()  # refused before anything was written, not at the first evaluation


# ---------------------------------------------------------------------- hangs


@pytest.mark.slow
def test_push_and_zoo_list_end_with_one_line_on_a_hub_that_never_answers(trained_run, tmp_path):
    import socket
    import subprocess
    import sys

    from conftest import subprocess_env

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []  # connections accepted and never answered

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    env = subprocess_env(
        HF_ENDPOINT=f"http://127.0.0.1:{server.getsockname()[1]}",
        HF_TOKEN="hf_test_token",
        DGZOO_HUB_TIMEOUT="0.5",
        HF_HOME=str(tmp_path / "hf"),
    )
    commands = {"zoo list": ["zoo", "list"], "push": ["push", str(_copy_run(trained_run, tmp_path)), "me/some-run"]}
    try:  # both at once: each spends huggingface_hub's bounded retries (about 25 s of waiting) before its line
        procs = {
            name: subprocess.Popen(
                [sys.executable, "-m", "dgzoo", *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, args in commands.items()
        }
        outputs = {name: proc.communicate(timeout=240) for name, proc in procs.items()}
    finally:
        server.close()
        for conn in held:
            conn.close()
    for name, proc in procs.items():
        err = outputs[name][1]
        assert proc.returncode == 2 and "Traceback" not in err, (name, err[-2000:])
        lines = [line for line in err.splitlines() if line.startswith("dgzoo: error:")]
        assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], (name, err[-2000:])
        assert "cannot reach the Hub" in lines[0] and "timed out" in lines[0], (name, lines[0])


# ---------------------------------------------------------------------- operating-system write errors


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from dgzoo.errors import WriteFailed
    from dgzoo.training.engine import train

    real = Accelerator.save_state

    def fill_disk(self, output_dir=None, **kwargs):
        real(self, output_dir, **kwargs)  # some files written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Accelerator, "save_state", fill_disk)
    cfg = tiny_config(tmp_path, steps=3, eval_every=3, checkpoint_every=3)
    with pytest.raises(
        WriteFailed,
        match=r"cannot write .*checkpoints/step_3: no space left on the device; free "
        r"space there",
    ):
        train(cfg)
    left = [p.name for p in (Path(cfg.output_dir) / "checkpoints").iterdir()]
    assert left == []  # neither the half-written .tmp_step_3 nor a step_3


def test_a_full_disk_during_the_export_is_one_line(tmp_path, monkeypatch):
    import timm

    from dgzoo.errors import WriteFailed
    from dgzoo.run.rundir import save_model

    monkeypatch.setattr(timm.models, "save_for_hf", _no_space)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    with pytest.raises(WriteFailed, match=r"cannot write .*out/model.safetensors: no space left on the device"):
        save_model(model, tmp_path / "out", ["a", "b", "c"], {}, {})
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # the temporary export folder is gone


def test_a_full_disk_while_writing_the_report_and_while_converting_is_one_line(
    trained_run, tmp_path, monkeypatch, capsys
):
    import datasets

    data = _image_folder(tmp_path / "data", {"a": 4, "b": 4})
    monkeypatch.setattr(datasets.Dataset, "to_parquet", _no_space)
    code, err = _cli(["datasets", "convert", str(data), "--output-dir", str(tmp_path / "converted")], capsys)
    assert code == 1 and err.strip().splitlines() == [err.strip()] and "no space left on the device" in err, err
    assert list((tmp_path / "converted" / "data").iterdir()) == []  # no temporary shard left
    monkeypatch.setattr("tempfile.mkstemp", _no_space)
    code, err = _cli(["report", str(trained_run[0]), "--output-dir", str(tmp_path / "report")], capsys)
    assert code == 1 and err.strip().splitlines()[-1].startswith("dgzoo: error: cannot write "), err
    assert "report.md: no space left on the device" in err and "Traceback" not in err, err


def test_a_read_only_output_directory_and_a_too_long_name_are_one_line(tmp_path, monkeypatch, capsys):
    from pathlib import Path as _Path

    long_dir = tmp_path / ("x" * 300)
    args = ["train", "--backbone", "test_resnet", "--steps", "2", "--log-with", "none", "--num-workers", "0"]
    code, err = _cli([*args, "--output-dir", str(long_dir)], capsys)
    assert code == 1 and "a name in the path is too long; use a shorter directory or file name" in err, err
    assert len(err.strip().splitlines()) == 1, err

    real_mkdir = _Path.mkdir

    def read_only(self, *a, **kw):
        if "readonly" in str(self):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(_Path, "mkdir", read_only)
    code, err = _cli([*args, "--output-dir", str(tmp_path / "readonly" / "run")], capsys)
    assert code == 1 and "readonly/run: the file system is read-only; write to a writable directory" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_report_on_a_half_written_results_json_names_the_file(trained_run, tmp_path, capsys):
    run_dir = _copy_run(trained_run, tmp_path)
    (run_dir / "results.json").write_text('{"algorithm": "erm", "acc')
    code, err = _cli(["report", str(run_dir)], capsys)
    assert code == 2 and "no finished run" in err and f"{run_dir.resolve()}: results.json: invalid JSON" in err, err


# ---------------------------------------------------------------------- tracebacks and messages on bad input


def test_datasets_inspect_on_an_unreadable_image_is_one_line_naming_it(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", {"a": 4, "b": 4})
    bad = data / "a" / "cat" / "001.png"
    bad.write_bytes(bad.read_bytes()[:40])  # not even a header
    code, err = _cli(["datasets", "inspect", str(data)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "a/cat/001.png) cannot be read" in err and "replace or remove it" in err, err


def test_an_empty_parquet_is_one_line(tmp_path):
    import datasets

    from dgzoo.data import load_dg_dataset

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("string"), "domain": datasets.Value("string")}
    )
    datasets.Dataset.from_dict({"image": [], "label": [], "domain": []}, features=features).to_parquet(
        tmp_path / "empty.parquet"
    )
    with pytest.raises(DGZooError, match=r"empty.parquet hold\(s\) no rows"):
        load_dg_dataset(str(tmp_path / "empty.parquet"))


def test_a_negative_seed_is_refused_before_anything_is_written(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, err = _cli(
        [
            "train",
            "--backbone",
            "test_resnet",
            "--steps",
            "2",
            "--seed",
            "-1",
            "--log-with",
            "none",
            "--num-workers",
            "0",
            "--output-dir",
            str(run_dir),
        ],
        capsys,
    )
    assert code == 2 and "--seed must be in [0, 2**32), got -1" in err, err
    assert not run_dir.exists()  # so the corrected rerun is not refused


def test_a_raw_bytes_image_column_trains(tmp_path):
    import io as _io

    import datasets
    from PIL import Image

    from dgzoo.training.engine import train

    rng = np.random.default_rng(0)
    images, labels, domains = [], [], []
    for domain in ("x", "y", "z"):
        for i in range(8):
            buf = _io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
            images.append(buf.getvalue())
            labels.append("cat" if i % 2 else "dog")
            domains.append(domain)
    datasets.Dataset.from_dict({"image": images, "label": labels, "domain": domains}).to_parquet(
        tmp_path / "raw.parquet"
    )  # the image column is plain binary, not datasets.Image
    results = train(
        tiny_config(
            tmp_path, dataset=str(tmp_path / "raw.parquet"), target_domains=["z"], image_size=16, steps=2, eval_every=2
        )
    )
    assert results["splits"]["z"]["in"] + results["splits"]["z"]["out"] == 8


STALLED_PEER = r"""
import os, sys, time
from dgzoo.algorithms.erm import ERM
from dgzoo.cli import main

real = ERM.loss
def loss(self, minibatches, step):
    if step == 2 and os.environ["RANK"] == "1":
        time.sleep(300)  # this process hangs (a stuck file system, a debugger...); its peer must not wait forever
    return real(self, minibatches, step)
ERM.loss = loss
sys.exit(main(["train", "--backbone", "test_resnet", "--steps", "6", "--batch-size", "8", "--eval-every", "6",
               "--log-with", "none", "--num-workers", "0", "--output-dir", sys.argv[1]]))
"""


@pytest.mark.slow
def test_a_stalled_peer_process_ends_the_run_with_one_line_in_bounded_time(tmp_path):
    import subprocess
    import sys

    from conftest import subprocess_env

    (tmp_path / "stall.py").write_text(STALLED_PEER)
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(tmp_path / "stall.py"),
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=subprocess_env(OMP_NUM_THREADS="1", DGZOO_COLLECTIVE_TIMEOUT="5"),
    )
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    lines = [line for line in output.splitlines() if line.startswith("dgzoo: error:")]
    assert len(lines) == 1 and "another process of this 2-process run stopped or stopped answering" in lines[0], output[
        -3000:
    ]
    assert "continue with: " in lines[0] and "--resume" in lines[0]
    assert elapsed < 180
