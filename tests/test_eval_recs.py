"""scripts/eval_recs.py: its metrics on known cases, and a run over a small slice so it cannot rot."""

import math

import numpy as np
import pandas as pd
import pytest

from scripts import eval_recs as ev
from tests.conftest import DATA_DIR


def test_theme_precision_counts_only_labelled_songs_and_skips_thin_rankings():
    labels = {f"a|s{i}": ("love" if i % 2 else "war") for i in range(40)}
    ranked = [["x|unlabelled"]] + [[f"a|s{i}"] for i in range(40)]
    love_first = sorted(ranked, key=lambda keys: labels.get(keys[0]) != "love")
    assert ev.theme_precision(lambda q: love_first, [("love", "q")], labels)["value"] == 1.0
    assert ev.theme_precision(lambda q: ranked, [("love", "q")], labels)["value"] == 0.5
    thin = ev.theme_precision(lambda q: ranked[:4], [("love", "q")], labels)
    assert thin["queries"] == 0 and math.isnan(thin["value"])


def test_noisy_recall_matches_title_and_artist_prefix():
    case = {"artist": "the supremes", "title": "Baby Love (Remastered)", "query": "q"}
    hit = [["other|song"], ["supremesanddianaross|babylove"]]
    assert ev.noisy_recall(lambda q: hit, [case])["value"] == 1.0
    assert ev.noisy_recall(lambda q: [["supremes|stoplove"]], [case])["value"] == 0.0
    assert ev.noisy_recall(lambda q: [["x|y"]] * 10 + hit, [case])["value"] == 0.0  # only the top 10 count


def test_mood_consistency_labels_by_nearest_tracks():
    rng = np.random.default_rng(0)
    happy = pd.DataFrame({"valence": rng.normal(0.9, 0.03, 30), "energy": rng.normal(0.8, 0.03, 30),
                          "danceability": 0.7, "acousticness": 0.1, "mood": "happy"})
    sad = pd.DataFrame({"valence": rng.normal(0.1, 0.03, 30), "energy": rng.normal(0.2, 0.03, 30),
                        "danceability": 0.3, "acousticness": 0.8, "mood": "sad"})
    moods = pd.concat([happy, sad], ignore_index=True)
    cols = list(ev.MOOD_LABEL_FEATURES)
    right = ev.mood_consistency(lambda q: np.array([[q[c] for c in cols]] * 20), moods)
    wrong = ev.mood_consistency(lambda q: np.array([[1 - q[c] for c in cols]] * 20), moods)  # the other mood
    assert right["value"] == 1.0 and wrong["value"] == 0.0


def test_a_small_slice_runs_end_to_end(small_index, tmp_path):
    if not (DATA_DIR.is_dir() and ev.DEFAULT_EVAL_DIR.is_dir()):
        pytest.skip("../shared/data or ../shared/eval is not available")
    result = ev.main(["--index", str(small_index), "--limit-queries", "6", "--cache-dir", str(tmp_path), "--json"])
    methods = result["methods"]
    assert set(methods) == {"catalog", "plain_mean_vector_fp32", "plain_max_passage_fp32",
                            "plain_standardised_features"}
    for name in ("catalog", "plain_mean_vector_fp32", "plain_max_passage_fp32"):
        for metric in ("theme_precision_at_20", "noisy_recall_at_10"):
            value = methods[name][metric]
            assert math.isnan(value) or 0.0 <= value <= 1.0, (name, metric, value)
    assert 0.0 <= methods["catalog"]["mood_consistency"] <= 1.0
    assert set(methods["catalog"]["mood_per_mood"]) == {"calm", "energetic", "happy", "sad"}
    assert methods["catalog"]["lyric_search_p50_ms"] > 0
    halves = methods["catalog"]["mood_consistency_on_halves"]
    assert halves["splits"] == 3 and 0.0 <= halves["without_mood_fit_mean"] <= halves["mean"] <= 1.0, halves
    assert result["theme_queries"] == 6 and result["noisy_queries"] == 6
