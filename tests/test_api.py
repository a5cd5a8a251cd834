"""The documented API, through gradio_client against the running app (demo models)."""

import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from gradio_client import handle_file

from pipeline.catalog import SongMatch
from scripts import sample_images as images
from tests.conftest import ffmpeg, ffprobe

SONG_FIELDS = set(SongMatch.__dataclass_fields__)
EXAMPLE = "assets/examples/cat.jpg"


def test_the_page_answers(live_app):
    with urllib.request.urlopen(live_app, timeout=30) as response:
        assert response.status == 200
        assert "Picture Soundtrack" in response.read().decode()


API = {"/analyze", "/generate", "/stream", "/extend", "/recommend", "/caption", "/status", "/share_video", "/album",
       "/video_soundtrack"}


def test_the_named_endpoints_are_listed(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(endpoints) == API, "UI-only events must stay out of the API docs"


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
    assert not any("mood" in s["why"] for s in both["songs_by_features"])  # no acousticness: by sound alone
    happy = {"valence": 0.9, "energy": 0.8, "danceability": 0.8, "acousticness": 0.1}
    found = client.predict("", 4, happy, api_name="/recommend")["songs_by_features"]
    assert len(found) == 4 and all(s["why"].startswith("happy mood ") for s in found), found


def test_recommend_and_analyze_take_filters(client):
    filters = {"genre": "rock", "popularity": [10, 100]}
    lists = client.predict("rain on the window", 5, {"valence": 0.3, "energy": 0.5}, filters, api_name="/recommend")
    assert {"songs_by_lyrics", "songs_by_features", "songs_fused"} <= set(lists)
    for song in (s for key in ("songs_by_lyrics", "songs_by_features", "songs_fused") for s in lists[key]):
        assert "rock" in song["families"] and 10 <= song["popularity"] <= 100 and song["genres"]
        assert {"genres", "families", "year", "popularity"} <= set(song)
    assert len(lists["songs_by_features"]) == 5
    as_text = client.predict("rain on the window", 5, None, '{"genre": "rock"}', api_name="/recommend")
    assert all("rock" in s["families"] for s in as_text["songs_by_lyrics"])
    result = client.predict(handle_file(EXAMPLE), 5, "", "", "", {"genre": "jazz", "years": [1900, 1901]},
                            api_name="/analyze")
    assert result["songs_by_features"] == result["songs_by_lyrics"] == result["songs_fused"] == []
    assert any("leave 0 songs" in note for note in result["notes"])


def test_caption(client, pipeline):
    caption = client.predict(handle_file(EXAMPLE), api_name="/caption")
    assert isinstance(caption, str) and caption.strip()
    assert caption == pipeline.caption(EXAMPLE)  # the same model and photo through the API and in process


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
    ("/recommend", ("love", 5, None, {"decade": 1980}), "Unknown filter 'decade'"),
    ("/recommend", ("love", 5, None, {"genre": "polka"}), "Unknown genre 'polka'"),
    ("/recommend", ("love", 5, None, "{not json"), "filters must be a JSON object"),
    ("/recommend", ("love", 5, {"valence": 0.5}, {"popularity": [50, 500]}), "filters.popularity must be"),
    ("/analyze", ("__IMAGE__", 5, "", "", "", {"years": [2000, 1990]}), "runs backwards"),
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
    assert client.predict(handle_file(EXAMPLE), api_name="/caption").strip()


# -- photos from links -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", ["analyze", "caption"])
def test_a_file_input_given_as_a_link_is_refused_before_anything_is_downloaded(live_app, photo_server, endpoint):
    """Gradio itself would download an http(s) FileData path (no size cap, per-read timeout only): the app refuses
    it at that door, through the raw HTTP API, and points to image_url."""
    import json

    base, seen = photo_server
    seen.clear()
    link = {"path": f"{base}/photo.jpg", "meta": {"_type": "gradio.FileData"}}
    payload = {"data": [link, 3, "", "", "", None] if endpoint == "analyze" else [link, ""]}
    url = f"{live_app}gradio_api/call/{endpoint}"
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{url}/{event_id}", timeout=60) as response:
        events = response.read().decode()
    assert "event: error" in events and "image_url" in events, events
    assert seen == []


def test_analyze_and_caption_take_a_photo_link(client, photo_server):
    base, seen = photo_server
    result = client.predict(None, 3, "", "", f"{base}/photo.jpg", api_name="/analyze")
    assert result["caption"] and len(result["songs_fused"]) == 3
    assert client.predict(None, f"{base}/photo.jpg", api_name="/caption")
    assert seen  # fetched by the app's own fetcher


@pytest.mark.parametrize("link, message", [
    ("http://10.1.2.3/photo.jpg", "private network"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("file:///etc/passwd", "only http and https"),
    ("https://user:secret@example.com/x.jpg", "password"),
])
def test_bad_photo_links_get_a_clear_message(client, link, message):
    with pytest.raises(Exception) as info:
        client.predict(None, 3, "", "", link, api_name="/analyze")
    assert message in str(info.value), str(info.value)


def test_an_image_and_a_link_together_are_refused(client, photo_server):
    with pytest.raises(Exception, match="either an image or an image_url"):
        client.predict(handle_file(EXAMPLE), 3, "", "", f"{photo_server[0]}/photo.jpg", api_name="/analyze")


# -- MCP ---------------------------------------------------------------------------------------------------------

def test_the_tools_are_listed_and_callable_through_the_mcp_endpoint(live_app):
    """An LLM agent's view: the MCP server (streamable HTTP) lists the four tools with their parameters, and a
    call returns the same data as the API."""
    import asyncio

    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def session_calls():
        async with streamable_http_client(f"{live_app}gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = {tool.name: tool for tool in (await session.list_tools()).tools}
                called = await session.call_tool("recommend", {"text": "dancing in the summer rain", "k": 2})
                return tools, called

    tools, called = asyncio.run(session_calls())
    assert {"analyze", "caption", "generate", "recommend"} <= set(tools)
    assert {"image", "image_url", "k", "genre", "extra"} <= set(tools["analyze"].inputSchema["properties"])
    assert {"prompt", "duration_s", "seed"} <= set(tools["generate"].inputSchema["properties"])
    assert "lyrics" in tools["recommend"].description
    assert not called.isError
    text = called.content[0].text
    assert text.count("'spotify_url'") + text.count('"spotify_url"') == 2, text[:300]


def test_status_is_a_health_report_without_secrets_or_paths(client, pipeline):
    report = client.predict(api_name="/status")
    assert report["state"] == "ready" and report["mode"] == "demo" and report["device"] == "cpu"
    parts = {part["name"]: part for part in report["components"]}
    assert set(parts) == {"song catalog", "sentence embedder", "mood model", "caption model", "music model"}
    assert parts["sentence embedder"]["source"] == "package" and parts["music model"]["weights"]
    assert all(part["state"] == "ready" and part["load_s"] is not None for part in parts.values())
    assert report["catalog"]["songs"] > 0 and report["music_line"] == pipeline.music_line
    text = str(report)
    assert str(pipeline.settings.cache_dir) not in text and "/root" not in text and "/home/" not in text


def test_stream_yields_chunks_then_the_whole_clip_and_extend_continues_it(client):
    job = client.submit("warm synth pads", 3.0, 11, api_name="/stream")
    events = list(job)
    assert events and events[-1]["is_last"] and sum(e["is_last"] for e in events) == 1
    assert [e["index"] for e in events] == list(range(len(events)))
    assert sum(e["seconds"] for e in events) == pytest.approx(3.0, abs=0.02)
    assert sf.info(events[0]["audio"]).duration == pytest.approx(events[0]["seconds"], abs=1e-3)
    whole, clip_id = events[-1]["wav"], events[-1]["clip_id"]
    assert sf.info(whole).duration == pytest.approx(3.0, abs=0.02) and clip_id
    streamed = np.concatenate([sf.read(e["audio"], dtype="float32")[0] for e in events])
    assert np.array_equal(streamed, sf.read(whole, dtype="float32")[0])

    more = list(client.submit(clip_id, 2.0, "the same pads, now with a slow drum beat", 12, api_name="/extend"))
    assert sum(e["seconds"] for e in more) == pytest.approx(2.0, abs=0.02)
    assert more[-1]["clip_id"] and more[-1]["clip_id"] != clip_id  # an extension can be extended in turn
    again = list(client.submit(more[-1]["clip_id"], 1.0, "", 13, api_name="/extend"))
    assert sum(e["seconds"] for e in again) == pytest.approx(1.0, abs=0.02)


def test_the_wav_generate_returned_is_enough_to_extend_it(client):
    wav = client.predict("a slow waltz on a music box", 1.0, 5, api_name="/generate")
    for handle in (wav, Path(wav).name):  # the path gradio_client downloaded to, or just the file's name
        more = list(client.submit(handle, 1.0, "", 6, api_name="/extend"))
        assert sum(e["seconds"] for e in more) == pytest.approx(1.0, abs=0.02)
        assert more[-1]["clip_id"] in Path(more[-1]["wav"]).name  # and the extension's WAV can be extended in turn
    again = list(client.submit(more[-1]["wav"], 1.0, "", 7, api_name="/extend"))
    assert sum(e["seconds"] for e in again) == pytest.approx(1.0, abs=0.02)


def test_extending_an_unknown_clip_is_a_clear_message(client):
    with pytest.raises(Exception, match="can no longer be extended"):
        client.predict("no-such-clip", 2.0, "", 1, api_name="/extend")


def test_generate_takes_durations_past_the_models_window(client, pipeline):
    seconds = pipeline.settings.music_window_s + 4.0
    path = client.predict("slowly evolving ambient pads", seconds, 3, api_name="/generate")
    assert sf.info(path).duration == pytest.approx(seconds, abs=0.02)


# -- video & album -----------------------------------------------------------------------------------------------

FRAME_S = 1 / 25  # of the videos made from photos


def mp4_facts(path) -> dict:
    data = ffprobe(path)
    kinds = [s["codec_type"] for s in data["streams"]]
    return {"format": data["format"]["format_name"], "duration": float(data["format"]["duration"]),
            "video": kinds.count("video"), "audio": kinds.count("audio"),
            "codecs": sorted(s["codec_name"] for s in data["streams"])}


@pytest.fixture(scope="module")
def media_inputs(tmp_path_factory) -> dict:
    """Made with FFmpeg's test sources: a 5 s clip with a cut at 2.5 s, and the files the endpoints must refuse."""
    folder = tmp_path_factory.mktemp("api-media")
    paths = {name: folder / name for name in ("clip.mp4", "corrupt.mp4", "truncated.mp4", "sound.m4a",
                                               "long.mp4", "wide.mp4", "tone.wav", "broken.jpg")}
    ffmpeg("-f", "lavfi", "-i", "smptebars=s=160x90:r=10:d=2.5",
           "-f", "lavfi", "-i", "color=c=red:s=160x90:r=10:d=2.5",
           "-f", "lavfi", "-i", "sine=f=440:d=5", "-filter_complex", "[0:v][1:v]concat=n=2:v=1:a=0[v]",
           "-map", "[v]", "-map", "2:a", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
           "-c:a", "aac", "-movflags", "+faststart", str(paths["clip.mp4"]))
    whole = paths["clip.mp4"].read_bytes()
    paths["truncated.mp4"].write_bytes(whole[:len(whole) // 2])
    paths["corrupt.mp4"].write_bytes(np.random.default_rng(1).bytes(20_000))
    ffmpeg("-f", "lavfi", "-i", "sine=d=2", "-c:a", "aac", str(paths["sound.m4a"]))
    ffmpeg("-f", "lavfi", "-i", "color=s=32x32:r=1:d=61", "-c:v", "libx264", "-preset", "ultrafast",
           "-pix_fmt", "yuv420p", str(paths["long.mp4"]))
    ffmpeg("-f", "lavfi", "-i", "color=s=8200x64:r=5:d=0.4", "-c:v", "libx264", "-preset", "ultrafast",
           "-pix_fmt", "yuv420p", str(paths["wide.mp4"]))
    t = np.arange(64000) / 32000
    sf.write(paths["tone.wav"], (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 32000)
    paths["broken.jpg"].write_bytes(images.truncated_jpeg()[:60] + b"garbage")
    return paths


def test_share_video_is_the_photo_for_the_length_of_the_music(client, media_inputs):
    path = client.predict(handle_file(EXAMPLE), handle_file(str(media_inputs["tone.wav"])), True, "A title",
                          "a caption", api_name="/share_video")
    facts = mp4_facts(path)
    assert "mp4" in facts["format"] and facts["video"] == 1 and facts["audio"] == 1
    assert facts["codecs"] == ["aac", "h264"] and abs(facts["duration"] - 2.0) <= FRAME_S + 1e-6


def test_album_is_a_slideshow_of_the_asked_length(client):
    photos = [handle_file("assets/examples/coffee.jpg"), handle_file(EXAMPLE)]
    path = client.predict(photos, 3.0, 5, api_name="/album")
    facts = mp4_facts(path)
    assert facts["video"] == 1 and facts["audio"] == 1 and abs(facts["duration"] - 3.0) <= FRAME_S + 1e-6


def test_video_soundtrack_returns_the_clip_with_music(client, media_inputs, pipeline):
    path = client.predict(handle_file(str(media_inputs["clip.mp4"])), 9, True, api_name="/video_soundtrack")
    facts = mp4_facts(path)
    assert facts["video"] == 1 and facts["audio"] == 1 and abs(facts["duration"] - 5.0) <= 0.1
    assert pipeline.music_line == {"running": 0, "waiting": 0}


@pytest.mark.parametrize("endpoint, args, message", [
    ("/video_soundtrack", ("corrupt.mp4", 1, False), "could not be read as a video"),
    ("/video_soundtrack", ("truncated.mp4", 1, False), "truncated"),
    ("/video_soundtrack", ("sound.m4a", 1, False), "is an audio file"),
    ("/video_soundtrack", ("long.mp4", 1, False), "the limit is 60 s"),
    ("/video_soundtrack", ("wide.mp4", 1, False), "the limit is 8192 px"),
    ("/video_soundtrack", (None, 1, False), "No video was given"),
    ("/video_soundtrack", ("clip.mp4", -1, False), "seed"),
    ("/album", ([], 6.0, 1), "2 to 10 photos; 0 were given"),
    ("/album", (["__IMAGE__"] * 11, 20.0, 1), "2 to 10 photos; 11 were given"),
    ("/album", (["__IMAGE__", "broken.jpg"], 4.0, 1), "photo 2 (broken.jpg)"),
    ("/album", (["__IMAGE__", "__IMAGE__"], 90.0, 1), "duration_s must be between 1 and 60 seconds"),
    ("/share_video", ("__IMAGE__", "corrupt.mp4"), "could not be read"),
    ("/share_video", ("broken.jpg", "tone.wav"), "image"),
])
def test_bad_video_inputs_get_clear_messages_and_the_app_keeps_serving(client, media_inputs, pipeline, endpoint,
                                                                       args, message):
    def file(value):
        if value == "__IMAGE__":
            return handle_file(EXAMPLE)
        if isinstance(value, str) and value in media_inputs:
            return handle_file(str(media_inputs[value]))
        if isinstance(value, list):
            return [file(v) for v in value]
        return value

    with pytest.raises(Exception) as info:
        client.predict(*(file(a) for a in args), api_name=endpoint)
    assert message in str(info.value), str(info.value)
    assert "Traceback" not in str(info.value)
    assert pipeline.music_line == {"running": 0, "waiting": 0}
    assert client.predict(api_name="/status")["state"] == "ready"


def test_background_work_reports_returns_and_raises_on_the_handlers_thread():
    import threading

    from app import Background

    def work(steps, *, progress, cancel):
        for k in range(steps):
            progress((k + 1) / steps, f"step {k + 1}")
        return "made"

    with Background(work, 3) as job:
        seen = list(job)
    assert job.result == "made" and seen[-1] == (1.0, "step 3")

    def failing(*, progress, cancel):
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        with Background(failing) as job:
            list(job)

    started, stopped = threading.Event(), threading.Event()

    def endless(*, progress, cancel):
        started.set()
        while not cancel.wait(0.05):
            progress(0.5, "working")
        stopped.set()

    with Background(endless) as job:  # the handler leaves early, as when Gradio closes it for a gone visitor
        next(iter(job))
    assert started.is_set() and stopped.wait(5)


def test_background_work_hands_over_every_chunk_of_music_it_heard():
    import io

    import numpy as np
    import soundfile as sf

    from app import Background

    def work(*, progress, cancel, listen):
        for k in range(5):  # bursts: several chunks may arrive between two looks
            listen(np.full(100, k / 10, np.float32), 8000)
            progress((k + 1) / 5, f"chunk {k + 1}")
        return "made"

    heard = []
    with Background(work, music=True) as job:
        for _ in job:
            wav = job.take_music()
            if wav is not None:
                heard.append(sf.read(io.BytesIO(wav), dtype="float32")[0])
    wav = job.take_music()
    if wav is not None:
        heard.append(sf.read(io.BytesIO(wav), dtype="float32")[0])
    music = np.concatenate(heard)
    assert job.result == "made" and music.shape == (500,)
    assert np.allclose(music[::100], [0.0, 0.1, 0.2, 0.3, 0.4], atol=1e-4)
