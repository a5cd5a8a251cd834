"""Promises the README makes that nothing else tests: the prompt's genre rule, the zero-shot poles' direction,
IVF above the exact limit, the exact "still loading" message, Regenerate, streaming progress, the Analyze cache."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ComponentLoading
from pipeline.mood import POLES, ZeroShotMood
from pipeline.prompt import GENRES, genre_for

BASE = {"energy": 0.5, "valence": 0.5, "danceability": 0.5, "acousticness": 0.3, "instrumentalness": 0.1}


@pytest.mark.parametrize("changes, genre", [
    ({"instrumentalness": 0.8, "acousticness": 0.8, "energy": 0.6}, "cinematic"),
    ({"instrumentalness": 0.8, "acousticness": 0.8, "energy": 0.2}, "classical"),
    ({"energy": 0.2}, "ambient"),
    ({"acousticness": 0.8, "valence": 0.7}, "folk"),
    ({"acousticness": 0.8, "valence": 0.2}, "lo-fi"),
    ({"energy": 0.9, "danceability": 0.8}, "electronic"),
    ({"energy": 0.8, "valence": 0.2}, "rock"),
    ({"danceability": 0.8, "valence": 0.8, "energy": 0.7}, "funk"),
    ({"energy": 0.4}, "lo-fi"),
    ({}, "pop"),
])
def test_genre_for_follows_the_features(changes, genre):
    assert genre_for({**BASE, **changes}) == genre and genre in GENRES


def _unit(v):
    return v / np.linalg.norm(v)


def test_zero_shot_poles_point_the_right_way():
    """With hand-made text embeddings (one direction per pole), a photo that looks like the "joyful, energetic"
    prompts must get high valence and energy, and one like the "sad, calm" prompts low ones."""
    rng = np.random.default_rng(0)
    embeddings = {prompt: _unit(rng.normal(size=64)) for prompt in ZeroShotMood.prompts()}
    mood = ZeroShotMood(embeddings, logit_scale=100.0)

    def looking_like(*prompts):
        return _unit(np.sum([embeddings[p] for p in prompts], axis=0))

    happy = looking_like(*POLES["valence"][1], *POLES["energy"][1])
    sad = looking_like(*POLES["valence"][0], *POLES["energy"][0])
    image = Image.new("RGB", (8, 8), (200, 120, 40))
    up, down = mood.predict(np.stack([happy, sad]), [image, image])
    lo_v, hi_v = POLES["valence"][2:]
    assert up.features["valence"] > lo_v + 0.8 * (hi_v - lo_v) and down.features["valence"] < lo_v + 0.2 * (hi_v - lo_v)
    assert up.features["energy"] > down.features["energy"] + 0.5
    assert up.emotion in ("excitement", "amusement") and down.emotion in ("sadness", "contentment")


def test_ivf_above_the_exact_limit_keeps_its_recall():
    from pipeline import vector_index

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(64, 14)).astype(np.float32)
    vectors = (centres[rng.integers(0, 64, 60_000)] + 0.3 * rng.normal(size=(60_000, 14))).astype(np.float32)
    queries = vectors[rng.choice(60_000, 200, replace=False)] + 0.05 * rng.normal(size=(200, 14)).astype(np.float32)
    exact = vector_index.build(vectors, "l2")
    ivf = vector_index.build(vectors, "l2", exact_limit=10_000)
    assert vector_index.is_exact(exact) and not vector_index.is_exact(ivf)
    _, truth = vector_index.search(exact, queries, 10)
    _, got = vector_index.search(ivf, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got)])
    assert recall >= 0.95, recall


def test_a_model_still_loading_answers_with_the_exact_message(settings, tmp_path):
    from pipeline.core import Pipeline

    pipe = Pipeline(settings.replace(load_wait_s=0.0, cache_dir=str(tmp_path)))  # nothing can be loaded in 0 s
    with pytest.raises(ComponentLoading) as info:
        pipe.generate("piano", 1.0, 1)
    assert str(info.value) == "The music model is still loading; try again in a few seconds."
    pipe.wait_until_ready(300)


class FakeRequest:
    headers = {"x-forwarded-for": "203.0.113.5"}
    client = None


@pytest.fixture(scope="module")
def handlers(pipeline, settings):
    import app as app_module

    return app_module.Handlers(pipeline, settings)


def test_regenerate_keeps_an_edited_prompt_verbatim_and_rebuilds_an_untouched_one(handlers):
    from app import AnalyzeView

    view = dict(zip(AnalyzeView.FIELDS, handlers.analyze("assets/examples/cat.jpg", "", "", 5)))
    state = view["state"]
    rebuilt = handlers.regenerate_songs("a red bicycle by the sea", state["prompt"], "", "", 5, state)[0]
    assert rebuilt != state["prompt"] and "red bicycle by the sea" in rebuilt
    mine = "slow jazz with brushes, upright bass, 80 BPM"
    kept = handlers.regenerate_songs("a red bicycle by the sea", mine, "", "", 5, state)
    assert kept[0] == mine and len(kept[1]) == 5 and kept[-1]["caption"] == "a red bicycle by the sea"


def test_generation_in_the_ui_shows_progress_then_offers_the_download(handlers):
    updates = list(handlers.generate("calm piano", 2.5, 7, 1.0, 250, 0.0, 3.0, False, None, FakeRequest()))
    statuses = [u[2] for u in updates]
    assert statuses[0].startswith("⏳")
    progress = [s for s in statuses if s.startswith("🎶")]
    made = [float(s.split()[1]) for s in progress]
    assert len(progress) >= 3 and made == sorted(made) and made[-1] == pytest.approx(2.5)
    assert statuses[-1].startswith("✅ Done: 2.5 s, seed 7")
    clip = updates[-1][3]
    assert clip["id"] and clip["prompt"] == "calm piano"
    assert all(isinstance(u[0], bytes) and u[0][:4] == b"RIFF" for u in updates if u[2].startswith("🎶"))


def test_the_same_photo_under_another_name_is_answered_from_the_cache(client, pipeline, tmp_path, monkeypatch):
    from gradio_client import handle_file

    from scripts import sample_images as images

    data = images.encoded(images.photo(200, 150, seed=42), "PNG")
    first, second = tmp_path / "one.png", tmp_path / "two.png"
    first.write_bytes(data)
    second.write_bytes(data)
    captioner = pipeline.component("caption model")
    calls = []
    original = captioner.caption

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(captioner, "caption", counting)
    a = client.predict(handle_file(str(first)), 4, "", "", api_name="/analyze")
    b = client.predict(handle_file(str(second)), 4, "", "", api_name="/analyze")
    assert len(calls) == 1 and a["caption"] == b["caption"] and a["songs_fused"] == b["songs_fused"]


def test_free_text_is_cleaned_before_it_reaches_the_cache(client, pipeline):
    """Extras that differ only past the prompt limit are the same request: one cache entry, bounded bytes."""
    from gradio_client import handle_file

    before = pipeline.cached_analyses
    for i in range(6):
        extra = "with strings " + "x" * (pipeline.settings.max_prompt_chars + 10) + str(i) * 200_000
        result = client.predict(handle_file("assets/examples/coffee.jpg"), 3, "", extra, api_name="/analyze")
        assert len(result["prompt"]) <= pipeline.settings.max_prompt_chars
    assert pipeline.cached_analyses <= before + 1
    assert pipeline.cached_analysis_bytes <= pipeline.settings.analyze_cache_mb * 1e6


def test_k_of_exactly_the_limit_works_and_one_more_is_refused(client, pipeline):
    limit = pipeline.settings.max_k
    songs = client.predict("love and heartbreak", limit, None, api_name="/recommend")["songs_by_lyrics"]
    assert 1 <= len(songs) <= limit
    with pytest.raises(Exception, match=f"k must be a whole number from 1 to {limit}"):
        client.predict("love and heartbreak", limit + 1, None, api_name="/recommend")


def test_the_upload_limit_is_enforced_by_the_web_server(live_app, pipeline):
    import urllib.error
    import urllib.request
    import uuid

    boundary = uuid.uuid4().hex
    size = int(pipeline.settings.max_upload_mb * 1e6) + 1_000_000
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + b"\0" * size + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{live_app}gradio_api/upload", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=60)
    assert info.value.code == 413


@pytest.mark.parametrize("bad", ['"><script>alert(1)</script>', "javascript:alert(1)", "0" * 21, "x" * 23, ""])
def test_only_well_formed_spotify_ids_reach_a_link_or_the_player(bad):
    """A rebuilt catalog is not trusted: an id that is not 22 base-62 characters never reaches HTML or a link."""
    import app as app_module

    song = {"title": "T", "artist": "A", "year": 2000, "genre": "pop", "score": 0.5, "why": "w",
            "spotify_id": bad, "spotify_url": f"https://open.spotify.com/track/{bad}"}
    assert app_module.Handlers.spotify_player(song) == ""
    assert app_module.song_rows([song])[0][1] == "T"
    good = {**song, "spotify_id": "4uLU6hMCjMI75M1A2tKUQC", "spotify_url": "https://open.spotify.com/track/x"}
    player = app_module.Handlers.spotify_player(good)
    assert 'sandbox="' in player and "embed/track/4uLU6hMCjMI75M1A2tKUQC" in player
    assert app_module.song_rows([good])[0][1].startswith("[T](")


def test_extend_in_the_ui_continues_the_last_clip_and_the_download_holds_the_whole_piece(handlers):
    import soundfile as sf

    first = list(handlers.generate("calm piano", 1.5, 7, 1.0, 250, 0.0, 3.0, False, None, FakeRequest()))
    clip = first[-1][3]
    more = list(handlers.extend("calm piano with soft strings", 1.0, 8, 1.0, 250, 0.0, 3.0, False, clip,
                                FakeRequest()))
    status, extended = more[-1][2], more[-1][3]
    assert status.startswith("✅ Done: extended by 1.0 s") and extended["id"] != clip["id"]
    assert extended["prompt"] == "calm piano with soft strings"
    assert sf.info(extended["wav"]).duration == pytest.approx(2.5, abs=0.02)
    head = sf.read(clip["wav"], dtype="float32")[0]
    assert np.array_equal(sf.read(extended["wav"], dtype="float32")[0][: len(head)], head)
    with pytest.raises(Exception, match="Make a clip first"):
        list(handlers.extend("x", 1.0, 1, 1.0, 250, 0.0, 3.0, False, None, FakeRequest()))
