"""The music engine beyond one window: long clips, Extend, Endless (tiny demo models; no timing assertions)."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from pipeline.audio import chunk_grid
from pipeline.errors import Cancelled, InputError
from pipeline.music.codec import LOOKAHEAD_FRAMES

WINDOW_S, STRIDE_S = 1.0, 0.6  # 50-frame windows moving on by 30 frames: a 2.4-s clip spans 4 windows


@pytest.fixture(scope="module")
def windowed(demo_paths, cache_dir):
    """The demo MusicGen with a window small enough that short clips cross several windows, and chunks that fit
    whole seconds (so that a clip and its extension share one chunk grid)."""
    from pipeline.music.generator import MusicGenerator

    return MusicGenerator.load(demo_paths.music, cache_dir=str(cache_dir), window_s=WINDOW_S,
                               extend_stride_s=STRIDE_S, first_chunk_s=0.5, stream_chunk_s=0.5)


def _record_steps(monkeypatch):
    """What the decode loop feeds the model, per KV cache of a conditional row: lists of (position, tokens), a new
    list each time a cache restarts at position 0 (a new window)."""
    from pipeline.music.lm import FastMusicLM

    fed: dict[int, list[list]] = {}
    original = FastMusicLM.step

    def spy(self, tokens, positions, caches, texts):
        for row, (pos, cache, text) in enumerate(zip(positions, caches, texts)):
            if text is not None:
                runs = fed.setdefault(id(cache), [])
                if pos == 0:
                    runs.append([])
                runs[-1].append((pos, tokens[row].tolist()))
        return original(self, tokens, positions, caches, texts)

    monkeypatch.setattr(FastMusicLM, "step", spy)
    return fed


def test_long_clips_cross_windows_deterministically_and_stream_equals_generate(windowed):
    from pipeline.music import MusicRequest

    request = MusicRequest("calm piano", 2.4, seed=4)
    first = windowed.generate(request, write=False)
    again = windowed.generate(request, write=False)
    assert first.codes.shape == (4, 120) and first.samples.shape == (2.4 * 32000,)
    assert np.array_equal(first.codes, again.codes) and np.array_equal(first.samples, again.samples)
    streamed = list(windowed.stream(request))
    assert np.array_equal(np.concatenate([c.samples for c in streamed]), first.samples)
    assert [c.is_last for c in streamed].count(True) == 1 and len({c.clip_id for c in streamed}) == 1
    # one codec through all windows: no seam, no repeated or missing samples
    reference = windowed.decode_reference(first.codes)
    assert reference.shape == first.samples.shape and np.max(np.abs(reference - first.samples)) < 1e-5
    # the first window is the clip a single window would make; the later ones go on from it
    single = windowed.generate(MusicRequest("calm piano", WINDOW_S, seed=4), write=False)
    assert np.array_equal(single.codes, first.codes[:, :50])
    assert not np.array_equal(windowed.generate(MusicRequest("calm piano", 2.4, seed=5), write=False).codes,
                              first.codes)


def test_each_window_reprefills_the_delay_pattern_of_its_prompt(windowed, demo_paths, monkeypatch):
    """What the model is fed in every window equals transformers' own delay pattern (`build_delay_pattern_mask`)
    of that window's codes: the prompt frames rebuilt as complete frames, then the new ones."""
    from transformers import MusicgenForConditionalGeneration

    from pipeline.music import MusicRequest

    fed = _record_steps(monkeypatch)
    music = windowed.generate(MusicRequest("slow strings", 2.0, seed=2), write=False)
    # windows in the order they started (two caches take turns: windows 0, 2, ... and 1, 3, ...)
    windows = [window for _, window in sorted(((order, run) for runs in fed.values()
                                                for order, run in enumerate(runs)), key=lambda item: item[0])]
    for window in windows:
        assert [pos for pos, _ in window] == list(range(len(window)))  # one position after the other, no gaps
    window, stride = windowed.window_frames, windowed.stride_frames
    starts = [stride * i for i in range(len(windows))]
    assert len(windows) == 3 and starts[-1] + window >= music.codes.shape[1]
    windows = [[tokens for _, tokens in run] for run in windows]
    decoder = MusicgenForConditionalGeneration.from_pretrained(demo_paths.music).decoder
    pad = decoder.config.pad_token_id
    for start, steps in zip(starts, windows):
        codes = torch.as_tensor(music.codes[:, start: start + window])
        ids = torch.cat([torch.full((4, 1), pad), codes], dim=-1)
        _, pattern = decoder.build_delay_pattern_mask(ids, pad_token_id=pad, max_length=ids.shape[-1] + 3)
        assert torch.equal(torch.tensor(steps).T, pattern[:, : len(steps)]), start


