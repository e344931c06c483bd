"""The smaller faults of issue 23, one test each: every message names the real cause and a fix that works, and
nothing is written before a refusal."""
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, subprocess_env, tiny_config
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
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
                         HF_DATASETS_CACHE=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", OFFLINE, str(tmp_path / "runs"), "someone/dg-set", "pacs"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (code, message) in out.items():
        assert code == 2 and len(message.strip().splitlines()) == 1, (name, message)
        assert "not in the local cache" in message and "HF_HUB_OFFLINE is set" in message, message
        assert "unset HF_HUB_OFFLINE" in message and "parquet" not in message
    assert not (tmp_path / "runs").exists()
