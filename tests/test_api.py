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


API = {"/analyze", "/generate", "/stream", "/extend", "/recommend", "/caption", "/status"}


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

@pytest.fixture(scope="module")
def photo_server(link_port):
    """A local web server with one JPEG, counting the requests it gets."""
    import http.server
    import threading

    body = images.encoded(images.photo(320, 240, seed=5), "JPEG")
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", link_port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{link_port}", seen
    server.shutdown()


@pytest.mark.parametrize("endpoint", ["analyze", "caption"])
def test_a_file_input_given_as_a_link_is_refused_before_anything_is_downloaded(live_app, photo_server, endpoint):
    """Gradio itself would download an http(s) FileData path (no size cap, per-read timeout only): the app refuses
    it at that door, through the raw HTTP API, and points to image_url."""
    import json

    base, seen = photo_server
    seen.clear()
    link = {"path": f"{base}/photo.jpg", "meta": {"_type": "gradio.FileData"}}
    payload = {"data": [link, 3, "", "", ""] if endpoint == "analyze" else [link, ""]}
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


def test_extending_an_unknown_clip_is_a_clear_message(client):
    with pytest.raises(Exception, match="can no longer be extended"):
        client.predict("no-such-clip", 2.0, "", 1, api_name="/extend")


def test_generate_takes_durations_past_the_models_window(client, pipeline):
    seconds = pipeline.settings.music_window_s + 4.0
    path = client.predict("slowly evolving ambient pads", seconds, 3, api_name="/generate")
    assert sf.info(path).duration == pytest.approx(seconds, abs=0.02)
