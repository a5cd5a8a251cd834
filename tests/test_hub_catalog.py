"""A catalog that lives on the Hub (`I2M_CATALOG`), against a local stand-in for the Hub on 127.0.0.1.

huggingface_hub reads `HF_ENDPOINT` when it is imported, so each load runs in a child process (`child()` below)
with the stand-in's address (`tests/fake_hub.py`); the small catalog built by the real build script plays both the
Hub's copy and the shipped `index/` the app falls back to.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.catalog_schema import file_sha256
from tests.fake_hub import OFFLINE, ROOT, FakeHub, child_env, run_child

REPO, COMMIT = "acme/songs", "fedcba9876543210fedcba9876543210fedcba98"
REF = f"{REPO}@{COMMIT}"
TOKEN = "hf_stand_in_write_token"


def child(index_dir: str, ref: str) -> None:
    """Runs in the child process: load the catalog as the app does and print what came of it as JSON."""
    from pipeline.hub_catalog import load_catalog
    from pipeline.settings import Settings

    loaded = load_catalog(Settings(index_dir=index_dir, catalog=ref))
    print(json.dumps({"source": loaded.source, "note": loaded.note, "path": str(loaded.catalog.path),
                      "counts": loaded.catalog.counts}))


def push_child(folder: str, repo: str, token: str) -> None:
    """Runs in the child process: publish a built catalog as `--push-to-hub` does and print the ref it returned."""
    from scripts.build_index import push_to_hub

    print(json.dumps({"ref": push_to_hub(Path(folder), repo, token)}))


def _load(hub: FakeHub | None, index_dir, hf_home, ref: str = REF) -> dict:
    return run_child(child, str(index_dir), ref, env=child_env(hub.endpoint if hub else OFFLINE, hf_home))


def _push(hub: FakeHub, folder, hf_home) -> str:
    return run_child(push_child, str(folder), REPO, TOKEN, env=child_env(hub.endpoint, hf_home))["ref"]


def _build_of(published: dict[str, bytes]) -> dict[str, bytes]:
    """A pushed commit's files less the two the push adds to any build: the Hub's `.gitattributes` and the card."""
    return {name: data for name, data in published.items() if name not in (".gitattributes", "README.md")}


def _files(index) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(index.iterdir()) if p.is_file()}


@pytest.fixture
def hub_files(small_index):
    return _files(small_index)


def _serve(files, **options) -> FakeHub:
    return FakeHub(files, delay_s=0, repo=REPO, commit=COMMIT, repo_type="dataset", **options)


def test_the_hub_catalog_is_downloaded_once_checked_and_then_read_from_the_cache(hub_files, small_index, tmp_path):
    shipped = tmp_path / "shipped"  # a different shipped catalog, so the test can tell which one was loaded
    shipped.mkdir()
    for name, data in hub_files.items():
        (shipped / name).write_bytes(data)
    hub = _serve(hub_files)
    try:
        first = _load(hub, shipped, tmp_path / "hf")
    finally:
        hub.close()
    assert first["source"] == "hub" and first["note"] is None, first
    assert first["path"] != str(shipped) and "datasets--acme--songs" in first["path"]
    got = {name for method, path in hub.requests if method == "GET" for name in hub_files if path.endswith(name)}
    assert got == set(hub_files)
    again = _load(None, shipped, tmp_path / "hf")  # the stand-in is gone: the copy in the cache serves
    assert again["source"] == "cache" and again["counts"] == first["counts"], again


def test_a_tampered_file_falls_back_to_the_shipped_catalog_with_a_note(hub_files, small_index, tmp_path):
    tampered = dict(hub_files)
    data = bytearray(tampered["features.faiss"])
    data[-5] ^= 0xFF
    tampered["features.faiss"] = bytes(data)
    hub = _serve(tampered)
    try:
        report = _load(hub, small_index, tmp_path / "hf")
    finally:
        hub.close()
    assert report["source"] == "index" and report["path"] == str(small_index)
    assert REF in report["note"] and "features.faiss does not match its checksum" in report["note"]


def test_an_interrupted_download_falls_back_then_completes_on_the_next_start(hub_files, small_index, tmp_path):
    hub = _serve(hub_files, cut={"lyrics.faiss": len(hub_files["lyrics.faiss"]) // 3})
    try:
        interrupted = _load(hub, small_index, tmp_path / "hf")
        assert interrupted["source"] == "index" and REF in interrupted["note"], interrupted
        assert sum(1 for method, path in hub.requests if method == "GET" and path.endswith("lyrics.faiss")) >= 2
        hub.cut.clear()  # the connection holds this time
        resumed = _load(hub, small_index, tmp_path / "hf")
    finally:
        hub.close()
    assert resumed["source"] == "hub" and resumed["note"] is None, resumed


def test_a_catalog_of_another_embedder_is_refused(hub_files, small_index, tmp_path):
    other = dict(hub_files)
    manifest = json.loads(other["manifest.json"])
    manifest["embedder"]["fingerprint"] = [[-v for v in row] for row in manifest["embedder"]["fingerprint"]]
    other["manifest.json"] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    hub = _serve(other)
    try:
        report = _load(hub, small_index, tmp_path / "hf")
    finally:
        hub.close()
    assert report["source"] == "index" and "another sentence embedder" in report["note"]


@pytest.mark.parametrize("ref", ["acme/songs", "not a repo@main"])
def test_a_setting_that_is_not_a_pinned_dataset_is_explained(small_index, tmp_path, ref):
    report = _load(None, small_index, tmp_path / "hf", ref=ref)
    assert report["source"] == "index" and "pinned revision" in report["note"]


def test_offline_falls_back_with_a_note(small_index, tmp_path):
    report = _load(None, small_index, tmp_path / "hf")
    assert report["source"] == "index" and REF in report["note"] and report["counts"]["songs"] > 0


def test_a_pushed_catalog_is_one_commit_that_the_app_then_loads_at_that_commit(hub_files, small_index, tmp_path):
    hub = FakeHub(delay_s=0, repo=REPO, repo_type="dataset", token=TOKEN)
    try:
        ref = _push(hub, small_index, tmp_path / "push")
        loaded = _load(hub, small_index, tmp_path / "hf", ref=ref)
    finally:
        hub.close()
    repo, _, commit = ref.partition("@")
    # the repo's first commit (made with the repo) and the catalog's, which is the one the ref pins
    assert repo == REPO and commit == hub.branches["main"] and len(hub.commits) == 2, (ref, hub.branches)
    published = hub.commits[commit]
    assert _build_of(published) == hub_files
    card = published["README.md"].decode()
    assert card.startswith("---\n") and yaml.safe_load(card.split("---\n")[1])["license"] == "odbl", card
    # the binary files went by LFS, each checked against its sha256 on arrival; the stand-in refuses them inline
    assert set(hub.lfs) == {hashlib.sha256(data).hexdigest() for name, data in hub_files.items()
                            if name != "manifest.json"}
    assert loaded["source"] == "hub" and loaded["note"] is None, loaded
    assert "datasets--acme--songs" in loaded["path"] and commit in loaded["path"]
    assert _files(Path(loaded["path"])) == published


def test_a_push_replaces_the_previous_build_in_the_same_commit(hub_files, small_index, tmp_path):
    # build A: the small catalog and one more file, listed in its manifest, that the later build B (the small
    # catalog itself) no longer writes, as when a builder drops or renames a file
    build_a = tmp_path / "a"
    shutil.copytree(small_index, build_a)
    dropped = "song_vectors.npy"
    np.save(build_a / dropped, np.arange(64, dtype=np.float32).reshape(8, 8))
    manifest = json.loads((build_a / "manifest.json").read_text())
    manifest["files"][dropped] = {"sha256": file_sha256(build_a / dropped), "bytes": (build_a / dropped).stat().st_size}
    (build_a / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    hub = FakeHub(delay_s=0, repo=REPO, repo_type="dataset", token=TOKEN)
    try:
        ref_a = _push(hub, build_a, tmp_path / "push")
        ref_b = _push(hub, small_index, tmp_path / "push")
        loaded = _load(hub, small_index, tmp_path / "hf", ref=ref_b)
    finally:
        hub.close()
    commit_a, commit_b = ref_a.partition("@")[2], ref_b.partition("@")[2]
    # one commit per push after the repo's first: B's deletion went in B's own commit
    assert len(hub.commits) == 3 and hub.branches["main"] == commit_b, (ref_a, ref_b, hub.branches)
    assert _build_of(hub.commits[commit_a]) == _files(build_a) and dropped in hub.commits[commit_a]
    assert set(hub.commits[commit_b]) == set(hub_files) | {".gitattributes", "README.md"}
    assert _build_of(hub.commits[commit_b]) == hub_files
    # the app, pinned to B, gets B's files and never asks for the dropped one
    assert loaded["source"] == "hub" and loaded["note"] is None, loaded
    assert _files(Path(loaded["path"])) == hub.commits[commit_b]
    assert not [path for method, path in hub.requests if path.endswith(dropped)]


def test_publishing_without_a_token_stops_before_the_build_with_a_clear_message(tmp_path):
    from scripts.build_index import push_to_hub

    message = "--push-to-hub needs a write token in HF_TOKEN."
    with pytest.raises(SystemExit, match=re.escape(message)):
        push_to_hub(tmp_path, REPO, "")
    # a build from the full tables takes minutes: an empty --data-dir shows the token is asked for first (the
    # build would stop on the missing tables with its own message)
    env = dict(os.environ)
    env.pop("HF_TOKEN", None)
    result = subprocess.run([sys.executable, "scripts/build_index.py", "--data-dir", str(tmp_path), "--out",
                             str(tmp_path / "out"), "--quiet", "--push-to-hub", REPO], env=env, cwd=str(ROOT),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().endswith(message), result.stderr[-2000:]
