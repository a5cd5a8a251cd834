"""Picture Soundtrack: a photo in, a caption, a mood, an original music clip and real songs out.

    python app.py            # the Space UI on http://127.0.0.1:7860 with the real models
    python app.py --demo     # tiny random-weight models built locally: runs with no network

This file is the UI and nothing else: layout and event wiring. Everything it calls lives in `pipeline/`.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import io
import logging
import os
import random
import wave
from pathlib import Path

import gradio as gr
import numpy as np
import plotly.graph_objects as go

from pipeline.core import get_pipeline
from pipeline.errors import UserFacingError
from pipeline.features import RANGES
from pipeline.prompt import GENRES
from pipeline.settings import Settings

try:  # ZeroGPU: model calls borrow a GPU for their duration; elsewhere spaces.GPU is a no-op
    import spaces

    gpu = spaces.GPU
except ImportError:  # pragma: no cover - spaces is in requirements.txt
    def gpu(*args, **kwargs):
        return args[0] if args and callable(args[0]) else (lambda fn: fn)

ASSETS = Path(__file__).resolve().parent / "assets"
EXAMPLES = sorted(str(p) for p in (ASSETS / "examples").glob("*.jpg"))
SONG_HEADERS = ["#", "Song", "Artist", "Year", "Genre", "Score", "Why"]
RADAR_AXES = ("valence", "energy", "danceability", "acousticness", "instrumentalness", "speechiness", "liveness",
              "tempo", "loudness")
RADAR_LABELS = {"danceability": "dance", "acousticness": "acoustic", "instrumentalness": "instrumental",
                "speechiness": "speech", "liveness": "live", "loudness": "loud"}
RADAR_BOUNDS = {"tempo": (50.0, 200.0), "loudness": (-30.0, 0.0)}
log = logging.getLogger("app")


class UploadedImage(gr.Image):
    """gr.Image that hands the uploaded file to the pipeline undecoded, so that a corrupt or oversized image gets
    the pipeline's clear message (UI and API alike) instead of a decoding error inside Gradio."""

    is_template = True  # renders with the stock Image frontend

    def preprocess(self, payload):
        if payload is not None and getattr(payload, "path", None) and not str(payload.url or "").startswith("data:"):
            return str(payload.path)
        try:
            return super().preprocess(payload)
        except Exception:
            raise gr.Error("The image could not be read. Upload a JPEG, PNG, WebP or GIF photo.",
                           print_exception=False) from None


# -- error handling ------------------------------------------------------------------------------------------------

