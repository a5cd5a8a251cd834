import copy
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import Cancelled, InputError
from pipeline.features import FEATURES, RANGES
from pipeline.mood import EMOTIONS, MoodResult, emotion_of
from pipeline.prompt import build_prompt, clean_user_prompt, genre_for
from scripts import sample_images as images


# -- caption ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("maker", [images.grayscale_png, images.rgba_png, images.cmyk_jpeg, images.huge_legal_jpeg,
                                   lambda: images.encoded(Image.new("RGB", (1, 1)), "PNG")])
def test_captions_for_odd_images(pipeline, tmp_path, maker):
    path = tmp_path / "odd.img"
    path.write_bytes(maker())
    caption = pipeline.caption(str(path))
    assert isinstance(caption, str) and caption == caption.strip()


def test_captions_batch_and_prefix(pipeline):
    captioner = pipeline.component("caption model")
    batch = captioner.caption([images.photo(seed=1), images.photo(seed=2)])
    assert len(batch) == 2
    single = captioner.caption([images.photo(seed=1)])
    assert single[0] == batch[0]
    assert captioner.caption([images.photo()], prefix="a photo of")[0].lower().startswith("a photo of")


# -- mood --------------------------------------------------------------------------------------------------------------

def test_mood_features_stay_in_spotify_ranges(pipeline):
    for seed in range(3):
        mood = pipeline.mood(images.photo(seed=seed))
        assert set(mood.features) == set(FEATURES)
        for name, value in mood.features.items():
            lo, hi = RANGES[name]
            assert lo <= value <= hi, (name, value)
        assert mood.features["key"] == int(mood.features["key"]) and mood.emotion in EMOTIONS
        assert 0 < mood.confidence <= 1 and abs(sum(mood.emotion_scores.values()) - 1) < 1e-3


@pytest.mark.parametrize("valence, energy, expected", [
    (0.9, 0.9, "excitement"), (0.8, 0.55, "amusement"), (0.7, 0.2, "contentment"),
    (0.2, 0.9, "anger"), (0.2, 0.55, "fear"), (0.15, 0.15, "sadness")])
def test_emotion_from_valence_and_energy(valence, energy, expected):
    emotion, confidence, scores = emotion_of(valence, energy)
    assert emotion == expected and confidence == max(scores.values())


def test_confidence_drops_between_prototypes():
    assert emotion_of(0.8, 0.85)[1] > emotion_of(0.5, 0.55)[1]


def test_zero_shot_key_follows_the_photo_colour():
    from pipeline.mood import dominant_hue_key

    assert dominant_hue_key(Image.new("RGB", (20, 20), (230, 20, 20))) == 0  # red → C
    assert dominant_hue_key(Image.new("RGB", (20, 20), (20, 200, 30))) == 9  # green → A
    assert dominant_hue_key(Image.new("RGB", (20, 20), (128, 128, 128))) == 0  # grey → C


def test_fast_mlp_train_save_load_round_trip(demo_paths, tmp_path):
    import pandas as pd

    from pipeline.mood import FastMLPMood
    from scripts import train_mood

    rng = np.random.default_rng(0)
    rows = []
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(48):
        brightness = rng.random()
        colour = (int(255 * brightness), int(200 * rng.random()), int(255 * (1 - brightness)))
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
        feats = dict(zip(FEATURES, [0.5, 0.3 + 0.6 * brightness, rng.integers(0, 12), -20 + 12 * brightness, 1, 0.05,
                                    0.5, 0.1, 0.1, 0.1 + 0.8 * brightness, 80 + 80 * brightness, 200000, 4]))
        rows.append({"image": f"{i}.png", **feats})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "head"
    metrics = train_mood.main(["--images", str(folder), "--csv", str(tmp_path / "labels.csv"), "--clip-model",
                               str(demo_paths.clip), "--out", str(out), "--epochs", "30", "--no-catalog"])
    assert set(metrics["mse_standardised"]) == set(FEATURES) and 0 <= metrics["emotion_accuracy"] <= 1
    assert (out / "metrics.json").is_file() and "FastMLP" in (out / "README.md").read_text()

    head = FastMLPMood(out / "mood_mlp.safetensors")
    embeddings = train_mood.embed([Image.open(folder / "0.png").convert("RGB")], demo_paths.clip)
    first = head.predict(embeddings, [None])[0]
    second = FastMLPMood(out / "mood_mlp.safetensors").predict(embeddings, [None])[0]
    assert first == second and first.predictor == "mlp"
    assert set(first.features) == set(FEATURES)


