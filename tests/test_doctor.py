"""`dgzoo doctor` against the local Hub server: token found or not (never its value), write access, offline."""

import subprocess
import sys

import pytest

from conftest import ROOT
from dgzoo.cli.doctor import format_checks, hub_checks, launch_processes, write_access


def doctor(server, hf_home, token=True, **env):
    proc = subprocess.run(
        [sys.executable, "-m", "dgzoo.cli", "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
        env=server.env(hf_home, token=token, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env),
    )
    return proc.returncode, proc.stdout + proc.stderr


def line(output, topic):
    return [row for row in output.splitlines() if row[7:].startswith(topic)]


def test_with_a_write_token(hub_server, tmp_path):
    code, out = doctor(hub_server, tmp_path / "hf")
    assert code == 0, out
    assert hub_server.token not in out
    assert line(out, "hub")[0].endswith(f"endpoint {hub_server.endpoint} (set by HF_ENDPOINT)")
    assert line(out, "token")[0].startswith("[ok  ] token      found (from HF_TOKEN; value not shown)")
    assert line(out, "access")[0] == "[ok  ] access     write token of testuser: may push to testuser/"
    assert f"Hub cache (models, dataset files): {tmp_path / 'hf' / 'hub'}" in out
    assert "`accelerate launch recipes/train.py` would start" in line(out, "launch")[0]


@pytest.fixture
def hub_env(hub_server, tmp_path, monkeypatch):
    """This process's huggingface_hub pointed at the test server, with no token anywhere unless a test sets one."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub_server.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def found(checks, topic):
    return [(c.status, c.found, c.fix) for c in checks if c.topic == topic]


def test_without_a_token_and_with_a_wrong_one(hub_env):
    checks = hub_checks()
    [(status, text, fix)] = found(checks, "token")
    assert status == "warn" and text.startswith("no Hugging Face token found") and "hf auth login" in fix
    assert not found(checks, "access")
    hub_env.setenv("HF_TOKEN", "hf_not_the_right_token_123")
    checks = hub_checks()
    [(status, text, _)] = found(checks, "access")
    assert status == "fail" and text.startswith("the Hub refused the token")
    assert "hf_not_the_right_token_123" not in format_checks(checks)


def test_offline_and_unreachable_hub_are_one_clear_line(hub_server, hub_env):
    from huggingface_hub import constants

    hub_env.setenv("HF_TOKEN", hub_server.token)
    hub_env.setattr(constants, "HF_HUB_OFFLINE", True)
    [(status, text, _)] = found(hub_checks(), "access")
    assert status == "info" and text.startswith("HF_HUB_OFFLINE is set")
    hub_env.setattr(constants, "HF_HUB_OFFLINE", False)
    hub_env.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    [(status, text, fix)] = found(hub_checks(), "access")
    assert status == "warn" and text.startswith("cannot reach http://127.0.0.1:9") and "HF_HUB_OFFLINE=1" in fix


def test_launch_process_count_follows_accelerates_rule():
    assert launch_processes({"num_processes": 4}, gpus=8) == (4, "the Accelerate config file")
    assert launch_processes(None, gpus=8)[0] == 8 and launch_processes(None, gpus=0)[0] == 1
    assert launch_processes({"num_processes": -1}, gpus=2)[0] == 2


def test_fine_grained_token_needs_repo_write_in_its_namespace():
    def me(permissions):
        return {
            "name": "ann",
            "orgs": [],
            "auth": {
                "accessToken": {
                    "role": "fineGrained",
                    "fineGrained": {
                        "scoped": [{"entity": {"type": "user", "name": "ann"}, "permissions": permissions}]
                    },
                }
            },
        }

    assert write_access(me(["repo.content.read", "repo.write"]))[0] is True
    assert write_access(me(["repo.content.read"])) == (False, "fine-grained token of ann without repo.write on ann/")
    assert write_access({"name": "ann", "auth": {"accessToken": {"role": "read"}}})[0] is False


def test_the_endpoint_is_ok_only_when_it_answered(hub_server, hub_env):
    """No token: nothing else contacts the Hub, so the endpoint line itself must (issue 23)."""
    from huggingface_hub import constants

    [(status, text, _)] = found(hub_checks(), "hub")
    assert status == "ok" and text == f"endpoint {hub_server.endpoint}"
    hub_env.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    [(status, text, fix)] = found(hub_checks(), "hub")
    assert status == "fail" and "cannot reach it" in text and "HF_HUB_OFFLINE=1" in fix
    hub_env.setattr(constants, "HF_HUB_OFFLINE", True)
    [(status, text, _)] = found(hub_checks(), "hub")
    assert status == "info" and "not contacted" in text
