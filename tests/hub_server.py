"""A small, local, Hugging Face Hub-compatible HTTP server for offline tests.

The real client libraries (huggingface_hub, datasets, timm) are pointed at it through ``HF_ENDPOINT``. Since
huggingface_hub reads ``HF_ENDPOINT`` once, at import time, client code must run in a fresh subprocess whose
environment comes from :meth:`HubServer.env` (or use :meth:`HubServer.run_python`).

It implements the subset of the Hub API that those clients use (shapes taken from huggingface_hub 2.4.0):
repos (create, delete, info, refs, branches), the commit flow (preupload, Git LFS "basic" batch transfer, NDJSON
commit), listing (tree, paths-info, commits), file downloads (``/resolve/``, with HEAD and Range), model search
(``/api/models`` with tag filters and card data), collections, and card metadata validation
(``/api/validate-yaml``). Xet storage is not implemented: clients must run with ``HF_HUB_DISABLE_XET=1`` so that
LFS files go through the LFS batch API.

Storage is on disk: content-addressed blobs (by sha256) plus one JSON file per repo (branches) and per commit (the
full path -> blob map, so resolving any revision is a single lookup). Every request is handled under one lock: the
fake is not about throughput, and this makes each request atomic, as on the real Hub.

Usage from a test::

    def test_something(hub_server, tmp_path):
        repo_id = hub_server.unique_repo_id("my-model")
        out = hub_server.run_python(f"from huggingface_hub import create_repo; create_repo({repo_id!r})", tmp_path)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

import pytest

try:  # only used to expose a README's YAML front matter as `cardData`; everything else works without it
    import yaml
except ImportError:  # pragma: no cover
    yaml = None

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SHA1 = re.compile(r"[0-9a-f]{40}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Path segments that follow a repo id in `/api/{type}s/...` URLs. Used, like the Hub clients do, to tell a
# namespaced id ("org/name") from a legacy one ("gpt2") in `/api/models/gpt2/revision/main`.
_API_SUBPATHS = {"revision", "tree", "paths-info", "refs", "branch", "preupload", "commit", "commits", "parquet"}
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+(?:/[^/]+)?)/resolve/([^/]+)/(.+)$")
_LFS_BATCH = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+(?:/[^/]+)?)\.git/info/lfs/objects/batch$")
_LFS_OBJECT = re.compile(r"^/_lfs/(upload|verify)/([0-9a-f]{64})$")
# Files the server asks clients to upload through LFS, like the Hub's default `.gitattributes` does.
_LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".onnx",
    ".npy",
    ".npz",
    ".pkl",
    ".parquet",
    ".arrow",
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".webp",
    ".zip",
    ".gz",
    ".tar",
    ".msgpack",
)
_LFS_MIN_SIZE = 10_000
# Licence ids the Hub accepts in card metadata (the subset dgzoo's cards and tests use).
_HUB_LICENSES = {
    "apache-2.0",
    "mit",
    "bsd-3-clause",
    "bsd-2-clause",
    "cc-by-4.0",
    "cc-by-sa-4.0",
    "cc-by-nc-4.0",
    "cc0-1.0",
    "cdla-permissive-1.0",
    "cdla-permissive-2.0",
    "openrail",
    "gpl-3.0",
    "other",
    "unknown",
}
_GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in _LFS_SUFFIXES).encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_oid(data: bytes) -> str:
    """Git blob id: what the Hub returns as `oid`/ETag of regular files, and what clients compare in preupload."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An error answer. `code` goes to `X-Error-Code`, which huggingface_hub maps to its typed exceptions."""

    def __init__(self, status: int, message: str, code: str | None = None, headers=None, extra=None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


@dataclass
class Request:
    method: str
    path: str  # raw, still percent-encoded: revisions are quoted with safe="" and may contain "/"
    query: dict
    headers: dict  # lower-cased names
    body: bytes
    authed: bool = False

    def json(self):
        return json.loads(self.body or b"{}")

    def flag(self, name: str) -> bool:
        return self.query.get(name, [""])[0].lower() in ("1", "true")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict = field(default_factory=dict)

    @classmethod
    def json(cls, data, status=200, headers=None):
        return cls(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


class Storage:
    """Blobs, repos and commits on disk. Callers serialise access (see `HubServer`)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.repos = self.root / "repos"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.repos.mkdir(parents=True, exist_ok=True)

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.blobs / sha
        if not path.exists():
            tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)  # atomic: an interrupted write never leaves a truncated blob behind
        return sha

    def blob_size(self, sha256: str) -> int | None:
        path = self.blobs / sha256
        return path.stat().st_size if path.is_file() else None

    def read_blob(self, sha256: str) -> bytes:
        return (self.blobs / sha256).read_bytes()

    def _dir(self, repo_type: str, repo_id: str) -> Path:
        return self.repos / f"{repo_type}s" / repo_id

    def get_repo(self, repo_type: str, repo_id: str) -> dict | None:
        path = self._dir(repo_type, repo_id) / "repo.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_repo(self, repo_type: str, repo_id: str, meta: dict) -> None:
        path = self._dir(repo_type, repo_id) / "repo.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta))

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        shutil.rmtree(self._dir(repo_type, repo_id))

    def get_commit(self, repo_type: str, repo_id: str, sha: str) -> dict | None:
        path = self._dir(repo_type, repo_id) / "commits" / f"{sha}.json"
        return json.loads(path.read_text()) if _SHA1.fullmatch(sha) and path.is_file() else None

    def add_commit(self, repo_type: str, repo_id: str, parent: str | None, files: dict, title: str, message: str):
        date = _now()
        seed = json.dumps([repo_type, repo_id, parent, files, title, message, date, uuid.uuid4().hex])
        commit = {
            "id": hashlib.sha1(seed.encode()).hexdigest(),
            "parent": parent,
            "title": title,
            "message": message,
            "date": date,
            "files": files,
        }
        path = self._dir(repo_type, repo_id) / "commits" / f"{commit['id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(commit))
        return commit


class HubApp:
    """The Hub API semantics: routing, auth, revisions, commits. Knows nothing about sockets."""

    def __init__(self, storage: Storage, token: str, user: str, endpoint: str):
        self.storage, self.token, self.user, self.endpoint = storage, token, user, endpoint
        self._ticket_key = secrets.token_bytes(16)

    # ---- entry point -------------------------------------------------------------------------------------------
    def handle(self, req: Request) -> Response:
        auth = req.headers.get("authorization")
        if auth is not None:
            # A wrong token is an error even on public reads, as on the Hub: it catches misconfigured tests early.
            if auth != f"Bearer {self.token}":
                raise HubError(401, "Invalid credentials in Authorization header")
            req.authed = True
        p = req.path
        if p.startswith("/api/"):
            return self._route_api(req)
        if m := _RESOLVE.match(p):
            repo_type = _REPO_TYPES[m[1]] if m[1] else "model"
            return self.resolve_file(req, repo_type, unquote(m[2]), unquote(m[3]), unquote(m[4]))
        if (m := _LFS_BATCH.match(p)) and req.method == "POST":
            return self.lfs_batch(req, _REPO_TYPES[m[1]] if m[1] else "model", unquote(m[2]))
        if (m := _LFS_OBJECT.match(p)) and req.method in ("PUT", "POST"):
            return self.lfs_upload(req, m[2]) if m[1] == "upload" else self.lfs_verify(req, m[2])
        raise HubError(404, f"Not implemented by the test Hub server: {req.method} {p}")

    def _route_api(self, req: Request) -> Response:
        segs = [unquote(s) for s in req.path[len("/api/") :].strip("/").split("/")]
        head, m = segs[0], req.method
        if head == "whoami-v2" and m == "GET":
            return self.whoami(req)
        if head == "validate-yaml" and m == "POST":
            return self.validate_yaml(req)
        if head == "models" and len(segs) == 1 and m == "GET":
            return self.list_models(req)
        if head == "collections":
            return self._route_collections(req, segs[1:])
        if head == "repos" and segs[1:] == ["create"] and m == "POST":
            return self.create_repo(req)
        if head == "repos" and segs[1:] == ["delete"] and m == "DELETE":
            return self.delete_repo(req)
        if head not in _REPO_TYPES or len(segs) < 2:
            raise HubError(404, f"Not implemented by the test Hub server: {m} {req.path}")
        repo_type, rest = _REPO_TYPES[head], segs[1:]
        n = 2 if len(rest) >= 2 and rest[1] not in _API_SUBPATHS else 1
        repo_id, tail = "/".join(rest[:n]), rest[n:]
        action, args = (tail[0], tail[1:]) if tail else ("", [])
        if m == "GET" and action == "":
            return self.repo_info(req, repo_type, repo_id, None)
        if m == "GET" and action == "revision" and len(args) == 1:
            return self.repo_info(req, repo_type, repo_id, args[0])
        if m == "GET" and action == "tree" and args:
            return self.tree(req, repo_type, repo_id, args[0], "/".join(args[1:]))
        if m == "POST" and action == "paths-info" and len(args) == 1:
            return self.paths_info(req, repo_type, repo_id, args[0])
        if m == "GET" and action == "commits" and len(args) == 1:
            return self.list_commits(req, repo_type, repo_id, args[0])
        if m == "GET" and action == "refs":
            return self.refs(req, repo_type, repo_id)
        if m in ("POST", "DELETE") and action == "branch" and len(args) == 1:
            return self.branch(req, repo_type, repo_id, args[0])
        if m == "POST" and action == "preupload" and len(args) == 1:
            return self.preupload(req, repo_type, repo_id, args[0])
        if m == "POST" and action == "commit" and len(args) == 1:
            return self.commit(req, repo_type, repo_id, args[0])
        raise HubError(404, f"Not implemented by the test Hub server: {m} {req.path}")

    # ---- helpers -----------------------------------------------------------------------------------------------
    def _require_auth(self, req: Request) -> None:
        if not req.authed:  # no X-Error-Code: clients surface it as a plain 401 HfHubHTTPError
            raise HubError(401, "Invalid username or password.")

    def _repo(self, req: Request, repo_type: str, repo_id: str, write: bool = False) -> dict:
        if write:
            self._require_auth(req)
        meta = self.storage.get_repo(repo_type, repo_id)
        if meta is None:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        if meta["private"] and not req.authed:  # the Hub does not tell "private" from "missing"
            raise HubError(401, "Repository not found", code="RepoNotFound")
        return meta

    def _revision(self, repo_type: str, repo_id: str, meta: dict, revision: str | None) -> dict:
        rev = revision or "main"
        rev = rev[len("refs/heads/") :] if rev.startswith("refs/heads/") else rev
        sha = meta["branches"].get(rev, rev)
        commit = self.storage.get_commit(repo_type, repo_id, sha)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return commit

    def _url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"

    def _file_json(self, path: str, entry: dict, last_commit: dict | None = None) -> dict:
        out = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry["lfs"]:
            out["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": entry["pointer_size"]}
        if last_commit is not None:
            out["lastCommit"] = {"id": last_commit["id"], "title": last_commit["title"], "date": last_commit["date"]}
        return out

    def _folder_json(self, path: str, commit: dict, last_commit: dict | None = None) -> dict:
        out = {"type": "directory", "oid": hashlib.sha1(f"{commit['id']}:{path}".encode()).hexdigest(), "path": path}
        if last_commit is not None:
            out["lastCommit"] = {"id": last_commit["id"], "title": last_commit["title"], "date": last_commit["date"]}
        return out

    def _last_commit(self, repo_type: str, repo_id: str, commit: dict, path: str) -> dict:
        """Oldest ancestor (walking first parents) since which `path` (file or folder) is unchanged."""

        def view(c):
            return {k: v for k, v in c["files"].items() if k == path or k.startswith(path + "/")}

        current = view(commit)
        while commit["parent"]:
            parent = self.storage.get_commit(repo_type, repo_id, commit["parent"])
            if view(parent) != current:
                break
            commit = parent
        return commit

    @staticmethod
    def _folders(files) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}

    def _card_data(self, commit: dict) -> dict | None:
        entry = commit["files"].get("README.md")
        if entry is None or yaml is None:
            return None
        text = self.storage.read_blob(entry["sha256"]).decode("utf-8", errors="replace")
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
        try:
            data = yaml.safe_load(m[1]) if m else None
        except yaml.YAMLError:
            return None
        return data if isinstance(data, dict) else None

    def _new_commit(self, repo_type, repo_id, meta, branch, files, title, message) -> dict:
        commit = self.storage.add_commit(repo_type, repo_id, meta["branches"].get(branch), files, title, message)
        meta["branches"][branch] = commit["id"]
        self.storage.save_repo(repo_type, repo_id, meta)
        return commit

    def _entry(self, sha256: str, size: int, lfs: bool) -> dict:
        if lfs:  # the git blob of an LFS file is its pointer file
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
            return {"sha256": sha256, "size": size, "lfs": True, "oid": _git_oid(pointer), "pointer_size": len(pointer)}
        return {"sha256": sha256, "size": size, "lfs": False, "oid": _git_oid(self.storage.read_blob(sha256))}

    def _ticket(self, oid: str) -> str:
        return hmac.new(self._ticket_key, oid.encode(), hashlib.sha256).hexdigest()

    # ---- account and repos -------------------------------------------------------------------------------------
    def whoami(self, req: Request) -> Response:
        self._require_auth(req)
        token = {"displayName": "test", "role": "write"}
        return Response.json(
            {
                "type": "user",
                "name": self.user,
                "fullname": "Test User",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": token},
            }
        )

    def create_repo(self, req: Request) -> Response:
        self._require_auth(req)
        data = req.json()
        repo_type, name, org = data.get("type") or "model", data.get("name", ""), data.get("organization") or self.user
        if repo_type not in _URL_PREFIX or not _NAME.fullmatch(name) or not _NAME.fullmatch(org):
            raise HubError(400, f"Invalid repo name or type: {org}/{name} ({repo_type})")
        repo_id = f"{org}/{name}"
        url = self._url(repo_type, repo_id)
        if self.storage.get_repo(repo_type, repo_id) is not None:
            # create_repo(exist_ok=True) reads `url` from this 409 body.
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        private = bool(data.get("private")) or data.get("visibility") == "private"
        meta = {"private": private, "createdAt": _now(), "branches": {}}
        # Like the Hub, a new repo has one commit with a `.gitattributes`, so it always has a `sha`.
        entry = self._entry(self.storage.put_blob(_GITATTRIBUTES), len(_GITATTRIBUTES), lfs=False)
        self._new_commit(repo_type, repo_id, meta, "main", {".gitattributes": entry}, "initial commit", "")
        return Response.json({"url": url, "name": repo_id, "id": uuid.uuid4().hex[:24]})

    def delete_repo(self, req: Request) -> Response:
        self._require_auth(req)
        data = req.json()
        repo_type, repo_id = data.get("type") or "model", f"{data.get('organization') or self.user}/{data.get('name')}"
        self._repo(req, repo_type, repo_id, write=True)
        self.storage.delete_repo(repo_type, repo_id)
        return Response.json({})

    def repo_info(self, req: Request, repo_type: str, repo_id: str, revision: str | None) -> Response:
        meta = self._repo(req, repo_type, repo_id)
        commit = self._revision(repo_type, repo_id, meta, revision)
        with_blobs = req.flag("blobs")
        siblings = []
        for path, entry in sorted(commit["files"].items()):
            sibling = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    sibling["lfs"] = {
                        "size": entry["size"],
                        "sha256": entry["sha256"],
                        "pointerSize": entry["pointer_size"],
                    }
            siblings.append(sibling)
        card = self._card_data(commit)
        tags = card.get("tags") if card else None
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit["id"],
            "lastModified": commit["date"],
            "createdAt": meta["createdAt"],
            "private": meta["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else [],
            "siblings": siblings,
            "usedStorage": sum(e["size"] for e in commit["files"].values()),
        }
        if card is not None:
            info["cardData"] = card
            if repo_type == "model" and card.get("library_name"):
                info["library_name"] = card["library_name"]
        return Response.json(info)

    def refs(self, req: Request, repo_type: str, repo_id: str) -> Response:
        meta = self._repo(req, repo_type, repo_id)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
            for name, sha in sorted(meta["branches"].items())
        ]
        return Response.json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def branch(self, req: Request, repo_type: str, repo_id: str, branch: str) -> Response:
        meta = self._repo(req, repo_type, repo_id, write=True)
        if req.method == "DELETE":
            if branch == "main" or branch not in meta["branches"]:
                raise HubError(404 if branch != "main" else 403, f"Cannot delete branch {branch}")
            del meta["branches"][branch]
        else:
            if branch in meta["branches"]:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            if _SHA1.fullmatch(branch) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)*", branch):
                raise HubError(400, f"Invalid branch name: {branch}")
            meta["branches"][branch] = self._revision(repo_type, repo_id, meta, req.json().get("startingPoint"))["id"]
        self.storage.save_repo(repo_type, repo_id, meta)
        return Response.json({})

    # ---- listing -----------------------------------------------------------------------------------------------
    def tree(self, req: Request, repo_type: str, repo_id: str, revision: str, path: str) -> Response:
        meta = self._repo(req, repo_type, repo_id)
        commit = self._revision(repo_type, repo_id, meta, revision)
        files, folders, prefix = commit["files"], self._folders(commit["files"]), path.strip("/")
        if prefix and prefix not in folders:
            raise HubError(404, f"Path {prefix} not found in tree", code="EntryNotFound")
        recursive, expand = req.flag("recursive"), req.flag("expand")
        base = prefix + "/" if prefix else ""

        def listed(p):
            return p.startswith(base) and (recursive or "/" not in p[len(base) :])

        def last(p):
            return self._last_commit(repo_type, repo_id, commit, p) if expand else None

        out = [self._folder_json(p, commit, last(p)) for p in sorted(folders) if listed(p)]
        out += [self._file_json(p, files[p], last(p)) for p in sorted(files) if listed(p)]
        return Response.json(out)  # one page: no `Link: <...>; rel="next"` header

    def paths_info(self, req: Request, repo_type: str, repo_id: str, revision: str) -> Response:
        meta = self._repo(req, repo_type, repo_id)
        commit = self._revision(repo_type, repo_id, meta, revision)
        if req.headers.get("content-type", "").startswith("application/json"):
            data = req.json()
            paths, expand = data.get("paths", []), bool(data.get("expand"))
        else:  # huggingface_hub posts a form: paths=a&paths=b&expand=false
            form = parse_qs(req.body.decode())
            paths, expand = form.get("paths", []), form.get("expand", [""])[0].lower() in ("1", "true")
        files, folders, out = commit["files"], self._folders(commit["files"]), []
        for p in (p.strip("/") for p in paths):  # unknown paths are skipped, not an error
            last = self._last_commit(repo_type, repo_id, commit, p) if expand else None
            if p in files:
                out.append(self._file_json(p, files[p], last))
            elif p in folders:
                out.append(self._folder_json(p, commit, last))
        return Response.json(out)

    def list_commits(self, req: Request, repo_type: str, repo_id: str, revision: str) -> Response:
        meta = self._repo(req, repo_type, repo_id)
        commit, out = self._revision(repo_type, repo_id, meta, revision), []
        while commit is not None:
            out.append(
                {
                    "id": commit["id"],
                    "title": commit["title"],
                    "message": commit["message"],
                    "authors": [{"user": self.user}],
                    "date": commit["date"],
                }
            )
            commit = commit["parent"] and self.storage.get_commit(repo_type, repo_id, commit["parent"])
        return Response.json(out)

    # ---- model search, card validation and collections --------------------------------------------------------
    def _model_tags(self, card: dict | None) -> list[str]:
        """Tags as the Hub lists them: the card's, plus its library, `dataset:X` for each dataset and its licence."""
        if not card:
            return []
        tags = [t for t in card.get("tags") or [] if isinstance(t, str)]
        if isinstance(card.get("library_name"), str):
            tags.append(card["library_name"])
        datasets = card.get("datasets") or []
        tags += [f"dataset:{d}" for d in ([datasets] if isinstance(datasets, str) else datasets) if isinstance(d, str)]
        if isinstance(card.get("license"), str):
            tags.append(f"license:{card['license']}")
        return list(dict.fromkeys(tags))

    def list_models(self, req: Request) -> Response:
        """`GET /api/models`: `filter` (repeatable, every one must be a tag), `author`, `search`, `limit`;
        `cardData`/`full` add the card's front matter and the file list. One page, oldest repo first."""
        filters = [f for f in req.query.get("filter", []) if f]
        author, search = req.query.get("author", [""])[0], req.query.get("search", [""])[0]
        limit = int(req.query.get("limit", ["0"])[0] or 0)
        out = []
        for path in sorted(self.storage.repos.glob("models/*/*/repo.json")):
            repo_id = f"{path.parent.parent.name}/{path.parent.name}"
            meta = json.loads(path.read_text())
            if (meta["private"] and not req.authed) or (author and path.parent.parent.name != author):
                continue
            if search and search.lower() not in repo_id.lower():
                continue
            commit = self._revision("model", repo_id, meta, None)
            card = self._card_data(commit)
            tags = self._model_tags(card)
            if not all(f in tags for f in filters):
                continue
            item = {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit["id"],
                "lastModified": commit["date"],
                "createdAt": meta["createdAt"],
                "private": meta["private"],
                "downloads": 0,
                "likes": 0,
                "tags": tags,
                "library_name": (card or {}).get("library_name"),
                "pipeline_tag": (card or {}).get("pipeline_tag"),
            }
            if req.flag("cardData") or req.flag("full"):
                item["cardData"] = card or {}
            if req.flag("full"):
                item["siblings"] = [{"rfilename": p} for p in sorted(commit["files"])]
            out.append((meta["createdAt"], item))
        items = [item for _, item in sorted(out, key=lambda pair: pair[0])]
        return Response.json(items[:limit] if limit else items)

    def validate_yaml(self, req: Request) -> Response:
        """`POST /api/validate-yaml`: 400 with the problems (as the Hub answers) when a card's metadata is invalid.

        Checks a subset of the Hub's rules: the front matter is a YAML mapping; `license` is a Hub licence id, and
        `other` comes with a `license_name`; every `model-index` result has a task type, a dataset type and name,
        and metrics with a type and a numeric value; a result's dataset config and split are identifiers (no
        spaces). It is stricter than the Hub on the last point, on purpose: configs and splits are looked up.
        """
        data = req.json()
        text = data.get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
        errors = []
        try:
            meta = yaml.safe_load(m[1]) if (m and yaml is not None) else {}
        except yaml.YAMLError as e:
            meta, errors = {}, [f"Invalid YAML: {str(e).splitlines()[0]}"]
        if not isinstance(meta, dict):
            meta, errors = {}, ["The metadata is not a YAML mapping"]
        license = meta.get("license")
        if license is not None and license not in _HUB_LICENSES:
            errors.append(f'"license" must be a Hub licence id, got {license!r}')
        if license == "other" and not meta.get("license_name"):
            errors.append('"license: other" needs a "license_name"')
        for model in meta.get("model-index") or []:
            for result in (model or {}).get("results") or []:
                task, dataset = result.get("task") or {}, result.get("dataset") or {}
                if not task.get("type"):
                    errors.append("a model-index result has no task.type")
                if not dataset.get("type") or not dataset.get("name"):
                    errors.append("a model-index result has no dataset.type or dataset.name")
                for key in ("config", "split"):
                    value = dataset.get(key)
                    if value is not None and not re.fullmatch(r"[\w.+-]+", str(value)):
                        errors.append(f"model-index dataset.{key} {value!r} is not an identifier")
                metrics = result.get("metrics") or []
                if not metrics:
                    errors.append("a model-index result has no metrics")
                for metric in metrics:
                    if not metric.get("type") or not isinstance(metric.get("value"), (int, float)):
                        errors.append("a model-index metric needs a type and a numeric value")
        if errors:
            return Response(400, "; ".join(errors).encode(), {"Content-Type": "text/plain"})
        return Response.json({"errors": [], "warnings": []})

    def _route_collections(self, req: Request, segs: list[str]) -> Response:
        m = req.method
        if not segs and m == "POST":
            return self.create_collection(req)
        if len(segs) < 2:
            raise HubError(404, f"Not implemented by the test Hub server: {m} {req.path}")
        slug, rest = "/".join(segs[:2]), segs[2:]
        if not rest and m == "GET":
            return Response.json(self._collection_json(self._collection(req, slug)))
        if not rest and m == "PATCH":
            self._require_auth(req)
            collection = self._collection(req, slug)
            collection.update(
                {k: v for k, v in req.json().items() if k in ("title", "description", "private", "position", "theme")}
            )
            self._save_collection(collection)
            return Response.json({"success": True, "data": self._collection_json(collection)})
        if not rest and m == "DELETE":
            self._require_auth(req)
            self._collection(req, slug)
            (self.storage.root / "collections" / f"{slug.replace('/', '--')}.json").unlink()
            return Response.json({})
        if rest == ["items"] and m == "POST":
            self._require_auth(req)
            collection = self._collection(req, slug)
            data = req.json()
            item = data.get("item") or {}
            if item.get("type") not in ("model", "dataset", "space", "paper", "collection"):
                raise HubError(400, f"Invalid item type: {item.get('type')}")
            if (
                item.get("type") in ("model", "dataset", "space")
                and self.storage.get_repo(item["type"], item.get("id", "")) is None
            ):
                raise HubError(404, f"{item['type']} {item.get('id')} not found", code="RepoNotFound")
            if any(i["id"] == item.get("id") and i["type"] == item["type"] for i in collection["items"]):
                raise HubError(409, "Item already exists in this collection")
            note = data.get("note")
            collection["items"].append(
                {
                    "_id": uuid.uuid4().hex[:24],
                    "id": item["id"],
                    "type": item["type"],
                    "position": len(collection["items"]),
                    **({"note": {"html": note, "text": note}} if note else {}),
                }
            )
            collection["lastUpdated"] = _now()
            self._save_collection(collection)
            return Response.json(self._collection_json(collection))
        raise HubError(404, f"Not implemented by the test Hub server: {m} {req.path}")

    def create_collection(self, req: Request) -> Response:
        self._require_auth(req)
        data = req.json()
        title, namespace = data.get("title") or "", data.get("namespace") or self.user
        if not title:
            raise HubError(400, "A collection needs a title")
        if namespace != self.user:
            raise HubError(403, f"You cannot create collections in {namespace}")
        for path in sorted((self.storage.root / "collections").glob(f"{namespace}--*.json")):
            existing = json.loads(path.read_text())
            if existing["title"] == title:
                raise HubError(409, "A collection with this title already exists", extra={"slug": existing["slug"]})
        words = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "collection"
        slug = f"{namespace}/{words}-{uuid.uuid4().hex[:24]}"
        collection = {
            "slug": slug,
            "title": title,
            "description": data.get("description"),
            "owner": {"name": namespace, "type": "user"},
            "items": [],
            "lastUpdated": _now(),
            "position": 0,
            "private": bool(data.get("private")),
            "theme": "default",
            "upvotes": 0,
        }
        self._save_collection(collection)
        return Response.json(self._collection_json(collection))

    def _collection(self, req: Request, slug: str) -> dict:
        path = self.storage.root / "collections" / f"{slug.replace('/', '--')}.json"
        if not path.is_file():
            raise HubError(404, f"Collection {slug} not found")
        collection = json.loads(path.read_text())
        if collection["private"] and not req.authed:
            raise HubError(404, f"Collection {slug} not found")
        return collection

    def _save_collection(self, collection: dict) -> None:
        path = self.storage.root / "collections" / f"{collection['slug'].replace('/', '--')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(collection))

    @staticmethod
    def _collection_json(collection: dict) -> dict:
        return {k: v for k, v in collection.items() if k != "description" or v is not None}

    # ---- downloads ---------------------------------------------------------------------------------------------
    def resolve_file(self, req: Request, repo_type: str, repo_id: str, revision: str, path: str) -> Response:
        if req.method not in ("GET", "HEAD"):
            raise HubError(405, "Method not allowed")
        meta = self._repo(req, repo_type, repo_id)
        commit = self._revision(repo_type, repo_id, meta, revision)
        headers = {"X-Repo-Commit": commit["id"]}  # also on 404s: clients cache the file's absence per commit
        entry = commit["files"].get(path)
        if entry is None:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers=headers)
        data = self.storage.read_blob(entry["sha256"])
        # The cache names blobs after the ETag: git blob id for regular files, sha256 for LFS files.
        headers["ETag"] = f'"{entry["sha256"] if entry["lfs"] else entry["oid"]}"'
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": headers["ETag"], "X-Linked-Size": str(entry["size"])})
        headers.update({"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"})
        range_header = req.headers.get("range")
        if range_header and (m := re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())):
            start = int(m[1]) if m[1] else max(len(data) - int(m[2] or 0), 0)
            end = min(int(m[2]), len(data) - 1) if m[1] and m[2] else len(data) - 1
            if start >= len(data):
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return Response(206, data[start : end + 1], headers)
        return Response(200, data, headers)

    # ---- uploads -----------------------------------------------------------------------------------------------
    def preupload(self, req: Request, repo_type: str, repo_id: str, revision: str) -> Response:
        meta = self._repo(req, repo_type, repo_id, write=True)
        if req.flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by the test Hub server")
        files = self._revision(repo_type, repo_id, meta, revision)["files"]
        out = []
        for f in req.json().get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f["path"].lower().endswith(_LFS_SUFFIXES) or f.get("size", 0) > _LFS_MIN_SIZE or b"\0" in sample
            existing = files.get(f["path"])
            # Clients skip files whose `oid` equals theirs: sha256 in LFS mode, git blob id in regular mode.
            oid = None if existing is None else existing["sha256"] if existing["lfs"] else existing["oid"]
            out.append(
                {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        return Response.json({"files": out})

    def lfs_batch(self, req: Request, repo_type: str, repo_id: str) -> Response:
        data = req.json()
        if data.get("operation") != "upload":
            raise HubError(400, "Only the LFS 'upload' operation is supported by the test Hub server")
        self._repo(req, repo_type, repo_id, write=True)
        objects = []
        for obj in data.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            out = {"oid": oid, "size": size, "authenticated": True}
            if self.storage.blob_size(oid) != size:  # no `actions`: the client skips objects the server has
                # The PUT carries no Authorization header, so the href holds the credential, like a signed URL.
                out["actions"] = {
                    "upload": {"href": f"{self.endpoint}/_lfs/upload/{oid}?size={size}&ticket={self._ticket(oid)}"},
                    "verify": {"href": f"{self.endpoint}/_lfs/verify/{oid}"},
                }
            objects.append(out)
        return Response.json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )

    def lfs_upload(self, req: Request, oid: str) -> Response:
        if not hmac.compare_digest(req.query.get("ticket", [""])[0], self._ticket(oid)):
            raise HubError(403, "Invalid or missing LFS upload ticket")
        if hashlib.sha256(req.body).hexdigest() != oid or str(len(req.body)) != req.query.get("size", [""])[0]:
            raise HubError(400, f"Uploaded content does not match LFS object {oid}")
        self.storage.put_blob(req.body)
        return Response.json({})

    def lfs_verify(self, req: Request, oid: str) -> Response:
        self._require_auth(req)
        if self.storage.blob_size(oid) != req.json().get("size"):
            raise HubError(404, f"LFS object {oid} not found")
        return Response.json({})

    def commit(self, req: Request, repo_type: str, repo_id: str, revision: str) -> Response:
        meta = self._repo(req, repo_type, repo_id, write=True)
        if req.flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by the test Hub server")
        branch = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
        if branch not in meta["branches"]:
            raise HubError(
                404, f"Invalid rev id: {revision} (commits go to an existing branch)", code="RevisionNotFound"
            )
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        head = self.storage.get_commit(repo_type, repo_id, meta["branches"][branch])
        if header.get("parentCommit") not in (None, head["id"]):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head["files"])
        for line in lines:
            key, value = line["key"], line["value"]
            path = value.get("path", "").strip("/")
            if key == "file":
                content = base64.b64decode(value["content"])
                files[path] = self._entry(self.storage.put_blob(content), len(content), lfs=False)
            elif key == "lfsFile":
                size = self.storage.blob_size(value["oid"])
                if size is None:
                    raise HubError(422, f"LFS object {value['oid']} for {path} was never uploaded")
                files[path] = self._entry(value["oid"], size, lfs=True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
            elif key == "deletedFolder":
                for p in [p for p in files if p.startswith(path + "/")]:
                    del files[p]
            elif key != "header":
                raise HubError(400, f"Unsupported commit operation: {key}")
        commit = self._new_commit(
            repo_type, repo_id, meta, branch, files, header.get("summary") or "update", header.get("description") or ""
        )
        return Response.json(
            {
                "success": True,
                "commitOid": commit["id"],
                "hookOutput": "",
                "pullRequestUrl": None,
                "commitUrl": f"{self._url(repo_type, repo_id)}/commit/{commit['id']}",
            }
        )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the clients' connection pools expect

    def log_message(self, format, *args):  # the server keeps its own log: HubServer.requests
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # streamed uploads may be chunked
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self):
        response = self.server.hub._handle(self.command, self.path, self.headers, self._read_body())
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))  # for HEAD too: the size of a GET
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch


class HubServer:
    """Runs `HubApp` on 127.0.0.1 in a background thread; adds fault injection, a request log and env helpers."""

    user = "testuser"

    def __init__(self, storage_dir, token: str | None = None):
        self.storage_dir = Path(storage_dir)
        self.token = token or f"hf_test_token_{secrets.token_hex(12)}"
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.app = HubApp(Storage(self.storage_dir), self.token, self.user, self.endpoint)
        self._lock = threading.Lock()
        self._failures: list[dict] = []
        self._log: list[tuple[str, str, int]] = []
        self.errors: list[str] = []  # tracebacks of server bugs (answered 500): worth asserting empty
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- test controls -----------------------------------------------------------------------------------------
    def fail_next(
        self,
        method: str,
        path_substring: str,
        status: int = 500,
        count: int = 1,
        message: str = "Injected failure",
        error_code: str | None = None,
    ) -> None:
        """Answer the next `count` requests whose method is `method` (or "*") and whose URL path (without the
        query string) contains `path_substring` with `status`. Beware: huggingface_hub retries 5xx/429 on most
        calls (preupload, LFS batch and PUT, downloads) up to 5 times with backoff; the final NDJSON `/commit/`
        POST is not retried. `error_code` sets `X-Error-Code` (e.g. "RevisionNotFound", "EntryNotFound")."""
        with self._lock:
            self._failures.append(
                {
                    "method": method.upper(),
                    "path": path_substring,
                    "status": status,
                    "count": count,
                    "message": message,
                    "code": error_code,
                }
            )

    def reset(self) -> None:
        """Forget all repos, blobs, pending failures and the request log."""
        with self._lock:
            shutil.rmtree(self.storage_dir, ignore_errors=True)
            self.app.storage = Storage(self.storage_dir)
            self._failures.clear()
            self._log.clear()
            self.errors.clear()

    @property
    def requests(self) -> list[tuple[str, str, int]]:
        """(method, raw path with query, status) of every request so far, oldest first."""
        with self._lock:
            return list(self._log)

    def unique_repo_id(self, prefix: str = "repo") -> str:
        return f"{self.user}/{prefix}-{uuid.uuid4().hex[:10]}"

    # ---- client subprocesses -----------------------------------------------------------------------------------
    def env(self, hf_home, token: bool = True, **extra: str) -> dict[str, str]:
        """Environment for a client subprocess: this endpoint, `hf_home` as a fresh HF_HOME (caches, no stored
        token), Xet off (not implemented here), and `HF_TOKEN` unless `token=False`. Every other HF_* variable of
        this process (HF_HUB_OFFLINE, HF_TOKEN, caches...) is dropped so the subprocess sees only this server."""
        # TRANSFORMERS_OFFLINE also switches huggingface_hub to offline mode.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"
        }
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
        env.update(
            {
                "HF_ENDPOINT": self.endpoint,
                "HF_HOME": str(hf_home),
                "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "HF_HUB_DISABLE_UPDATE_CHECK": "1",
                "NO_PROXY": no_proxy,
                "no_proxy": no_proxy,
            }
        )
        if token:
            env["HF_TOKEN"] = self.token
        env.update(extra)
        return env

    def run_python(self, code: str, hf_home, token: bool = True, timeout: float = 300, **extra_env: str) -> str:
        """Run `code` in a fresh interpreter with `env(hf_home, token)`; return its stdout, raise if it fails."""
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env=self.env(hf_home, token, **extra_env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"client subprocess failed ({proc.returncode})\n--- stdout\n{proc.stdout[-5000:]}"
                f"\n--- stderr\n{proc.stderr[-5000:]}\n--- server log (last 40)\n"
                + "\n".join(map(str, self.requests[-40:]))
            )
        return proc.stdout

    # ---- request plumbing (called from handler threads) --------------------------------------------------------
    def _handle(self, method: str, raw_path: str, headers, body: bytes) -> Response:
        path, _, query = raw_path.partition("?")
        req = Request(method, path, parse_qs(query), {k.lower(): v for k, v in headers.items()}, body)
        with self._lock:
            try:
                response = self._injected_failure(req) or self.app.handle(req)
            except HubError as e:
                # Headers are latin-1 and single-line; the JSON body keeps the exact message.
                header_message = e.message.encode("ascii", "replace").decode().replace("\n", " ")
                response = Response.json(
                    {"error": e.message, **e.extra}, e.status, {"X-Error-Message": header_message, **e.headers}
                )
                if e.code:
                    response.headers["X-Error-Code"] = e.code
            except Exception:
                self.errors.append(traceback.format_exc())
                response = Response.json({"error": f"test Hub server bug:\n{traceback.format_exc()}"}, 500)
            self._log.append((method, raw_path, response.status))
        return response

    def _injected_failure(self, req: Request) -> Response | None:
        for rule in self._failures:
            if rule["method"] in ("*", req.method) and rule["path"] in req.path and rule["count"] > 0:
                rule["count"] -= 1
                headers = {"X-Error-Message": rule["message"]}
                if rule["code"]:
                    headers["X-Error-Code"] = rule["code"]
                return Response.json({"error": rule["message"]}, rule["status"], headers)
        return None


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory):
    """A running `HubServer` shared by the session. Use `unique_repo_id()` to keep tests independent, or
    `reset()` to start from an empty Hub."""
    with HubServer(tmp_path_factory.mktemp("hub_storage")) as server:
        yield server