def test_p_at_10_metric_uses_the_catalog(catalog):
    from scripts import train_mood

    class Echo(torch.nn.Module):
        def forward(self, x):
            return x[:, :13]

    targets = np.array([[0.5, 0.9, 5, -5, 1, 0.05, 0.1, 0.0, 0.1, 0.9, 125, 210000, 4]] * 4, dtype=float)
    mean, std = np.zeros(13), np.ones(13)
    embeddings = np.concatenate([targets, np.zeros((4, 499))], axis=1)
    metrics = train_mood.evaluate(Echo(), embeddings, targets, mean, std, np.arange(4), catalog)
    assert metrics["emotion_accuracy"] == 1.0 and metrics["precision_at_10_emotion"] > 0.5


# -- prompt ------------------------------------------------------------------------------------------------------------

MOOD = MoodResult(features=dict(zip(FEATURES, [0.8, 0.85, 7, -5, 1, 0.05, 0.1, 0.0, 0.1, 0.9, 128, 215000, 4])),
                  emotion="excitement", confidence=0.7)


def test_prompt_carries_genre_mood_instruments_tempo_and_key():
    prompt = build_prompt("A dog running on a beach", MOOD)
    assert prompt.text.startswith(f"{genre_for(MOOD.features)} track")
    assert "128 BPM" in prompt.text and "G major" in prompt.text and "exhilarating" in prompt.text
    assert "inspired by a dog running on a beach" in prompt.text
    assert build_prompt("A dog running on a beach", MOOD) == prompt


def test_prompt_genre_choice_and_extra_words():
    prompt = build_prompt("city at night", MOOD, genre="jazz", extra="with a saxophone solo")
    assert prompt.text.startswith("jazz track") and "saxophone solo" in prompt.text and prompt.genre == "jazz"


def test_prompt_is_bounded_and_keeps_the_music():
    prompt = build_prompt("word " * 500, MOOD, max_chars=200)
    assert len(prompt.text) <= 200 and prompt.truncated and "BPM" in prompt.text


def test_user_prompts_are_cleaned_and_cut():
    assert clean_user_prompt("  piano\x00\x07 and\n\tstrings 🎻 ", 100) == ("piano and strings 🎻", False)
    text, cut = clean_user_prompt("x" * 50 + " y" * 100, 60)
    assert cut and len(text) <= 60


# -- music -------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def generator(pipeline):
    return pipeline.component("music model")


def test_same_seed_same_audio_other_seed_different(pipeline):
    a = pipeline.generate("calm piano", 1.0, seed=5, write=False)
    b = pipeline.generate("calm piano", 1.0, seed=5, write=False)
    c = pipeline.generate("calm piano", 1.0, seed=6, write=False)
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.samples, b.samples)
    assert not np.array_equal(a.codes, c.codes) and not np.array_equal(a.samples, c.samples)


def test_stream_equals_batch(pipeline):
    full = pipeline.generate("upbeat pop", 2.5, seed=11, write=False)
    chunks = list(pipeline.stream("upbeat pop", 2.5, seed=11))
    assert all(c.samples.shape[0] <= full.sample_rate * pipeline.settings.stream_chunk_s for c in chunks)
    assert chunks[0].samples.shape[0] == int(full.sample_rate * pipeline.settings.first_chunk_s)
    assert [c.is_last for c in chunks].count(True) == 1 and chunks[-1].is_last
    streamed = np.concatenate([c.samples for c in chunks])
    assert np.array_equal(streamed, full.samples)
    # and both equal the non-streamed reference: one codec pass over all the codes
    reference = pipeline.component("music model").decode_reference(full.codes)
    assert reference.shape == streamed.shape and np.max(np.abs(streamed - reference)) < 1e-5


