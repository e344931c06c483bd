"""``dgzoo doctor``: is this machine ready to train, launch and publish? One line per check, with the fix.

    dgzoo doctor            # torch / CUDA / Accelerate, the Hub (endpoint, token, write access), caches, extras

Checks: torch and the devices it sees; Accelerate's configuration and the number of processes
``accelerate launch`` would start; the Hub endpoint, whether a token is found (its value is never printed) and
whether it may write to its user's namespace (one ``whoami`` call; skipped offline); the cache folders and
their free disk; the optional dependencies. Exit status 1 when a check fails (a problem that stops a command),
0 otherwise; warnings are for what works but may surprise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOW_DISK_GIB = 10.0  # below this free space a Hub dataset download (DomainNet: ~20 GB) is likely to fail

OPTIONAL = (
    ("tensorboard", "tensorboard", "`--log-with auto` logs to TensorBoard when installed", "pip install tensorboard"),
    ("submitit", "submitit", "`dgzoo sweep --launcher slurm` submits through it", "pip install submitit"),
)


@dataclass
class Check:
    """One line of the report: ``ok`` / ``info`` / ``warn`` / ``fail``, what was found, and the fix if any."""

    status: str
    topic: str
    found: str
    fix: str = ""


def register_cli(subparsers: Any, groups: dict[str, Any]) -> None:
    """Add ``doctor`` to the ``dgzoo`` parser."""
    doctor = subparsers.add_parser("doctor", help="check torch, CUDA, Accelerate, the Hub token, caches and extras")
    doctor.set_defaults(handler=_doctor)


def torch_checks() -> list[Check]:
    import torch

    checks = [
        Check(
            "ok",
            "torch",
            f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'}), Python {sys.version.split()[0]}",
        )
    ]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        checks.append(Check("ok", "cuda", f"{len(names)} GPU(s): {', '.join(names)}"))
    elif torch.version.cuda:
        checks.append(
            Check(
                "warn",
                "cuda",
                "this torch is built for CUDA but sees no GPU (driver, CUDA_VISIBLE_DEVICES?)",
                "check `nvidia-smi`; training runs on the CPU until a GPU is visible",
            )
        )
    else:
        checks.append(
            Check(
                "info",
                "cuda",
                "CPU-only torch: training runs on the CPU",
                "for a GPU, install a CUDA build of torch (https://pytorch.org/get-started/locally/)",
            )
        )
    return checks


def launch_processes(config: dict[str, Any] | None, gpus: int) -> tuple[int, str]:
    """How many processes ``accelerate launch`` (no flags) starts, and why: its config file's
    ``num_processes``, else one per visible GPU, else one (Accelerate's own rule)."""
    if config and config.get("num_processes") not in (None, -1):
        return int(config["num_processes"]), "the Accelerate config file"
    if gpus > 0:
        return gpus, "no config file: one per visible GPU"
    return 1, "no config file and no GPU: one CPU process"


def accelerate_checks() -> list[Check]:
    import accelerate
    import torch
    import yaml
    from accelerate.commands.config import default_config_file

    checks = []
    config = None
    path = Path(os.environ.get("ACCELERATE_CONFIG_FILE") or default_config_file)
    if path.is_file():
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            checks.append(
                Check(
                    "fail",
                    "accelerate",
                    f"config {path} does not parse ({type(e).__name__})",
                    "run `accelerate config` to write it again",
                )
            )
        else:
            checks.append(
                Check(
                    "ok",
                    "accelerate",
                    f"{accelerate.__version__}, config {path}: "
                    f"{config.get('distributed_type', '?')}, mixed precision "
                    f"{config.get('mixed_precision', 'no')}",
                )
            )
    else:
        checks.append(
            Check(
                "info",
                "accelerate",
                f"{accelerate.__version__}, no config file ({path})",
                "`accelerate config` sets processes and mixed precision once, for every launch",
            )
        )
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    count, why = launch_processes(config, gpus)
    checks.append(
        Check(
            "ok",
            "launch",
            f"`accelerate launch recipes/train.py` would start {count} process(es) "
            f"({why}); `--num_processes N` overrides",
        )
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        checks.append(Check("info", "launch", f"this process is one of {os.environ['WORLD_SIZE']} launched ones"))
    return checks


def token_source() -> str:
    """Where huggingface_hub finds its token: the environment, or the file `hf auth login` writes."""
    from huggingface_hub import constants

    if os.environ.get("HF_TOKEN"):
        return "HF_TOKEN"
    if os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "HUGGING_FACE_HUB_TOKEN"
    return f"`hf auth login` ({constants.HF_TOKEN_PATH})"


def write_access(me: dict[str, Any]) -> tuple[bool, str]:
    """Whether the token behind ``whoami`` output ``me`` may create and write repos in its user's namespace."""
    access = (me.get("auth") or {}).get("accessToken") or {}
    role, user = access.get("role"), me.get("name")
    orgs = [o.get("name") for o in me.get("orgs") or [] if o.get("name")]
    where = f"{user}/" + (f" and orgs {', '.join(orgs)}" if orgs else "")
    if role == "write":
        return True, f"write token of {user}: may push to {where}"
    if role == "fineGrained":
        scoped = (access.get("fineGrained") or {}).get("scoped") or []
        for scope in scoped:
            entity = scope.get("entity") or {}
            if entity.get("name") == user and "repo.write" in (scope.get("permissions") or []):
                return True, f"fine-grained token of {user}: may write repos in {user}/"
        return False, f"fine-grained token of {user} without repo.write on {user}/"
    return False, f"{role or 'unknown-role'} token of {user}: it cannot push"


def hub_checks() -> list[Check]:
    import huggingface_hub
    from huggingface_hub import constants

    from ..run.hub import hub_error_reason

    endpoint = constants.ENDPOINT
    where = f"endpoint {endpoint}" + (" (set by HF_ENDPOINT)" if os.environ.get("HF_ENDPOINT") else "")
    # "ok" only for an endpoint that answered: one anonymous listing request (no retries: a doctor answers fast),
    # whether or not a token is set.
    if constants.HF_HUB_OFFLINE:
        checks = [
            Check(
                "info",
                "hub",
                f"{where}: not contacted, HF_HUB_OFFLINE is set",
                "unset HF_HUB_OFFLINE to check that the Hub can be reached",
            )
        ]
    else:
        try:
            response = huggingface_hub.get_session().get(f"{endpoint}/api/models", params={"limit": 1}, timeout=10)
            huggingface_hub.utils.hf_raise_for_status(response)
            checks = [Check("ok", "hub", where)]
        except Exception as e:
            checks = [
                Check(
                    "fail",
                    "hub",
                    f"{where}: cannot reach it ({hub_error_reason(e)})",
                    "check the connection, proxy or HF_ENDPOINT; set HF_HUB_OFFLINE=1 to work from the cache",
                )
            ]
    token = huggingface_hub.get_token()
    if not token:
        checks.append(
            Check(
                "warn",
                "token",
                "no Hugging Face token found: public downloads work, pushing does not",
                "run `hf auth login`, or set HF_TOKEN, before `--push-to-hub` / `dgzoo push`",
            )
        )
        return checks
    checks.append(Check("ok", "token", f"found (from {token_source()}; value not shown)"))
    if constants.HF_HUB_OFFLINE:
        checks.append(
            Check(
                "info",
                "access",
                "HF_HUB_OFFLINE is set: the token's write access was not checked; only cached datasets and models load",
                "unset HF_HUB_OFFLINE to check the token and to download or push",
            )
        )
        return checks
    try:
        me = huggingface_hub.HfApi(token=token).whoami()
    except Exception as e:
        reason = hub_error_reason(e, token)
        if "401" in reason or "nvalid" in reason:
            checks.append(
                Check(
                    "fail",
                    "access",
                    f"the Hub refused the token: {reason}",
                    "create a new token at https://huggingface.co/settings/tokens and run `hf auth login`",
                )
            )
        else:
            checks.append(
                Check(
                    "warn",
                    "access",
                    f"cannot reach {endpoint} to check the token: {reason}",
                    "check the connection (or proxy); set HF_HUB_OFFLINE=1 to work from the cache",
                )
            )
        return checks
    writable, text = write_access(me)
    checks.append(
        Check(
            "ok" if writable else "fail",
            "access",
            text,
            "" if writable else "create a token with write access and run `hf auth login`",
        )
    )
    return checks


def _free(path: Path) -> tuple[Path, float]:
    """Free GiB on the file system holding ``path`` (its nearest existing parent when it does not exist yet)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe, shutil.disk_usage(probe).free / 2**30


def cache_checks() -> list[Check]:
    from huggingface_hub import constants

    from ..data.builtin import cache_root

    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    caches = {
        "Hub cache (models, dataset files)": Path(constants.HF_HUB_CACHE),
        "datasets cache (prepared tables)": datasets_cache,
        "dgzoo cache (embedded datasets)": cache_root(),
    }
    checks = []
    for name, path in caches.items():
        _, free = _free(path)
        status = "warn" if free < LOW_DISK_GIB else "ok"
        checks.append(
            Check(
                status,
                "cache",
                f"{name}: {path} ({free:.1f} GiB free{'' if path.exists() else ', not created yet'})",
                "free disk, or move it to a larger disk (HF_HOME, HF_DATASETS_CACHE, DGZOO_CACHE)"
                if status == "warn"
                else "",
            )
        )
    return checks


def optional_checks() -> list[Check]:
    checks = []
    for module, dist, use, fix in OPTIONAL:
        if importlib.util.find_spec(module) is None:
            checks.append(Check("warn", "optional", f"{dist} not installed ({use})", fix))
        else:
            checks.append(Check("ok", "optional", f"{dist} {importlib.metadata.version(dist)} ({use})"))
    return checks


def run_checks() -> list[Check]:
    """Every check, in report order."""
    return [*torch_checks(), *accelerate_checks(), *hub_checks(), *cache_checks(), *optional_checks()]


def format_checks(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"[{c.status:<4}] {c.topic:<10} {c.found}")
        if c.fix:
            lines.append(f"{'':18}{'hint' if c.status in ('ok', 'info') else 'fix'}: {c.fix}")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    lines.append(f"{failed} problem(s), {warned} warning(s)")
    return "\n".join(lines)


def _doctor(args: argparse.Namespace) -> int:
    from .. import __version__

    checks = [Check("ok", "dgzoo", f"{__version__} ({Path(__file__).resolve().parents[1]})"), *run_checks()]
    print(format_checks(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0