def test_extend_continues_the_same_audio_with_a_new_prompt(windowed):
    from pipeline.music import MusicRequest

    clip = windowed.generate(MusicRequest("calm piano", 1.0, seed=3), write=False)
    request = MusicRequest("fast drums", 1.5, seed=8, continue_from=clip.continuation)
    more = windowed.generate(request, write=False)
    assert more.codes.shape == (4, 75) and more.samples.shape == (48000,) and more.clip_id != clip.clip_id
    assert np.array_equal(np.concatenate([c.samples for c in windowed.stream(request)]), more.samples)
    assert np.array_equal(windowed.generate(request, write=False).codes, more.codes)
    # the new music depends on where the clip ended, not only on its own prompt and seed
    fresh = windowed.generate(MusicRequest("fast drums", 1.5, seed=8), write=False)
    assert not np.array_equal(fresh.codes, more.codes)
    # seamless: after the clip's last few frames (decoded as an ending), the extension is exactly the audio of one
    # long clip with all the codes
    joined = windowed.decode_reference(np.concatenate([clip.codes, more.codes], axis=1))
    hop, end = 640, 50 - LOOKAHEAD_FRAMES
    last = chunk_grid(50, windowed.first_chunk_frames, windowed.chunk_frames)[-1][0]
    assert np.max(np.abs(joined[: last * hop] - clip.samples[: last * hop])) < 1e-5
    # the clip's last chunk has the same sound at a slightly other level: its loudness gain counts the clip's
    # ending, and the long clip's counts the music that goes on instead (a few 1e-5 to 1e-4 apart, with the codes)
    assert np.allclose(joined[last * hop: end * hop], clip.samples[last * hop: end * hop], rtol=1e-2, atol=1e-5)
    assert np.max(np.abs(joined[32000:] - more.samples)) < 1e-3
    # and it can be extended in turn (a chain), its continuation counting all the music so far
    third = windowed.generate(MusicRequest("fast drums", 0.5, seed=1, continue_from=more.continuation), write=False)
    assert third.continuation.seconds == pytest.approx(3.0)


def test_endless_streams_until_cancelled(pipeline):
    cancel = threading.Event()
    chunks = []
    stream = pipeline.stream("endless ambient", seed=1, endless=True, cancel=cancel)
    with pytest.raises(Cancelled):
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 4:
                cancel.set()
    assert len(chunks) == 4 and not any(c.is_last for c in chunks)
    assert len({c.clip_id for c in chunks}) == 1


def test_the_facade_extends_recent_clips_by_id(pipeline):
    clip = pipeline.generate("warm guitar", 1.0, seed=2, write=False)
    chunks = list(pipeline.extend(clip.clip_id, 1.0, prompt="bright synth", seed=3))
    assert sum(c.samples.shape[0] for c in chunks) == 32000 and chunks[-1].is_last
    assert chunks[0].clip_id != clip.clip_id
    again = list(pipeline.extend(clip.clip_id, 1.0, prompt="bright synth", seed=3))
    assert np.array_equal(np.concatenate([c.samples for c in chunks]), np.concatenate([c.samples for c in again]))
    # a streamed extension can itself be extended; without a prompt it keeps the previous one
    longer = list(pipeline.extend(chunks[-1].clip_id, 1.0))
    assert sum(c.samples.shape[0] for c in longer) == 32000
    with pytest.raises(InputError, match="no longer"):
        list(pipeline.extend("not-a-clip", 1.0))