def _waits(grid, rtf: float) -> float:
    """Seconds a listener waits in all, playing from the first chunk, when each chunk takes rtf x its length."""
    made = played = waited = 0.0
    for i, (start, end) in enumerate(grid):
        made += rtf * (end - start) / 50
        if i == 0:
            played = made  # playback starts when the first chunk is there
        waited += max(0.0, made - played)
        played = max(played, made) + (end - start) / 50
    return waited


@pytest.mark.parametrize("first, size", [(25, 50), (10, 50), (25, 250), (60, 50)])
def test_streamed_chunks_grow_so_that_playback_never_waits(first, size):
    from pipeline.audio import STREAM_RAMP, chunk_grid

    grid = chunk_grid(30 * 50 + 7, first, size)
    assert grid[0] == (0, first) and grid[-1][1] == 30 * 50 + 7
    assert all(a[1] == b[0] for a, b in zip(grid, grid[1:]))
    widths = [end - start for start, end in grid[:-1]]
    assert max(widths) == max(first, size)
    assert all(b <= a * STREAM_RAMP if a < size else b == size for a, b in zip(widths, widths[1:]))
    assert _waits(grid, 1 / STREAM_RAMP) < 1e-9 and _waits(grid, 0.6) == 0.0
    # a jump straight from the first chunk to the longest made a listener at RTF 0.6 wait
    assert _waits([(0, 25), (25, 75), (75, 125)], 0.6) > 0.05


@pytest.mark.parametrize("seconds", [1.0, 2.3, 4.0])
def test_duration_is_accurate_to_a_frame(pipeline, seconds):
    music = pipeline.generate("ambient", seconds, seed=1, write=False)
    frame = music.sample_rate / 50
    assert abs(music.samples.shape[0] - seconds * music.sample_rate) <= frame


def test_output_is_loudness_normalised_and_written_per_request(pipeline):
    a = pipeline.generate("rock", 1.5, seed=2)
    b = pipeline.generate("rock", 1.5, seed=2)
    assert a.wav_path != b.wav_path and a.wav_path.is_file() and b.wav_path.is_file()
    assert np.max(np.abs(a.samples)) < 1.0
    rms_db = 20 * np.log10(np.sqrt(np.mean(a.samples[8000:] ** 2)) + 1e-12)
    assert -30 < rms_db < -8
    import soundfile as sf

    data, rate = sf.read(a.wav_path)
    assert rate == 32000 and len(data) == len(a.samples)


def test_a_stream_can_be_cancelled(pipeline):
    cancel = threading.Event()
    stream = pipeline.stream("long piece", 6.0, seed=3, cancel=cancel)
    next(stream)
    cancel.set()
    with pytest.raises(Cancelled):
        list(stream)
    assert len(pipeline.generate("after cancel", 1.0, seed=3, write=False).samples) == 32000


@pytest.mark.parametrize("kwargs, message", [
    ({"duration_s": 0}, "duration_s"), ({"duration_s": 400}, "duration_s"), ({"duration_s": float("nan")}, "finite"),
    ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": "abc"}, "seed"), ({"temperature": 0}, "temperature"),
    ({"top_k": -3}, "top_k"), ({"top_p": 1.5}, "top_p"), ({"guidance_scale": 0.5}, "guidance_scale")])
def test_bad_music_parameters_are_refused(pipeline, kwargs, message):
    args = {"prompt": "piano", "duration_s": 2.0, "seed": 1, **kwargs}
    with pytest.raises(InputError, match=message):
        pipeline.generate(args.pop("prompt"), args.pop("duration_s"), args.pop("seed"), **args)


@pytest.mark.parametrize("prompt", ["", "   ", "\x00\x01"])
def test_empty_prompts_are_refused(pipeline, prompt):
    with pytest.raises(InputError, match="empty"):
        pipeline.generate(prompt, 1.0, 0)


