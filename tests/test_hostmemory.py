"""Host memory between steps: a run's process reuses what its steps free instead of faulting it back in from the
kernel, with bit-identical weights, and the user's switch and glibc settings win."""

import json
import os
import subprocess
import sys

import pytest

from dgzoo.training import hostmemory

# One process per setting (mallopt is process-wide): a session is created, then a tiny network trains a few steps
# (its weights' digest), then the same 64 MiB block is allocated, written and freed eight times (the page faults it
# cost: glibc maps a block that large afresh each time unless the session keeps freed memory).
SCRIPT = """
import hashlib, json, resource, torch, timm
from dgzoo.training.session import create_accelerator
create_accelerator("no")
torch.manual_seed(0)
net = timm.create_model("test_resnet", num_classes=4)
opt = torch.optim.Adam(net.parameters(), lr=1e-2)
for step in range(3):
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
digest = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in net.state_dict().values())).hexdigest()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    block = torch.ones(16 * 2**20)
    del block
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"digest": digest, "faults": faults}))
"""


def run_session(**env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in hostmemory.USER_SETTINGS + (hostmemory.ENV,)}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**environment, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hostmemory.glibc(), reason="the setting exists on glibc only")
def test_a_session_reuses_freed_host_memory_and_trains_the_same_weights():
    kept = run_session()
    default = run_session(**{hostmemory.ENV: "0"})
    assert kept["digest"] == default["digest"]  # where memory comes from never changes what is computed
    # glibc's default maps and unmaps the block each time (16384 pages per round); kept, it is faulted in once
    assert kept["faults"] * 3 < default["faults"], (kept, default)


@pytest.mark.skipif(not hostmemory.glibc(), reason="the setting exists on glibc only")
def test_the_users_own_glibc_setting_wins():
    users = run_session(MALLOC_MMAP_THRESHOLD_="65536")  # theirs: blocks above 64 KiB mapped afresh
    assert users["faults"] >= 8 * 16384 * 0.9


def test_the_switch_and_the_users_settings_turn_it_off(monkeypatch):
    monkeypatch.setenv(hostmemory.ENV, "0")
    assert hostmemory.keep_freed_host_memory() is False
    monkeypatch.delenv(hostmemory.ENV)
    for name, value in [("MALLOC_TRIM_THRESHOLD_", "0"), ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=4096")]:
        monkeypatch.setenv(name, value)
        assert hostmemory.keep_freed_host_memory() is False
        monkeypatch.delenv(name)


def test_other_c_libraries_keep_their_own_policy(monkeypatch):
    monkeypatch.delenv(hostmemory.ENV, raising=False)
    monkeypatch.setattr(hostmemory.os, "confstr", lambda name: "musl 1.2", raising=False)
    assert hostmemory.glibc() is False
    assert hostmemory.keep_freed_host_memory() is False
