"""End-to-end checks that the real clients (huggingface_hub, datasets, timm) work against the test Hub server.

Client code runs in subprocesses because huggingface_hub reads HF_ENDPOINT at import time. Each subprocess prints
one JSON line of results as its last output line; assertions happen here, in the test process.
"""

import json
import urllib.error
import urllib.request

try:
    from tests.hub_server import HubServer, hub_server
except ImportError:  # tests/ is not a package and only tests/ is on sys.path
    from hub_server import HubServer, hub_server  # noqa: F401


def _last_json(stdout: str):
    return json.loads(stdout.strip().splitlines()[-1])


def test_raw_protocol(hub_server: HubServer, tmp_path):
    """The wire details clients depend on, checked with urllib (no client library involved)."""
    repo_id = hub_server.unique_repo_id("raw")

    def call(method, path, body=None, token=True, headers=()):
        req = urllib.request.Request(hub_server.endpoint + path, data=body, method=method, headers=dict(headers))
        if token:
            req.add_header("Authorization", f"Bearer {hub_server.token}")
        try:
            with urllib.request.urlopen(req) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read()

    create = json.dumps({"name": repo_id.split("/")[1], "organization": "testuser"}).encode()
    assert call("POST", "/api/repos/create", create, token=False)[0] == 401
    assert call("POST", "/api/repos/create", create, token=False, headers={"Authorization": "Bearer nope"})[0] == 401
    assert call("POST", "/api/repos/create", create)[0] == 200
    status, _, body = call("POST", "/api/repos/create", create)
    assert status == 409 and json.loads(body)["url"] == f"{hub_server.endpoint}/{repo_id}"

    status, headers, body = call("GET", f"/{repo_id}/resolve/main/.gitattributes", headers={"Range": "bytes=2-5"})
    assert status == 206 and len(body) == 4 and headers["Content-Range"].startswith("bytes 2-5/")
    status, headers, _ = call("HEAD", f"/{repo_id}/resolve/no-such-branch/.gitattributes", token=False)
    assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
    status, headers, _ = call("HEAD", f"/{repo_id}/resolve/main/missing.txt")
    assert (status, headers["X-Error-Code"]) == (404, "EntryNotFound") and len(headers["X-Repo-Commit"]) == 40
    status, headers, _ = call("GET", "/api/models/testuser/does-not-exist")
    assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")

    hub_server.fail_next("GET", f"/api/models/{repo_id}", status=503)
    assert call("GET", f"/api/models/{repo_id}")[0] == 503
    assert call("GET", f"/api/models/{repo_id}")[0] == 200  # count=1: only the next request fails
    assert hub_server.errors == []


def test_standalone_server_and_reset(tmp_path):
    """A private HubServer instance (no fixture), e.g. for tests that need an empty Hub."""
    with HubServer(tmp_path / "storage") as server:
        request = urllib.request.Request(
            f"{server.endpoint}/api/repos/create",
            method="POST",
            data=json.dumps({"name": "r"}).encode(),
            headers={"Authorization": f"Bearer {server.token}"},
        )
        with urllib.request.urlopen(request) as resp:
            assert json.loads(resp.read())["url"] == f"{server.endpoint}/testuser/r"
        with urllib.request.urlopen(f"{server.endpoint}/api/models/testuser/r") as resp:
            assert json.loads(resp.read())["siblings"] == [{"rfilename": ".gitattributes"}]
        server.reset()
        assert server.requests == []
        try:
            urllib.request.urlopen(f"{server.endpoint}/api/models/testuser/r")
        except urllib.error.HTTPError as err:
            assert err.code == 404
        else:
            raise AssertionError("the repo should be gone after reset()")