def test_reference_backend_streams_through_the_per_step_hook(demo_paths):
    from pipeline.music import MusicRequest
    from pipeline.music.generator import MusicGenerator

    reference = MusicGenerator.load(demo_paths.music, backend="reference")
    request = MusicRequest("jazz", 1.5, seed=4)
    full = reference.generate(request, write=False)
    streamed = np.concatenate([c.samples for c in reference.stream(request)])
    assert np.array_equal(streamed, full.samples)
    assert np.max(np.abs(streamed - reference.decode_reference(full.codes))) < 1e-5
    assert full.codes.shape == (4, 75)


# -- the fast decoder's quality guard --------------------------------------------------------------------------------

@pytest.mark.parametrize("weights, floor", [("fp32", 0.999999), ("bf16", 0.999), ("int8", 0.995), ("int5", 0.99),
                                            ("int4", 0.99)])
def test_fast_decoder_logits_match_the_reference_under_teacher_forcing(demo_paths, cache_dir, weights, floor):
    from transformers import MusicgenForConditionalGeneration, MusicgenProcessor

    from pipeline.music.lm import FastMusicLM

    reference = MusicgenForConditionalGeneration.from_pretrained(demo_paths.music).eval()
    processor = MusicgenProcessor.from_pretrained(demo_paths.music)
    inputs = processor(text=["a calm piano track"], return_tensors="pt")
    k, length = 4, 24
    tokens = torch.randint(0, 64, (1, k, length), generator=torch.Generator().manual_seed(0))
    tokens[:, :, 0] = 64
    with torch.no_grad():
        encoded = reference.text_encoder(**inputs).last_hidden_state
        expected = reference(encoder_outputs=(torch.cat([encoded, torch.zeros_like(encoded)]),),
                             attention_mask=torch.cat([inputs.attention_mask, torch.zeros_like(inputs.attention_mask)]),
                             decoder_input_ids=torch.cat([tokens, tokens]).reshape(2 * k, length)).logits
    expected = expected.reshape(2, k, length, -1).permute(0, 2, 1, 3)
    fast = FastMusicLM(copy.deepcopy(reference), weights=weights, cache_dir=str(cache_dir), keep_reference=True)
    got = fast.teacher_forced_logits(inputs.input_ids, inputs.attention_mask, tokens)
    cosine = torch.nn.functional.cosine_similarity(got.flatten().double(), expected.flatten().double(), dim=0)
    assert cosine >= floor, (weights, fast.format, float(cosine))


@pytest.mark.parametrize("bits", [4, 5])
def test_native_kernel_matches_its_dequantized_weights(cache_dir, bits):
    from pipeline.music.native import PackedLowBit, load_kernel

    kernel = load_kernel(str(cache_dir))
    if kernel is None:
        pytest.skip("no C compiler or no AVX2/AVX-512 VNNI on this machine")
    generator = torch.Generator().manual_seed(bits)
    for n, k_in, m in ((256, 512, 2), (96, 1024, 1), (64, 1536, 3)):
        weight = torch.randn(n, k_in, generator=generator) * 0.02
        x = torch.randn(m, k_in, generator=generator)
        packed = PackedLowBit(weight, bits=bits)
        got = kernel.linear(x, packed)
        exact = x @ packed.dequantized().T
        cosine = torch.nn.functional.cosine_similarity(got.flatten(), exact.flatten(), dim=0)
        assert cosine > 0.9999 and torch.allclose(got, exact, atol=0.05 * exact.abs().max().item())
        floor = 0.995 if bits == 4 else 0.999
        assert torch.nn.functional.cosine_similarity(got.flatten(), (x @ weight.T).flatten(), dim=0) > floor
    weight = torch.randn(64, 512, generator=generator)
    assert (PackedLowBit(weight, bits=5).dequantized() - weight).abs().mean() < \
        (PackedLowBit(weight, bits=4).dequantized() - weight).abs().mean()