def test_the_fused_c_path_crosses_windows(tileable_musicgen, cache_dir, demo_paths):
    from transformers import AutoProcessor

    from pipeline.music import MusicRequest
    from pipeline.music.generator import MusicGenerator

    generator = MusicGenerator(copy.deepcopy(tileable_musicgen), AutoProcessor.from_pretrained(demo_paths.music),
                               weights="int5", cache_dir=str(cache_dir), window_s=WINDOW_S, extend_stride_s=STRIDE_S)
    if not generator.lm.fused:
        pytest.skip("no native kernel on this machine")
    request = MusicRequest("calm piano", 2.0, seed=9)
    first = generator.generate(request, write=False)
    assert first.codes.shape == (4, 100)
    assert np.array_equal(generator.generate(request, write=False).codes, first.codes)
    streamed = np.concatenate([c.samples for c in generator.stream(request)])
    assert np.array_equal(streamed, first.samples)
    assert np.max(np.abs(streamed - generator.decode_reference(first.codes))) < 1e-5
    more = generator.generate(MusicRequest("drums", 1.0, seed=1, continue_from=first.continuation), write=False)
    assert more.codes.shape == (4, 50)




# -- continuous batching -----------------------------------------------------------------------------------------------

BATCH_REQUESTS = [  # prompt, seconds, seed, sampling: different in every way, one of them crossing windows
    ("calm piano", 1.6, 1, {}),
    ("fast drums and bass", 0.8, 2, {"temperature": 0.7, "top_k": 0, "top_p": 0.9}),
    ("ambient pads", 1.2, 3, {"guidance_scale": 1.0}),  # no guidance: one row instead of two
    ("jazz trio", 0.6, 4, {"top_k": 20, "guidance_scale": 5.0}),
]


def _solo_and_batched(lm, processor, cancel_index: int | None = None):
    from pipeline.music import Sampling
    from pipeline.music.engine import Engine

    def inputs(prompt):
        encoded = processor(text=[prompt], return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]

    window, stride = 50, 30
    solo = [torch.cat(list(lm.frames(*inputs(p), round(s * 50), seed=seed, sampling=Sampling(**kw),
                                     window=window, stride=stride)), dim=-1)
            for p, s, seed, kw in BATCH_REQUESTS]
    engine = Engine(lm, max_batch=3)  # the fourth waits in line until one leaves
    cancels = [threading.Event() for _ in BATCH_REQUESTS]
    streams, got = [], [[] for _ in BATCH_REQUESTS]
    for i, (p, s, seed, kw) in enumerate(BATCH_REQUESTS):
        streams.append(engine.frames(*inputs(p), round(s * 50), seed=seed, sampling=Sampling(**kw),
                                     cancel=cancels[i], window=window, stride=stride))
        got[i].append(next(streams[i]))  # each joins while the ones before it are running, at another step
        if i == cancel_index:
            cancels[i].set()
    outcome = []
    for i, stream in enumerate(streams):
        try:
            got[i].extend(stream)
            outcome.append(torch.cat(got[i], dim=-1))
        except Cancelled:
            outcome.append(None)
    return solo, outcome, engine


def test_batched_requests_equal_their_solo_runs(demo_paths, cache_dir):
    from transformers import AutoProcessor, MusicgenForConditionalGeneration

    from pipeline.music.lm import FastMusicLM

    model = MusicgenForConditionalGeneration.from_pretrained(demo_paths.music).eval()
    lm = FastMusicLM(model, weights="int5", cache_dir=str(cache_dir))
    solo, batched, engine = _solo_and_batched(lm, AutoProcessor.from_pretrained(demo_paths.music))
    for i, (alone, together) in enumerate(zip(solo, batched)):
        assert torch.equal(alone, together), BATCH_REQUESTS[i]
    # they shared steps: far fewer than one after the other
    assert engine.status().running == 0 and engine.steps < 0.6 * sum(s.shape[-1] for s in solo)


def test_cancelling_one_batch_member_leaves_the_others_untouched(demo_paths, cache_dir):
    from transformers import AutoProcessor, MusicgenForConditionalGeneration

    from pipeline.music.lm import FastMusicLM

    model = MusicgenForConditionalGeneration.from_pretrained(demo_paths.music).eval()
    lm = FastMusicLM(model, weights="int5", cache_dir=str(cache_dir))
    solo, batched, _ = _solo_and_batched(lm, AutoProcessor.from_pretrained(demo_paths.music), cancel_index=1)
    assert batched[1] is None
    for i in (0, 2, 3):
        assert torch.equal(solo[i], batched[i]), BATCH_REQUESTS[i]


