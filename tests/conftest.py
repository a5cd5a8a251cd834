"""Shared fixtures: tiny demo models, a small catalog slice, a ready pipeline and a running app.

Everything runs offline: the Hub is never contacted (HF_HUB_OFFLINE=1) and gradio sends no analytics.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT.parent / "shared" / "data"
ARTIFACTS = ROOT / "tests" / "artifacts"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def reference_feature_scores(space, matrix, query: dict):
    """What the audio-feature search ranks by, written out from the public pieces and independently of its search
    paths: sound similarity over the features the query gives, times the mood fit when it gives every mood
    feature (`pipeline.song_moods`). `matrix`: (n, 13) Spotify units."""
    import numpy as np

    from pipeline import song_moods
    from pipeline.features import FEATURES

    present = np.array([f in query for f in FEATURES])
    columns = space.column_mask(present)
    full = np.array([[query.get(f, 0.0) for f in FEATURES]])
    vectors = space.transform(matrix)[:, columns].astype(float)
    target = space.transform(full)[0, columns].astype(float)
    scores = np.exp(-np.sum((vectors - target) ** 2, axis=1) / (space.tau * space.weight_share(present)))
    model = song_moods.load()
    if all(f in query for f in model.features):
        mine = model.probabilities(full)[0]
        scores *= model.probabilities(matrix) @ mine / mine.max()
    return scores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]



def ffmpeg(*args: str) -> None:
    """Run FFmpeg quietly (the media tests make their inputs from its test sources)."""
    subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-y", *args], check=True,
                   capture_output=True)


def ffprobe(path) -> dict:
    """ffprobe's JSON for a media file, with its video and audio streams listed apart."""
    out = subprocess.run(["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams",
                          str(path)], check=True, capture_output=True).stdout
    data = json.loads(out)
    data["video"] = [s for s in data["streams"] if s["codec_type"] == "video"]
    data["audio"] = [s for s in data["streams"] if s["codec_type"] == "audio"]
    return data

@pytest.fixture(scope="session")
def cache_dir():
    """Outside both /tmp and the working directory, like the app's default (~/.cache/image-to-music): Gradio only
    serves files from such a folder when the app allows it, and the tests must see that."""
    import shutil
    import uuid

    folder = Path.home() / ".cache" / f"image-to-music-tests-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_paths(cache_dir):
    from pipeline.demo_models import ensure_demo_models

    return ensure_demo_models(cache_dir)


@pytest.fixture(scope="session")
def small_index(tmp_path_factory) -> Path:
    """A catalog built by the real build script from a deterministic slice of ../shared/data."""
    if not DATA_DIR.is_dir():  # most of the suite needs it: a quiet skip would pass a suite that tested little
        pytest.fail(f"{DATA_DIR} is missing: the tests build their catalog slice from the shared song tables "
                    "(CI and every developer machine have ../shared/data beside the repository).")
    from scripts import build_index

    out = tmp_path_factory.mktemp("index")
    build_index.build(build_index.parse_args(["--out", str(out), "--limit-songs", "600",
                                              "--max-passages-per-song", "3", "--quiet"]))
    return out


@pytest.fixture(scope="session")
def embedder():
    from pipeline.artifacts import MINILM_ID, ArtifactSpec, resolve
    from pipeline.embedder import SentenceEmbedder
    from pipeline.settings import EMBEDDER_REVISIONS

    spec = ArtifactSpec("sentence embedder", MINILM_ID, EMBEDDER_REVISIONS[MINILM_ID])
    return SentenceEmbedder(resolve(spec).path, MINILM_ID, EMBEDDER_REVISIONS[MINILM_ID])


@pytest.fixture(scope="session")
def catalog(small_index, embedder):
    from pipeline.catalog import Catalog

    cat = Catalog.load(small_index)
    cat.attach_embedder(embedder)
    return cat


@pytest.fixture(scope="session")
def link_port() -> int:
    """The one extra port photo links may use in the test app, where a local server (tests/test_api.py) serves a
    photo on 127.0.0.1 (the test-only loopback switch lets exactly that address through)."""
    return free_port()


@pytest.fixture(scope="session")
def settings(cache_dir, small_index, link_port):
    from pipeline.settings import Settings

    return Settings.from_env({}, demo=True, cache_dir=str(cache_dir), index_dir=str(small_index),
                             url_allow_loopback=True, url_allowed_ports=f"80,443,{link_port}",
                             analyze_cache_size=64, load_wait_s=120.0, queue_size=12)


@pytest.fixture(scope="session")
def pipeline(settings):
    from pipeline.core import get_pipeline

    pipe = get_pipeline(settings)
    assert pipe.wait_until_ready(300), pipe.status()
    failed = [s for s in pipe.status() if s.state != "ready"]
    assert not failed, failed
    return pipe


@pytest.fixture(scope="session")
def live_app(settings, pipeline):
    """The real app (app.build_app) served on a free localhost port for the whole session."""
    import app as app_module

    demo = app_module.build_app(settings)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app_module.launch_options(settings))
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 60
    import urllib.request

    ready = False
    while time.time() < deadline and not ready:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                ready = response.status == 200
        except OSError:
            time.sleep(0.5)
    if not ready:
        demo.close()
        pytest.fail(f"the app did not answer on {url} within 60 s")
    yield url
    demo.close()


@pytest.fixture(scope="session")
def client(live_app):
    from gradio_client import Client

    return Client(live_app, verbose=False)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def photo_server(link_port):
    """A local web server with one JPEG, counting the requests it gets."""
    import http.server
    import threading

    from scripts import sample_images

    body = sample_images.encoded(sample_images.photo(320, 240, seed=5), "JPEG")
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


@pytest.fixture(scope="module")
def tileable_musicgen():
    return small_tileable_musicgen()


def small_tileable_musicgen(text_vocab: int = 512):
    """A small MusicGen whose decoder shapes the native kernel tiles (multiples of 512), so that the fused C
    layer — not the per-op PyTorch path the tiny demo model takes — is what runs."""
    import torch
    from transformers import (EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration,
                              T5Config)

    from pipeline.demo_models import randomize_codebooks

    text = T5Config(vocab_size=text_vocab, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                    relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    audio = EncodecConfig(sampling_rate=32000, audio_channels=1, num_filters=4, hidden_size=16,
                          upsampling_ratios=[8, 5, 4, 4], codebook_size=64, codebook_dim=16, target_bandwidths=[1.2],
                          use_causal_conv=False, norm_type="weight_norm", normalize=False, pad_mode="reflect",
                          num_lstm_layers=2, compress=2, num_residual_layers=1, chunk_length_s=None, overlap=None)
    decoder = MusicgenDecoderConfig(vocab_size=64, hidden_size=512, num_hidden_layers=2, num_attention_heads=8,
                                    ffn_dim=1024, num_codebooks=4, max_position_embeddings=256, pad_token_id=64,
                                    bos_token_id=64, dropout=0.0)
    config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(), decoder=decoder.to_dict())
    config.decoder_start_token_id = config.pad_token_id = 64
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(config).eval()
    randomize_codebooks(model.audio_encoder)
    return model