def test_the_scalar_and_avx2_paths_agree_with_the_fast_one(cache_dir, tmp_path):
    """The kernel is compiled for the machine it runs on; build the portable paths too and compare them."""
    import ctypes
    import shutil

    from pipeline.music import native as native_kernels
    from pipeline.music.native import PackedLowBit, load_kernel

    kernel = load_kernel(str(cache_dir))
    compiler = shutil.which("cc") or shutil.which("gcc")
    if kernel is None or compiler is None:
        pytest.skip("no native kernel here")
    weight = torch.randn(128, 1024, generator=torch.Generator().manual_seed(3)) * 0.02
    x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(4))
    for bits in (4, 5):
        packed = PackedLowBit(weight, bits=bits)
        expected = kernel.linear(x, packed)
        for flags in (["-march=x86-64", "-mf16c"], ["-march=haswell"]):
            target = tmp_path / f"k{bits}{flags[0][7:]}.so"
            native_kernels.compile_kernel(target, ["-O2", *flags])
            other = native_kernels.LowBitKernel(ctypes.CDLL(str(target)), target)
            assert torch.allclose(other.linear(x, packed), expected, rtol=1e-4, atol=1e-4), (bits, flags)


def test_the_largest_codes_and_activations_do_not_saturate_and_rows_do_not_interact(cache_dir, tmp_path):
    """Without VNNI the u8 x s8 products are summed in 16-bit lanes, four instructions at a time before they are
    widened (4 * 2 * 31 * 127 = 31,496 <= 32,767). The largest codes against the largest activations of either sign
    must give the exact sums on every build, and a row's result must not depend on how many rows share the call
    (up to four share one unpacking of the weights)."""
    import ctypes
    import shutil

    from pipeline.music import native as native_kernels
    from pipeline.music.native import PackedLowBit, load_kernel

    kernel = load_kernel(str(cache_dir))
    if kernel is None or (shutil.which("cc") is None and shutil.which("gcc") is None):
        pytest.skip("no native kernel here")
    weight = torch.ones(48, 1024)
    weight[:, ::32] = 0.0  # every group: the top code 31 times and one 0
    weight[16:32] *= -1.0  # and groups at the bottom of their range
    x = torch.ones(8, 1024)  # every activation quantizes to +-127
    x[1::2] *= -1.0
    x[4:, 512:] *= -1.0
    kernels = [kernel]
    for flags in (["-march=x86-64", "-mf16c"], ["-march=haswell"]):
        target = tmp_path / f"extreme{flags[0][7:]}.so"
        native_kernels.compile_kernel(target, ["-O2", *flags])
        kernels.append(native_kernels.LowBitKernel(ctypes.CDLL(str(target)), target))
    for bits in (4, 5):
        packed = PackedLowBit(weight, bits=bits)
        exact = x @ packed.dequantized().T
        for build in kernels:
            got = build.linear(x, packed)
            assert torch.allclose(got, exact, rtol=1e-5, atol=1e-3), (bits, build.isa, (got - exact).abs().max())
            for m in range(1, 8):
                assert torch.equal(build.linear(x[:m], packed), got[:m]), (bits, build.isa, m)
                assert torch.equal(build.linear(x[m:], packed), got[m:]), (bits, build.isa, m)


def test_the_fused_c_layer_matches_the_reference_and_the_pytorch_path(tileable_musicgen, cache_dir):
    from pipeline.music.lm import FastMusicLM

    model = tileable_musicgen
    ids = torch.tensor([[5, 9, 13, 1]])
    mask = torch.ones_like(ids)
    k, length = 4, 40  # more than 16 positions: the vectorised attention and its scalar tail both run
    tokens = torch.randint(0, 64, (1, k, length), generator=torch.Generator().manual_seed(2))
    tokens[:, :, 0] = 64
    with torch.no_grad():
        encoded = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = model(encoder_outputs=(torch.cat([encoded, torch.zeros_like(encoded)]),),
                         attention_mask=torch.cat([mask, torch.zeros_like(mask)]),
                         decoder_input_ids=torch.cat([tokens, tokens]).reshape(2 * k, length)).logits
    expected = expected.reshape(2, k, length, -1).permute(0, 2, 1, 3)
    fused = FastMusicLM(copy.deepcopy(model), weights="int5", cache_dir=str(cache_dir), keep_reference=True)
    if not fused.fused:
        pytest.skip("no native kernel on this machine")
    # same packed weights, PyTorch for everything but the matrix products
    per_op = FastMusicLM(copy.deepcopy(model), weights="int5", cache_dir=str(cache_dir), keep_reference=True,
                         fused_layers=False)
    assert not per_op.fused
    got = fused.teacher_forced_logits(ids, mask, tokens)
    cosine = torch.nn.functional.cosine_similarity(got.flatten().double(), expected.flatten().double(), dim=0)
    assert cosine >= 0.99, float(cosine)
    reference_path = per_op.teacher_forced_logits(ids, mask, tokens)
    assert torch.nn.functional.cosine_similarity(got.flatten(), reference_path.flatten(), dim=0) > 0.9995