def test_the_fused_c_path_is_batch_invariant(tileable_musicgen, cache_dir, demo_paths):
    from transformers import AutoProcessor

    from pipeline.music.lm import FastMusicLM

    lm = FastMusicLM(copy.deepcopy(tileable_musicgen), weights="int5", cache_dir=str(cache_dir))
    if not lm.fused:
        pytest.skip("no native kernel on this machine")
    solo, batched, _ = _solo_and_batched(lm, AutoProcessor.from_pretrained(demo_paths.music))
    for i, (alone, together) in enumerate(zip(solo, batched)):
        assert torch.equal(alone, together), BATCH_REQUESTS[i]


def test_concurrent_streams_through_the_generator_equal_their_solo_audio(windowed, demo_paths, cache_dir):
    """Listeners in their own threads; model work on one runner thread, as the app's compute thread does it."""
    import queue as queue_module

    from pipeline.music import MusicRequest, Sampling
    from pipeline.music.generator import MusicGenerator

    requests = [MusicRequest(p, s, seed=seed, sampling=Sampling(**kw)) for p, s, seed, kw in BATCH_REQUESTS[:3]]
    solo = [windowed.generate(r, write=False).samples for r in requests]
    jobs: queue_module.SimpleQueue = queue_module.SimpleQueue()

    def compute_thread():
        while True:
            fn, done = jobs.get()
            try:
                done.put((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                done.put((False, exc))

    def runner(fn):
        done: queue_module.SimpleQueue = queue_module.SimpleQueue()
        jobs.put((fn, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    threading.Thread(target=compute_thread, daemon=True).start()
    batched = MusicGenerator.load(demo_paths.music, cache_dir=str(cache_dir), window_s=WINDOW_S,
                                  extend_stride_s=STRIDE_S, first_chunk_s=0.5, stream_chunk_s=0.5)
    batched.serve_batched(max_batch=4, runner=runner)
    results = [None] * len(requests)

    def listen(i):
        results[i] = np.concatenate([c.samples for c in batched.stream(requests[i])])

    threads = [threading.Thread(target=listen, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    for alone, together in zip(solo, results):
        assert together is not None and np.array_equal(alone, together)


@pytest.mark.parametrize("path", ["pytorch", "fused"])
def test_a_prompt_prefilled_many_positions_a_step_gives_the_same_codes(path, demo_paths, cache_dir,
                                                                         tileable_musicgen):
    """A continuation's first window feeds its prompt several columns per step; rows that share a cache see each
    other's positions, so the codes equal feeding one column per step."""
    from transformers import AutoProcessor, MusicgenForConditionalGeneration

    from pipeline.music import Sampling
    from pipeline.music.lm import FastMusicLM

    model = (MusicgenForConditionalGeneration.from_pretrained(demo_paths.music).eval() if path == "pytorch"
             else copy.deepcopy(tileable_musicgen))
    lm = FastMusicLM(model, weights="int5", cache_dir=str(cache_dir))
    if path == "fused" and not lm.fused:
        pytest.skip("no native kernel on this machine")
    inputs = AutoProcessor.from_pretrained(demo_paths.music)(text=["a slow waltz"], return_tensors="pt")
    prefix = torch.randint(0, 64, (4, 40), generator=torch.Generator().manual_seed(5))
    runs = []
    for columns in (1, 7, 32):
        state = lm.decode(inputs["input_ids"], inputs["attention_mask"], 45, seed=3, sampling=Sampling(),
                          prefix=prefix, window=50, stride=30)
        blocks, steps = [], 0
        while not state.done:
            blocks += state.advance(lm.step(*state.rows(columns)))
            steps += 1
        runs.append((torch.cat(blocks, dim=-1), steps))
    assert runs[0][0].shape == (4, 45)
    assert all(torch.equal(codes, runs[0][0]) for codes, _ in runs)
    assert runs[2][1] < runs[0][1] - 15  # and the prompt took fewer steps
