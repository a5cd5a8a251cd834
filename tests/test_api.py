"""The documented API, through gradio_client against the running app (demo models)."""

import urllib.request

import numpy as np
import pytest
import soundfile as sf
from gradio_client import handle_file

from pipeline.catalog import SongMatch
from scripts import sample_images as images

SONG_FIELDS = set(SongMatch.__dataclass_fields__)
EXAMPLE = "assets/examples/cat.jpg"


def test_the_page_answers(live_app):
    with urllib.request.urlopen(live_app, timeout=30) as response:
        assert response.status == 200
        assert "Picture Soundtrack" in response.read().decode()


def test_the_named_endpoints_are_listed(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/analyze", "/generate", "/recommend", "/caption"} <= set(endpoints)
    assert len(endpoints) == 4, "UI-only events must stay out of the API docs"


def test_analyze(client):
    result = client.predict(handle_file(EXAMPLE), 5, "", "", api_name="/analyze")
    assert result["caption"] and result["prompt"] and result["emotion"]
    assert 0 < result["confidence"] <= 1 and len(result["features"]) == 13
    for key in ("songs_by_features", "songs_by_lyrics", "songs_fused"):
        assert len(result[key]) == 5 and SONG_FIELDS <= set(result[key][0])
        assert all(0 <= song["score"] <= 1 for song in result[key])


def test_analyze_with_a_genre_and_words(client):
    result = client.predict(handle_file(EXAMPLE), 3, "jazz", "with a flute", api_name="/analyze")
    assert result["prompt"].startswith("jazz track") and "with a flute" in result["prompt"]


def test_generate_returns_a_wav(client):
    path = client.predict("lofi beat with rain", 2.0, 7, 1.0, 250, 0.0, 3.0, api_name="/generate")
    data, rate = sf.read(path)
    assert rate == 32000 and abs(len(data) - 64000) <= 640 and np.isfinite(data).all()


def test_recommend_by_text_and_by_features(client):
    by_text = client.predict("driving through the city at night", 4, None, api_name="/recommend")
    assert set(by_text) == {"songs_by_lyrics"} and len(by_text["songs_by_lyrics"]) == 4
    features = {"valence": 0.9, "energy": 0.8, "tempo": 124}
    both = client.predict("summer party", 4, features, api_name="/recommend")
    assert {"songs_by_lyrics", "songs_by_features", "songs_fused"} == set(both)


def test_caption(client):
    assert isinstance(client.predict(handle_file(EXAMPLE), api_name="/caption"), str)


@pytest.mark.parametrize("endpoint, args, message", [
    ("/generate", ("", 2.0, 1, 1.0, 250, 0.0, 3.0), "prompt is empty"),
    ("/generate", ("piano", 0, 1, 1.0, 250, 0.0, 3.0), "duration_s"),
    ("/generate", ("piano", 999, 1, 1.0, 250, 0.0, 3.0), "duration_s"),
    ("/generate", ("piano", 2.0, -4, 1.0, 250, 0.0, 3.0), "seed"),
    ("/generate", ("piano", 2.0, 1.5, 1.0, 250, 0.0, 3.0), "seed"),
    ("/generate", ("piano", 2.0, 1, 1.0, 250, 0.0, 99.0), "guidance_scale"),
    ("/recommend", ("", 5, None), "Give some text"),
    ("/recommend", ("love", 0, None), "k must be"),
    ("/recommend", ("love", 5000, None), "k must be"),
    ("/recommend", ("love", 5, {"valence": 7}), "outside its range"),
    ("/recommend", ("love", 5, "not json"), "features must be"),
    ("/analyze", (None, 5, "", ""), "No image"),
    ("/analyze", ("__IMAGE__", 5, "polka", ""), "Unknown genre"),
    ("/analyze", ("__IMAGE__", -2, "", ""), "k must be"),
])
def test_errors_are_clear_messages(client, endpoint, args, message):
    args = tuple(handle_file(EXAMPLE) if a == "__IMAGE__" else a for a in args)
    with pytest.raises(Exception) as info:
        client.predict(*args, api_name=endpoint)
    assert message in str(info.value), str(info.value)
    assert "Traceback" not in str(info.value)


def test_a_non_image_file_is_refused_and_the_next_request_works(client, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(images.truncated_jpeg()[:40] + b"garbage")
    with pytest.raises(Exception, match="image"):
        client.predict(handle_file(str(bad)), api_name="/caption")
    assert isinstance(client.predict(handle_file(EXAMPLE), api_name="/caption"), str)