def test_the_fused_path_generates_deterministically_and_streams(tileable_musicgen, cache_dir, demo_paths):
    from transformers import AutoProcessor

    from pipeline.music import MusicRequest
    from pipeline.music.generator import MusicGenerator

    generator = MusicGenerator(copy.deepcopy(tileable_musicgen), AutoProcessor.from_pretrained(demo_paths.music),
                               weights="int5", cache_dir=str(cache_dir))
    if not generator.lm.fused:
        pytest.skip("no native kernel on this machine")
    request = MusicRequest("calm piano", 1.5, seed=9)
    first = generator.generate(request, write=False)
    again = generator.generate(request, write=False)
    other = generator.generate(MusicRequest("calm piano", 1.5, seed=10), write=False)
    assert np.array_equal(first.codes, again.codes) and not np.array_equal(first.codes, other.codes)
    streamed = np.concatenate([c.samples for c in generator.stream(request)])
    assert np.array_equal(streamed, first.samples)
    assert np.max(np.abs(streamed - generator.decode_reference(first.codes))) < 1e-5


def test_stereo_models_stream_two_channels(tileable_musicgen, cache_dir, demo_paths):
    """musicgen-stereo-*: 8 codebooks interleaved left/right, each side decoded by the codec on its own."""
    from transformers import AutoProcessor, MusicgenConfig, MusicgenForConditionalGeneration

    from pipeline.demo_models import randomize_codebooks
    from pipeline.music import MusicRequest
    from pipeline.music.generator import MusicGenerator

    config = MusicgenConfig.from_dict(tileable_musicgen.config.to_dict())
    config.decoder.audio_channels = 2
    config.decoder.num_codebooks = 8
    torch.manual_seed(1)
    model = MusicgenForConditionalGeneration(config).eval()
    randomize_codebooks(model.audio_encoder)
    generator = MusicGenerator(model, AutoProcessor.from_pretrained(demo_paths.music), weights="int5",
                               cache_dir=str(cache_dir))
    request = MusicRequest("wide stereo pads", 1.2, seed=3)
    music = generator.generate(request, write=False)
    assert music.samples.shape == (38400, 2) and music.codes.shape == (8, 60)
    assert not np.allclose(music.samples[:, 0], music.samples[:, 1])
    streamed = np.concatenate([c.samples for c in generator.stream(request)])
    assert np.array_equal(streamed, music.samples)
    assert np.max(np.abs(streamed - generator.decode_reference(music.codes))) < 1e-5


@pytest.mark.parametrize("top_k, top_p", [(10, 0.0), (0, 0.5), (20, 0.7), (0, 0.0)])
def test_sampling_follows_temperature_top_k_and_top_p(top_k, top_p):
    """The sampler draws from the k best candidates only; its distribution must equal masking the whole vocabulary."""
    from pipeline.music import Sampling
    from pipeline.music.lm import sample

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 3
    settings = Sampling(temperature=0.8, top_k=top_k, top_p=top_p)
    counts = torch.zeros(4, 64)
    for _ in range(8000):
        counts[torch.arange(4), sample(logits, settings, generator)] += 1
    scaled = logits / 0.8
    if top_k:
        scaled = scaled.masked_fill(scaled < torch.topk(scaled, top_k).values[..., -1:], float("-inf"))
    if top_p:
        ordered, order = torch.sort(scaled, descending=True)
        p = ordered.softmax(-1)
        ordered = ordered.masked_fill(p.cumsum(-1) - p > top_p, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, ordered)
    expected = scaled.softmax(-1)
    assert (counts / 8000 - expected).abs().max() < 0.03
    assert counts[expected == 0].sum() == 0