HUB_SCRIPT = r"""
import json, os
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import RevisionNotFoundError

api, out = HfApi(), {{}}
private_id, public_id, doomed_id = {private_id!r}, {public_id!r}, {doomed_id!r}
api.create_repo(private_id, private=True)
api.create_repo(public_id)
api.create_repo(public_id, exist_ok=True)  # 409 carrying the repo url

folder = os.path.join(os.environ["HF_HOME"], "upload")
os.makedirs(folder)
with open(os.path.join(folder, "notes.txt"), "w") as f:
    f.write("hello hub")
with open(os.path.join(folder, "weights.bin"), "wb") as f:
    f.write(bytes(range(256)) * 64)  # binary => LFS upload path
shas = {{repo_id: api.upload_folder(repo_id=repo_id, folder_path=folder).oid for repo_id in (private_id, public_id)}}
out["main_sha"] = shas[public_id]
out["files"] = sorted(api.list_repo_files(public_id))
info = api.model_info(public_id, files_metadata=True)
out["info_sha"], out["lfs_files"] = info.sha, [s.rfilename for s in info.siblings if s.lfs]
out["private"] = [api.model_info(private_id).private, info.private]
out["by_branch"] = open(hf_hub_download(public_id, "notes.txt", revision="main")).read()
with open(hf_hub_download(private_id, "weights.bin", revision=shas[private_id]), "rb") as f:
    out["by_sha_matches"] = f.read() == bytes(range(256)) * 64

api.create_branch(public_id, branch="dev")
api.upload_file(path_or_fileobj=b"dev notes", path_in_repo="notes.txt", repo_id=public_id, revision="dev")
out["dev"] = open(hf_hub_download(public_id, "notes.txt", revision="dev")).read()
out["main_after_dev"] = open(hf_hub_download(public_id, "notes.txt")).read()
out["branches"] = sorted(b.name for b in api.list_repo_refs(public_id).branches)
out["exists"] = [api.repo_exists(public_id), api.repo_exists("testuser/never-created"),
                 api.file_exists(public_id, "notes.txt"), api.file_exists(public_id, "nope.txt")]
try:
    hf_hub_download(public_id, "notes.txt", revision="no-such-revision")
except RevisionNotFoundError:
    out["missing_revision"] = "RevisionNotFoundError"

ModelCard("---\nlicense: mit\ntags:\n- domain-generalization\n---\n# Test model\n").push_to_hub(public_id)
card = ModelCard.load(public_id)
out["card"] = [card.data.license, card.data.tags, "# Test model" in card.text]

api.create_repo(doomed_id)
api.delete_repo(doomed_id)
out["deleted"] = not api.repo_exists(doomed_id)
print(json.dumps(out))
"""

ANONYMOUS_SCRIPT = r"""
import json
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

api, out = HfApi(), {{}}
out["public_read"] = open(hf_hub_download({public_id!r}, "notes.txt")).read()
try:
    api.model_info({private_id!r})
except RepositoryNotFoundError:
    out["private_read"] = "RepositoryNotFoundError"
try:
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id={public_id!r})
except HfHubHTTPError as err:
    out["anonymous_write"] = err.response.status_code
for attempt in ("injected", "retry"):  # the test armed fail_next on the commit endpoint
    try:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id={public_id!r}, token={token!r})
        out[attempt] = "ok"
    except HfHubHTTPError as err:
        out[attempt] = err.response.status_code
print(json.dumps(out))
"""


def test_huggingface_hub_client(hub_server: HubServer, tmp_path):
    ids = {name: hub_server.unique_repo_id(name) for name in ("private_id", "public_id", "doomed_id")}
    out = _last_json(hub_server.run_python(HUB_SCRIPT.format(**ids), tmp_path / "writer"))
    assert out["files"] == [".gitattributes", "notes.txt", "weights.bin"]
    assert out["info_sha"] == out["main_sha"] and out["lfs_files"] == ["weights.bin"]
    assert out["private"] == [True, False]
    assert out["by_branch"] == "hello hub" and out["by_sha_matches"] is True
    assert (out["dev"], out["main_after_dev"]) == ("dev notes", "hello hub")
    assert out["branches"] == ["dev", "main"]
    assert out["exists"] == [True, False, True, False]
    assert out["missing_revision"] == "RevisionNotFoundError"
    assert out["card"] == ["mit", ["domain-generalization"], True]
    assert out["deleted"] is True
    assert any(path.startswith("/_lfs/upload/") for _, path, _ in hub_server.requests)  # the binary went via LFS

    hub_server.fail_next("POST", f"/api/models/{ids['public_id']}/commit/", status=500)
    script = ANONYMOUS_SCRIPT.format(token=hub_server.token, **ids)
    out = _last_json(hub_server.run_python(script, tmp_path / "anonymous", token=False))
    assert out == {
        "public_read": "hello hub",
        "private_read": "RepositoryNotFoundError",
        "anonymous_write": 401,
        "injected": 500,
        "retry": "ok",
    }
    assert hub_server.errors == []


