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
    path.write_text(json.dumps({"pid": 1, "host": "other-node", "purpose": "dgzoo train erm",
                                "heartbeat_s": heartbeat_s}))
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
