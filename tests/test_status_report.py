"""The `/status` health report and the offline banner: what they say, and what they never show."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.components import (CAPTION, CATALOG, EMBEDDER, MOOD, MUSIC, Components, ComponentStatus,
                                 missing_models_message, status_report)
from pipeline.settings import REPO_ROOT, Settings


def test_the_report_is_json_and_hides_tokens_and_paths_outside_the_app(tmp_path):
    from huggingface_hub import constants

    token = "hf_abcdefSECRET0123456789"
    cache = tmp_path / "app-cache"
    settings = Settings(hf_token=token, cache_dir=str(cache))
    home = str(Path.home())
    statuses = [
        ComponentStatus(CATALOG, "ready", "12,000 songs", 0.4, source="index", counts={"songs": 12000}),
        ComponentStatus(CAPTION, "failed", f"Could not load {home}/models/blip with token {token}; see "
                        f"{constants.HF_HUB_CACHE}/models--x and {REPO_ROOT}/index/manifest.json", 1.5),
        ComponentStatus(MUSIC, "ready", f"{cache}/demo-models/music (local), 3 / 9 files at 38 MB/s", 2.0,
                        source="local", weights="int5-native", device="cpu",
                        selfcheck={"kl": [float("nan"), 1e-4], "passed": True}),
    ]
    report = status_report(statuses, settings, device="cpu", queue_length=0)
    text = json.dumps(report, allow_nan=False)
    assert token not in text and home not in text and str(cache) not in text and str(REPO_ROOT) not in text
    caption = report["components"][1]["detail"]
    assert "<HF_TOKEN>" in caption and "<path>" in caption and "<hf-cache>/models--x" in caption
    assert "index/manifest.json" in caption
    music = report["components"][2]
    assert music["detail"].startswith("<app-cache>/demo-models/music") and "3 / 9 files at 38 MB/s" in music["detail"]
    assert music["selfcheck"]["kl"] == [None, 1e-4] and music["weights"] == "int5-native"
    assert report["state"] == "degraded" and report["catalog"] == {"songs": 12000} and report["queue_length"] == 0


def test_overall_state_follows_the_parts():
    settings = Settings()
    ready = [ComponentStatus(name, "ready") for name in (CATALOG, MUSIC)]
    assert status_report(ready, settings)["state"] == "ready"
    assert status_report(ready + [ComponentStatus(CAPTION, "loading")], settings)["state"] == "loading"
    assert "queue_length" not in status_report(ready, settings)
    assert missing_models_message(ready) is None


def test_missing_models_offline_give_one_banner(cache_dir):
    """HF_HUB_OFFLINE=1 (the tests' environment) and Hub ids with no cached copy: the state of a Space whose
    first start cannot download."""
    settings = Settings(caption_model="nobody/missing-blip", clip_model="nobody/missing-clip",
                        music_model="nobody/missing-musicgen", cache_dir=str(cache_dir))
    components = Components(settings, on_compute_thread=lambda: False)
    assert components.wait_until_ready(timeout=600)
    statuses = {s.name: s for s in components.status()}
    assert all(statuses[name].state == "failed" and statuses[name].offline for name in (MOOD, CAPTION, MUSIC))
    assert statuses[CATALOG].state == statuses[EMBEDDER].state == "ready"
    assert not statuses[CATALOG].offline
    banner = missing_models_message(list(statuses.values()))
    assert banner.startswith("Offline: the mood model, caption model and music model are not downloaded")
    assert "Analyze" in banner and "Generate" in banner and "song catalog" in banner and "--demo" in banner
    assert status_report(list(statuses.values()), settings)["banner"] == banner


def test_a_wrong_local_path_is_not_an_offline_failure(cache_dir, tmp_path):
    settings = Settings(music_model=str(tmp_path / "no-such-folder"), cache_dir=str(cache_dir),
                        caption_model=str(tmp_path / "nor-this"), clip_model=str(tmp_path / "nor-that"))
    components = Components(settings, on_compute_thread=lambda: False)
    assert components.wait_until_ready(timeout=600)
    music = next(s for s in components.status() if s.name == MUSIC)
    assert music.state == "failed" and not music.offline
    assert missing_models_message(components.status()) is None


def test_the_report_survives_a_gradio_api_round_trip():
    """What app.py's `/status` endpoint will do: return `status_report(...)` from a `gr.api` function."""
    import gradio as gr
    from gradio_client import Client

    from tests.conftest import free_port

    settings = Settings()
    statuses = [ComponentStatus(CATALOG, "ready", "3 songs", 0.1, source="index", counts={"songs": 3}),
                ComponentStatus(MUSIC, "loading", "downloading 1.0 MB / 2.0 MB (50%)", None, source=None,
                                progress={"bytes": 10**6, "total": 2 * 10**6, "bytes_per_s": 5, "finished": False},
                                selfcheck={"checks": [{"kl": [1e-4, 2e-4], "passed": True}]})]

    def status() -> dict:
        """The app's health."""
        return status_report(statuses, settings, device="cpu", queue_length=2)

    with gr.Blocks() as demo:
        gr.api(status, api_name="status")
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        got = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(api_name="/status")
    finally:
        demo.close()
    assert got == status()
    assert got["state"] == "loading" and got["components"][1]["download"]["bytes"] == 10**6