# Four deterministic 5x6 RGB images, as nested lists of pixel values.
IMAGES = [
    [[[(7 * i + 3 * y + x + 50 * c) % 256 for c in range(3)] for x in range(6)] for y in range(5)] for i in range(4)
]

PUSH_DATASET = r"""
import json, numpy as np
from PIL import Image
import datasets
images = [Image.fromarray(np.array(a, dtype=np.uint8)) for a in {images}]
features = datasets.Features({{"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"]),
                              "domain": datasets.Value("string")}})
domains = ["photo", "sketch", "photo", "art"]
ds = datasets.Dataset.from_dict({{"image": images, "label": [0, 1, 2, 1], "domain": domains}})
ds = ds.cast_column("label", features["label"]).cast_column("image", features["image"])
first = ds.push_to_hub({repo_id!r}, token={token!r})
# A second commit on main: loading by the first sha must still see the first rows.
ds.select([0]).push_to_hub({repo_id!r}, token={token!r})
print(json.dumps({{"sha": first.oid}}))
"""

LOAD_DATASET = r"""
import json, numpy as np
import datasets
ds = datasets.load_dataset({repo_id!r}, revision={sha!r}, split="train")
print(json.dumps({{"n": len(ds), "label": list(ds["label"]), "domain": list(ds["domain"]),
                  "names": ds.features["label"].names,
                  "image_types": sorted({{type(r["image"]).__name__ for r in ds}}),  # decoded PIL images
                  "images": [np.asarray(r["image"]).tolist() for r in ds]}}))
"""


def test_datasets_push_and_load_by_sha(hub_server: HubServer, tmp_path):
    repo_id = hub_server.unique_repo_id("dataset")
    push = PUSH_DATASET.format(images=IMAGES, repo_id=repo_id, token=hub_server.token)
    sha = _last_json(hub_server.run_python(push, tmp_path / "push", token=False))["sha"]
    load = LOAD_DATASET.format(repo_id=repo_id, sha=sha)
    out = _last_json(hub_server.run_python(load, tmp_path / "load", token=False))  # fresh HF_HOME, anonymous
    assert out["n"] == 4 and out["label"] == [0, 1, 2, 1] and out["names"] == ["a", "b", "c"]
    assert out["domain"] == ["photo", "sketch", "photo", "art"]
    assert out["image_types"] == ["PngImageFile"] and out["images"] == IMAGES
    assert hub_server.errors == []


UPLOAD_TIMM = r"""
import json, os, torch, timm
from huggingface_hub import HfApi
api, repo_id, logits = HfApi(), {repo_id!r}, {{}}
api.create_repo(repo_id)
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
for seed, branch in ((1, "v1"), (2, "main")):  # v1 keeps the first weights, main gets new ones
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    folder = os.path.join(os.environ["HF_HOME"], f"model-{{seed}}")
    timm.models.save_for_hf(model, folder, safe_serialization=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder)
    if branch == "v1":
        api.create_branch(repo_id, branch="v1")
    with torch.no_grad():
        logits[branch] = model(x).tolist()
print(json.dumps(logits))
"""

LOAD_TIMM = r"""
import json, torch, timm
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    print(json.dumps({{ref: timm.create_model("hf-hub:" + ref, pretrained=True).eval()(x).tolist()
                      for ref in ({repo_id!r}, {repo_id!r} + "@v1")}}))
"""


def test_timm_pretrained_from_hub(hub_server: HubServer, tmp_path):
    repo_id = hub_server.unique_repo_id("timm")
    saved = _last_json(hub_server.run_python(UPLOAD_TIMM.format(repo_id=repo_id), tmp_path / "upload"))
    loaded = _last_json(hub_server.run_python(LOAD_TIMM.format(repo_id=repo_id), tmp_path / "load", token=False))
    assert saved["main"] != saved["v1"]
    assert loaded[repo_id] == saved["main"]
    assert loaded[repo_id + "@v1"] == saved["v1"]
    assert hub_server.errors == []