def friendly(fn):
    """Turn the pipeline's user-facing errors into gr.Error (shown in the UI, returned by the API) and anything
    unexpected into a short apology, never a traceback."""

    def translate(exc: Exception) -> gr.Error:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, UserFacingError):
            return gr.Error(str(exc), print_exception=False)
        log.exception("unexpected error in %s", fn.__name__)
        return gr.Error("Something went wrong on our side. Please try again.", print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - translated for the user
                raise translate(exc) from None
        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - translated for the user
            raise translate(exc) from None
    return wrapper


# -- presentation helpers ------------------------------------------------------------------------------------------

def song_rows(songs) -> list[list]:
    rows = []
    for rank, song in enumerate(songs, start=1):
        d = song if isinstance(song, dict) else song.to_dict()
        title = _escape_markdown(d["title"])
        link = f"[{title}]({d['spotify_url']})" if d.get("spotify_url") else title
        rows.append([rank, link, d["artist"], d["year"] or "", d["genre"], round(d["score"], 3), d["why"]])
    return rows


def _escape_markdown(text: str) -> str:
    return "".join("\\" + ch if ch in "[]()*_`<>#|\\" else ch for ch in str(text))


def _radar_value(name: str, value) -> float | None:
    if value is None:
        return None
    lo, hi = RADAR_BOUNDS.get(name, RANGES[name])
    return float(min(1.0, max(0.0, (value - lo) / (hi - lo))))


def radar(features: dict | None, song: dict | None = None) -> go.Figure:
    figure = go.Figure()
    axes = list(RADAR_AXES) + [RADAR_AXES[0]]
    labels = [RADAR_LABELS.get(a, a) for a in axes]
    if features:
        values = [_radar_value(a, features.get(a)) for a in axes]
        figure.add_trace(go.Scatterpolar(r=values, theta=labels, fill="toself", name="your photo",
                                         line={"color": "#7c3aed"}))
    if song:
        values = [_radar_value(a, (song.get("features") or {}).get(a)) for a in axes]
        figure.add_trace(go.Scatterpolar(r=values, theta=labels, fill="toself", name=song["title"][:32],
                                         line={"color": "#f59e0b"}, opacity=0.7))
    figure.update_layout(polar={"radialaxis": {"visible": True, "range": [0, 1], "showticklabels": False}},
                         margin={"l": 70, "r": 70, "t": 30, "b": 30}, height=320, showlegend=True,
                         legend={"orientation": "h", "y": -0.1})
    return figure


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """A streamed chunk as 16-bit WAV bytes (Gradio passes bytes through untouched, so loudness stays ours)."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(pcm.tobytes())
    return buffer.getvalue()


def status_markdown(pipe, settings: Settings) -> str:
    icons = {"ready": "✅", "loading": "⏳", "waiting": "…", "failed": "⚠️"}
    lines = ["| part | state | details |", "|---|---|---|"]
    for item in pipe.status():
        detail = item.detail.replace("\n", " ").replace("|", "/")
        timing = f" ({item.seconds:.1f} s)" if item.seconds is not None and item.state == "ready" else ""
        lines.append(f"| {item.name} | {icons.get(item.state, '')} {item.state}{timing} | {detail[:400]} |")
    runtime = pipe.runtime
    device = f"{runtime.device}" if runtime else "starting"
    mode = "demo (random-weight models)" if settings.demo else "full models"
    return f"**Status** · mode: {mode} · device: {device}\n\n" + "\n".join(lines)


def limits_markdown(settings: Settings) -> str:
    return (f"**Limits.** Images up to {settings.max_upload_mb:g} MB and {settings.max_image_pixels / 1e6:g} "
            f"megapixels (bigger photos are downscaled to {settings.max_image_side} px before the models see them); "
            f"prompts up to {settings.max_prompt_chars} characters (longer ones are cut, with a notice); clips "
            f"{settings.min_duration_s:g}–{settings.max_duration_s:g} s; up to {settings.max_k} songs per list. "
            "Photos are processed in memory and not kept; generated clips are deleted after "
            f"{settings.temp_max_age_s // 60} minutes. Song previews load Spotify only when you ask for them.")


# -- the app ---------------------------------------------------------------------------------------------------------

def build_app(settings: Settings | None = None):
    settings = settings or Settings.from_env()
    pipe = get_pipeline(settings)

    # ---- handlers (thin: validation and work happen in the pipeline) ----
    @gpu(duration=60)
    def _analyze(image_path, genre, extra, k, caption=None):
        return pipe.analyze(image_path, k=k, genre=genre or None, extra=extra or None, caption=caption)

    @friendly
    def on_analyze(image_path, genre, extra, k, progress=gr.Progress()):
        if not image_path:
            raise gr.Error("Add a photo first: upload one, paste it, use the webcam, or pick an example.",
                           print_exception=False)
        progress(0.1, desc="Reading the photo")
        analysis = _analyze(image_path, genre, extra, k)
        result = analysis.to_dict()
        state = {"features": result["features"], "emotion": result["emotion"], "prompt": result["prompt"],
                 "caption": result["caption"], "lists": {
                     "features": result["songs_by_features"], "lyrics": result["songs_by_lyrics"],
                     "fused": result["songs_fused"]}, "mood": result}
        notes = "\n".join(f"- {n}" for n in analysis.notes)
        return (result["caption"], result["emotion_scores"], radar(result["features"]), result["prompt"],
                song_rows(analysis.songs_by_features), song_rows(analysis.songs_by_lyrics),
                song_rows(analysis.songs_fused), notes, state)

    def on_new_image(image_path, genre, extra, k, progress=gr.Progress()):
        if not image_path:  # the photo was cleared
            return tuple(gr.skip() for _ in range(9))
        return on_analyze(image_path, genre, extra, k, progress)

    @friendly
    def on_regenerate_songs(caption, prompt_text, genre, extra, k, state):
        if not state:
            raise gr.Error("Analyze a photo first, then edit its caption or prompt.", print_exception=False)
        from pipeline.mood import MoodResult

        m = state["mood"]
        mood = MoodResult(features=m["features"], emotion=m["emotion"], confidence=m["confidence"],
                          emotion_scores=m["emotion_scores"], predictor=m["mood_predictor"])
        by_features, by_lyrics, fused, notes = pipe.songs_for_text(caption, mood, k=k)
        # the prompt follows the edited caption unless the user rewrote the prompt themselves
        if (prompt_text or "").strip() == (state.get("prompt") or "").strip():
            prompt_text = pipe.prompt(caption, mood, genre=genre or None, extra=extra or None).text
        state = {**state, "caption": caption, "prompt": prompt_text,
                 "lists": {"features": [s.to_dict() for s in by_features], "lyrics": [s.to_dict() for s in by_lyrics],
                           "fused": [s.to_dict() for s in fused]}}
        return (prompt_text, song_rows(by_features), song_rows(by_lyrics), song_rows(fused),
                "\n".join(f"- {n}" for n in notes), state)

    def _gpu_seconds(prompt, duration_s, *args, **kwargs):
        try:
            return int(min(300, 20 + 4 * float(duration_s)))
        except (TypeError, ValueError):
            return 60

    @gpu(duration=_gpu_seconds)
    def _stream(prompt, duration_s, seed, temperature, top_k, top_p, guidance):
        yield from pipe.stream(prompt, duration_s, seed, temperature=temperature, top_k=top_k, top_p=top_p,
                               guidance_scale=guidance)

    @friendly
    def on_generate(prompt, duration_s, seed, temperature, top_k, top_p, guidance):
        request, truncated = pipe.music_request(prompt, duration_s, seed, temperature, top_k, top_p, guidance)
        note = f" (prompt cut to {settings.max_prompt_chars} characters)" if truncated else ""
        if truncated:
            gr.Warning(f"The prompt was cut to {settings.max_prompt_chars} characters.")
        yield None, gr.update(visible=False, value=None), f"⏳ Starting… seed {request.seed}{note}"
        parts, rate = [], None
        for chunk in _stream(prompt, duration_s, seed, temperature, top_k, top_p, guidance):
            parts.append(chunk.samples)
            rate = chunk.sample_rate
            made = chunk.start_s + chunk.samples.shape[0] / chunk.sample_rate
            speed = made / chunk.elapsed_s if chunk.elapsed_s else 0.0
            yield (wav_bytes(chunk.samples, chunk.sample_rate), gr.skip(),
                   f"🎶 {made:.1f} / {request.duration_s:g} s · {speed:.2f}× real time{note}")
        path = pipe.save_audio(np.concatenate(parts), rate)
        yield gr.skip(), gr.update(visible=True, value=str(path)), \
            f"✅ Done: {request.duration_s:g} s, seed {request.seed}. Download the WAV below.{note}"

    def on_select_song(state, which, evt: gr.SelectData):
        if not state or evt is None:
            return gr.skip(), None, gr.update(visible=False)
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        songs = state["lists"].get(which) or []
        if not 0 <= row < len(songs):
            return gr.skip(), None, gr.update(visible=False)
        song = songs[row]
        label = f"▶ Play “{song['title']}” on Spotify (loads open.spotify.com)"
        return radar(state["features"], song), song, gr.update(visible=bool(song.get("spotify_id")), value=label)

    def on_spotify(song):
        if not song or not song.get("spotify_id"):
            return ""
        return (f'<iframe title="Spotify player" src="https://open.spotify.com/embed/track/{song["spotify_id"]}" '
                'height="152" allow="encrypted-media" loading="lazy"></iframe>')

    def on_status():
        ready = all(item.state in ("ready", "failed") for item in pipe.status())
        return status_markdown(pipe, settings), gr.Timer(active=not ready)

    # ---- API-only handlers ----
    @friendly
    def api_analyze(image, k=10, genre="", extra=""):
        """Caption, mood (emotion, confidence, 13 audio features), music prompt and three song lists for a photo."""
        return _analyze(image, genre, extra, k).to_dict()

    @friendly
    def api_caption(image):
        """The BLIP caption of a photo."""
        return pipe.caption(image)

    @gpu(duration=_gpu_seconds)
    def _generate_file(prompt, duration_s, seed, temperature, top_k, top_p, guidance):
        return pipe.generate(prompt, duration_s, seed, temperature=temperature, top_k=top_k, top_p=top_p,
                             guidance_scale=guidance)

    @friendly
    def api_generate(prompt, duration_s=8.0, seed=0, temperature=1.0, top_k=250, top_p=0.0, guidance_scale=3.0):
        """A WAV file of music for a text prompt."""
        _, truncated = pipe.music_request(prompt, duration_s, seed, temperature, top_k, top_p, guidance_scale)
        if truncated:
            gr.Warning(f"The prompt was cut to {settings.max_prompt_chars} characters.")
        return str(_generate_file(prompt, duration_s, seed, temperature, top_k, top_p, guidance_scale).wav_path)

    @friendly
    def api_recommend(text, k=10, features=None):
        """Songs whose lyrics match free text; with `features` (13 audio features), also by features and fused."""
        if isinstance(features, str) and features.strip():
            import json

            try:
                features = json.loads(features)
            except ValueError:
                raise gr.Error("features must be a JSON object of audio features or a list of 13 numbers.",
                               print_exception=False) from None
        lists = pipe.recommend(text, k=k, features=features or None)
        result = {name: [s.to_dict() for s in songs] for name, songs in lists.items()}
        if len((text or "").strip()) > settings.max_prompt_chars:
            result["notes"] = [f"The text was cut to {settings.max_prompt_chars} characters."]
        return result

    # ---- layout ----
    with gr.Blocks(title="Picture Soundtrack", delete_cache=(600, settings.temp_max_age_s),
                   analytics_enabled=False) as demo:
        gr.Markdown("# 🎵 Picture Soundtrack\nDrop in a photo: get its caption and mood, an original music clip "
                    "made for it, and real songs that match — by sound and by lyrics.", elem_id="app-title")
        gr.Markdown("⚠️ **Demo mode**: captions and music come from tiny *random-weight* models built offline, so "
                    "they are noise by design. Mood features, song search and the whole interface are real.",
                    elem_id="demo-banner", visible=settings.demo)
        state = gr.State(None)
        selected_song = gr.State(None)
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=300):
                image = UploadedImage(label="Your photo", type="filepath", sources=["upload", "webcam", "clipboard"],
                                      elem_id="image-input", height=320)
                with gr.Row():
                    analyze_btn = gr.Button("Analyze", variant="primary", elem_id="analyze-btn", scale=2)
                with gr.Accordion("Options", open=False):
                    genre = gr.Dropdown(choices=[("pick from the mood", "")] + [(g, g) for g in GENRES], value="",
                                        label="Genre", elem_id="genre")
                    extra = gr.Textbox(label="Add words to the music prompt", placeholder="e.g. with a cello solo",
                                       max_length=settings.max_prompt_chars, elem_id="extra-words")
                    k = gr.Slider(3, settings.max_k, value=10, step=1, label="Songs per list", elem_id="k")
                gr.Examples(examples=[[p] for p in EXAMPLES], inputs=[image], label="Or try an example photo",
                            examples_per_page=6)
            with gr.Column(scale=7, min_width=300):
                caption = gr.Textbox(label="Caption (editable)", elem_id="caption", lines=2,
                                     max_length=settings.max_prompt_chars)
                with gr.Row(equal_height=False):
                    emotion = gr.Label(label="Mood", num_top_classes=3, elem_id="emotion", min_width=200)
                    mood_plot = gr.Plot(label="Audio features: your photo vs. the selected song",
                                        elem_id="mood-radar", min_width=260)
                prompt = gr.Textbox(label="Music prompt (editable)", elem_id="prompt", lines=3,
                                    max_length=settings.max_prompt_chars * 4)
                regenerate_btn = gr.Button("Regenerate songs and music from my text", elem_id="regenerate-btn")
                notes = gr.Markdown(elem_id="analyze-notes")

        gr.Markdown("### Your soundtrack")
        with gr.Row():
            with gr.Column(scale=5, min_width=280):
                gr.Dropdown(choices=[settings.music_model if not settings.demo else "demo model"],
                            value=settings.music_model if not settings.demo else "demo model",
                            label="Model", interactive=False, elem_id="music-model",
                            info="Set I2M_MUSIC_MODEL to use medium, melody or stereo variants.")
                duration = gr.Slider(settings.min_duration_s, settings.max_duration_s,
                                     value=settings.default_duration_s, step=0.5, label="Duration (s)",
                                     elem_id="duration")
                with gr.Row():
                    seed = gr.Number(value=42, precision=0, minimum=0, label="Seed", elem_id="seed", scale=4)
                    dice = gr.Button("🎲", elem_id="dice-btn", scale=1, min_width=50)
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature",
                                            elem_id="temperature")
                    top_k = gr.Slider(0, 1000, value=250, step=1, label="Top-k (0 = off)", elem_id="top-k")
                    top_p = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Top-p (0 = off)", elem_id="top-p")
                    guidance = gr.Slider(1.0, 10.0, value=3.0, step=0.1, label="Guidance (classifier-free)",
                                         elem_id="guidance")
                with gr.Row():
                    generate_btn = gr.Button("Generate music", variant="primary", elem_id="generate-btn", scale=3)
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn", scale=1)
            with gr.Column(scale=7, min_width=280):
                audio_out = gr.Audio(label="Streaming as it is made", streaming=True, autoplay=True,
                                     interactive=False, elem_id="audio-out")
                download = gr.DownloadButton("Download WAV", visible=False, elem_id="download-wav")
                gen_status = gr.Markdown(elem_id="generate-status")

        gr.Markdown("### Songs that match")
        with gr.Tabs():
            tables = {}
            for key, title, elem in (("features", "By sound", "songs-features"),
                                     ("lyrics", "By lyrics", "songs-lyrics"),
                                     ("fused", "Best of both", "songs-fused")):
                with gr.Tab(title, id=elem):
                    tables[key] = gr.Dataframe(headers=SONG_HEADERS, value=[], interactive=False, wrap=True,
                                               datatype=["number", "markdown", "str", "str", "str", "number", "str"],
                                               elem_id=elem, elem_classes=["songs-table"])
        spotify_btn = gr.Button("▶ Play on Spotify", visible=False, elem_id="spotify-btn", size="sm")
        spotify_html = gr.HTML(elem_id="spotify-player")

        with gr.Accordion("About, limits and privacy", open=False):
            gr.Markdown(limits_markdown(settings), elem_id="limits")
            gr.Markdown("Recommendations come from a catalog built from TidyTuesday Spotify songs (CC0), MusicOSet "
                        "(CC BY 4.0), Billboard year-end lyrics 1965–2015 and the Music Dataset 1950–2019 (Moura et "
                        "al., CC BY 4.0). Lyrics are never stored or shown: only embeddings and keywords.")
        footer = gr.Markdown(status_markdown(pipe, settings), elem_id="status-footer")
        timer = gr.Timer(1.5)

        # API-only endpoints: clean inputs and outputs for gradio_client
        with gr.Column(visible=False):
            api_image = UploadedImage(type="filepath", label="image")
            api_k = gr.Number(value=10, precision=0, label="k")
            api_genre = gr.Textbox(value="", label="genre")
            api_extra = gr.Textbox(value="", label="extra")
            api_json = gr.JSON(label="result")
            api_text = gr.Textbox(label="text")
            api_caption_out = gr.Textbox(label="caption")
            api_features = gr.JSON(value=None, label="features")
            api_prompt = gr.Textbox(label="prompt")
            api_duration = gr.Number(value=8.0, label="duration_s")
            api_seed = gr.Number(value=0, label="seed")
            api_temperature = gr.Number(value=1.0, label="temperature")
            api_top_k = gr.Number(value=250, label="top_k")
            api_top_p = gr.Number(value=0.0, label="top_p")
            api_guidance = gr.Number(value=3.0, label="guidance_scale")
            api_wav = gr.File(label="wav")
            api_buttons = [gr.Button(visible=False) for _ in range(4)]

        # ---- events ----
        limits = {"concurrency_limit": settings.analyze_concurrency, "concurrency_id": "analyze"}
        analyze_outputs = [caption, emotion, mood_plot, prompt, tables["features"], tables["lyrics"],
                           tables["fused"], notes, state]
        analyze_btn.click(on_analyze, [image, genre, extra, k], analyze_outputs, api_visibility="private", **limits)
        # a new photo (uploaded, pasted, taken or an example clicked) is analyzed at once; results are cached per
        # image content, so an example clicked again, by anyone, answers instantly
        image.change(on_new_image, [image, genre, extra, k], analyze_outputs, api_visibility="private", **limits)
        gen_inputs = [prompt, duration, seed, temperature, top_k, top_p, guidance]
        gen_outputs = [audio_out, download, gen_status]
        gen_limits = {"concurrency_limit": settings.generate_concurrency, "concurrency_id": "generate"}
        gen_event = generate_btn.click(on_generate, gen_inputs, gen_outputs, api_visibility="private", **gen_limits)
        regen_event = regenerate_btn.click(
            on_regenerate_songs, [caption, prompt, genre, extra, k, state],
            [prompt, tables["features"], tables["lyrics"], tables["fused"], notes, state], api_visibility="private",
            **limits).success(on_generate, gen_inputs, gen_outputs, api_visibility="private", **gen_limits)
        stop_btn.click(lambda: "⏹ Stopped.", None, gen_status, cancels=[gen_event, regen_event],
                       api_visibility="private", queue=False)
        dice.click(lambda: random.randint(0, 2 ** 31 - 1), None, seed, api_visibility="private", queue=False)
        for key, table in tables.items():
            table.select(_select_for(on_select_song, key), [state], [mood_plot, selected_song, spotify_btn],
                         api_visibility="private", queue=False)
        spotify_btn.click(on_spotify, [selected_song], spotify_html, api_visibility="private", queue=False)
        timer.tick(on_status, None, [footer, timer], api_visibility="private", queue=False)
        demo.load(on_status, None, [footer, timer], api_visibility="private", queue=False)

        api_buttons[0].click(api_analyze, [api_image, api_k, api_genre, api_extra], api_json, api_name="analyze",
                             **limits)
        api_buttons[1].click(api_generate, [api_prompt, api_duration, api_seed, api_temperature, api_top_k,
                                            api_top_p, api_guidance], api_wav, api_name="generate", **gen_limits)
        api_buttons[2].click(api_recommend, [api_text, api_k, api_features], api_json, api_name="recommend",
                             concurrency_limit=4, concurrency_id="recommend")
        api_buttons[3].click(api_caption, [api_image], api_caption_out, api_name="caption", **limits)

    demo.queue(max_size=settings.queue_size, default_concurrency_limit=2)
    return demo


def _select_for(handler, which: str):
    def select(state, evt: gr.SelectData):
        return handler(state, which, evt)

    return select


def launch_options(settings: Settings) -> dict:
    """Keyword arguments for `demo.launch()` that belong to the app rather than to the host and port."""
    settings.audio_dir.mkdir(parents=True, exist_ok=True)
    return {
        "theme": gr.themes.Soft(primary_hue="violet", secondary_hue="amber"),
        "css_paths": [ASSETS / "style.css"],
        "allowed_paths": [str(settings.audio_dir)],  # generated WAVs live in the cache folder, not in /tmp
        "max_file_size": f"{settings.max_upload_mb:g}mb",
        "show_error": True,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Picture Soundtrack: photo → caption, mood, music and songs.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--demo", action="store_true", help="tiny random-weight models, no network needed")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env(**({"demo": True} if args.demo else {}))
    demo = build_app(settings)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options(settings))


if __name__ == "__main__":
    main()