def test_the_fused_layers_agree_across_the_kernel_builds(tileable_musicgen, cache_dir, tmp_path):
    """The key cache is read in blocks of 16 positions by VNNI on this CPU and position by position by the portable
    builds; 40 positions cover whole blocks and a partial one. Scores are exact integer sums on every path, so the
    builds differ only by float rounding (which can move an activation across an int8 rounding step: 0.6 % of the
    largest logit at most, measured). A misread layout gives unrelated logits."""
    import ctypes
    import shutil

    from pipeline.music import native as native_kernels
    from pipeline.music.lm import FastMusicLM

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here")
    ids = torch.tensor([[5, 9, 13, 1]])
    mask = torch.ones_like(ids)
    tokens = torch.randint(0, 64, (1, 4, 40), generator=torch.Generator().manual_seed(5))
    tokens[:, :, 0] = 64
    lm = FastMusicLM(copy.deepcopy(tileable_musicgen), weights="int5", cache_dir=str(cache_dir))
    if not lm.fused:
        pytest.skip("no native kernel on this machine")
    expected = lm.teacher_forced_logits(ids, mask, tokens)
    for flags in (["-march=x86-64", "-mf16c"], ["-march=haswell"]):
        target = tmp_path / f"layers{flags[0][7:]}.so"
        native_kernels.compile_kernel(target, ["-O2", *flags])
        lm.use_kernel(native_kernels.LowBitKernel(ctypes.CDLL(str(target)), target))
        got = lm.teacher_forced_logits(ids, mask, tokens)
        cosine = torch.nn.functional.cosine_similarity(got.flatten().double(), expected.flatten().double(), dim=0)
        assert cosine > 0.9999, (flags, float(cosine), float((got - expected).abs().max()), float(expected.abs().max()))
        assert torch.allclose(got, expected, atol=0.02 * expected.abs().max().item()), flags


def test_the_c_packer_picks_the_same_codes_as_the_pytorch_one(cache_dir, tmp_path):
    """Packing runs in C where the kernel loads (25× faster than the PyTorch search, which took most of a load);
    both must choose the same clip ratio, codes, scales and offsets, on every build of the kernel."""
    import ctypes
    import shutil

    from pipeline.music import native as native_kernels

    kernel = native_kernels.load_kernel(str(cache_dir))
    if kernel is None or (shutil.which("cc") is None and shutil.which("gcc") is None):
        pytest.skip("no native kernel here")
    weight = torch.randn(64, 1024, generator=torch.Generator().manual_seed(6)) * 0.02
    weight[0, :32] = 0.0  # a flat group: the smallest scale
    weight[1, 5] = 3.0  # an outlier: the clip ratios matter
    groups = weight.reshape(64, 32, 32)
    kernels = [kernel]
    for flags in (["-march=x86-64", "-mf16c"], ["-march=haswell"]):
        target = tmp_path / f"pack{flags[0][7:]}.so"
        native_kernels.compile_kernel(target, ["-O2", *flags])
        kernels.append(native_kernels.LowBitKernel(ctypes.CDLL(str(target)), target))
    for levels in (15, 31):
        expected = native_kernels.quantize_groups(groups, levels)
        for built in kernels:
            got = built.quantize_groups(groups, levels)
            for a, b in zip(got, expected):
                assert torch.equal(a, b), (built.isa, levels)
    packed = native_kernels.PackedLowBit(weight, bits=5, kernel=kernel)
    assert torch.equal(packed.dequantized(), native_kernels.PackedLowBit(weight, bits=5).dequantized())
