import json
import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from pipeline import recommend, song_moods
from pipeline.catalog import Catalog, spotify_url
from pipeline.catalog_schema import words
from pipeline.errors import IndexIntegrityError, InputError
from pipeline.features import FEATURES, SPACE_SOURCE, FeatureSpace
from scripts import build_index as b
from tests.conftest import reference_feature_scores

EVAL_DIR = b.DEFAULT_DATA_DIR.parent / "eval"


def _table(catalog):
    import pyarrow.parquet as pq

    return pq.read_table(catalog.path / "songs.parquet").to_pandas()


# -- the feature transform ----------------------------------------------------------------------------------------

def test_no_single_feature_dominates_the_distance(catalog):
    songs = _table(catalog)
    x = songs[songs.has_features][list(FEATURES)].to_numpy(dtype=float)
    rng = np.random.default_rng(0)
    a, c = rng.integers(0, len(x), (2, 3000))
    vectors = catalog.space.transform(x)
    share = np.mean((vectors[a] - vectors[c]) ** 2, axis=0)
    per_feature = {f: share[[i for i, s in enumerate(SPACE_SOURCE) if s == f]].sum() / share.sum() for f in FEATURES}
    # valence and energy carry the most by design (weights measured for mood consistency), but neither decides alone
    assert max(per_feature.values()) < 0.4, per_feature
    assert per_feature["valence"] + per_feature["energy"] < 0.75, per_feature
    raw = np.mean((x[a] - x[c]) ** 2, axis=0)
    assert raw[FEATURES.index("duration_ms")] / raw.sum() > 0.99  # what the transform protects against


def test_bounds_and_the_circle_of_fifths():
    space = FeatureSpace(mean=np.zeros(14), std=np.ones(14), tau=1.0)
    base = dict(zip(FEATURES, [0.5, 0.5, 0, -8, 1, 0.05, 0.2, 0.0, 0.1, 0.5, 120, 200000, 4]))

    def vec(**changes):
        return space.transform(np.array([[{**base, **changes}[f] for f in FEATURES]]))[0]

    assert np.allclose(vec(tempo=300), vec(tempo=200)) and np.allclose(vec(loudness=-60), vec(loudness=-30))
    assert np.allclose(vec(duration_ms=2_000_000), vec(duration_ms=600_000))
    c, g, c_sharp = vec(key=0), vec(key=7), vec(key=1)
    assert np.linalg.norm(c - g) < np.linalg.norm(c - c_sharp)


def test_feature_search_matches_brute_force_and_scores_are_ordered(catalog):
    songs = _table(catalog)
    with_features = songs[songs.has_features]
    query = with_features.iloc[5][list(FEATURES)].to_dict()
    matches = catalog.search_features(query, k=10)
    everyone = np.ones(len(songs), dtype=bool)
    assert [m.song_id for m in matches] == _brute_force(catalog, songs, query, everyone, 10)
    reference = dict(zip(with_features["id"], _reference_scores(catalog, with_features, query)))
    assert [m.score for m in matches] == pytest.approx([reference[m.song_id] for m in matches], abs=1e-4)
    assert matches[0].song_id == int(with_features.iloc[5]["id"])  # a song is its own nearest, mood included
    scores = [m.score for m in matches]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert re.fullmatch(r"\w+ mood \d\.\d\d ↔ \d\.\d\d; close on .+", matches[0].why), matches[0].why
    assert set(matches[0].features) == set(FEATURES)


def test_songs_of_the_querys_mood_rank_above_nearer_songs_of_another(catalog):
    """The mean of the mood table's happy tracks sits among energetic ones; the search still returns happy songs,
    at a small cost in sound similarity, and says which mood it matched."""
    moods = pd.read_csv(EVAL_DIR / "moods_dev.csv")
    happy = moods[moods.mood == "happy"][[f for f in FEATURES if f in moods]].mean().to_dict()
    model = song_moods.load()
    column = model.moods.index("happy")
    found = catalog.search_features(happy, k=10)
    catalog.use_song_moods(None)
    try:
        plain = catalog.search_features(happy, k=10)
    finally:
        catalog.use_song_moods(model)
    songs = _table(catalog).set_index("id")

    def happiness(matches):
        return model.probabilities(songs.loc[[m.song_id for m in matches], list(FEATURES)].to_numpy(float))[:, column]

    assert happiness(found).mean() > happiness(plain).mean() + 0.1
    assert all(m.why.startswith("happy mood") for m in found) and "mood" not in plain[0].why
    assert np.mean([m.score for m in plain]) > 0.8  # the plain list is near in sound, yet of another mood


def test_the_song_mood_model_is_the_fit_of_its_table():
    from scripts import fit_song_moods

    assert fit_song_moods.main(["--check"]) == 0
    model = song_moods.load()
    assert model.moods == ("calm", "energetic", "happy", "sad")
    means = pd.read_csv(EVAL_DIR / "moods_dev.csv").groupby("mood")[list(model.features)].mean()
    full = np.full((4, len(FEATURES)), np.nan)
    for i, mood in enumerate(model.moods):
        for f in model.features:
            full[i, FEATURES.index(f)] = means.loc[mood, f]
    assert model.probabilities(full).argmax(axis=1).tolist() == [0, 1, 2, 3]  # each mood's mean reads as itself
    unknown = model.probabilities(np.full((1, len(FEATURES)), np.nan))
    assert model.fit_to(model.probabilities(full)[2], unknown)[0] == pytest.approx(
        0.25 / model.probabilities(full)[2].max())


def test_vector_and_mapping_queries_agree_and_exclusions_apply(catalog):
    songs = _table(catalog)
    row = songs[songs.has_features].iloc[3]
    as_map = catalog.search_features(row[list(FEATURES)].to_dict(), k=5)
    as_vec = catalog.search_features(row[list(FEATURES)].to_numpy(dtype=float), k=5)
    assert [m.song_id for m in as_map] == [m.song_id for m in as_vec]
    excluded = catalog.search_features(row[list(FEATURES)].to_dict(), k=5, exclude_ids=[as_map[0].song_id])
    assert as_map[0].song_id not in [m.song_id for m in excluded] and len(excluded) == 5


def test_partial_queries_compare_only_the_given_features(catalog):
    matches = catalog.search_features({"valence": 0.95, "energy": 0.9}, k=8)
    assert len(matches) == 8
    for m in matches:
        assert abs(m.features["valence"] - 0.95) < 0.25 and abs(m.features["energy"] - 0.9) < 0.25


@pytest.mark.parametrize("bad", [{"valence": 3.0}, {"colour": 1.0}, {}, [0.1] * 12, {"tempo": "fast"}])
def test_bad_feature_queries_get_clear_messages(catalog, bad):
    with pytest.raises(InputError):
        catalog.search_features(bad)


@pytest.mark.parametrize("k", [0, -1, 2.5, "ten", True, float("nan")])
def test_k_out_of_range_is_refused(catalog, k):
    with pytest.raises(InputError):
        catalog.search_features({"valence": 0.5}, k=k)


def test_any_positive_k_is_the_facades_to_limit(catalog):
    assert len(catalog.search_features({"valence": 0.5}, k=10_000)) == catalog.counts["with_features"]


# -- lyrics ------------------------------------------------------------------------------------------------------

def test_calibration_rewards_strong_matches_and_penalises_weak_ones():
    cal = recommend.calibrate([np.random.default_rng(0).normal(0.3, 0.05, 10_000)])
    assert cal["center"] == pytest.approx(0.3 + 2.5 * 0.05, abs=0.005)
    weak, middle, strong = recommend.calibrated(np.array([0.3, cal["center"], 0.6]), cal)
    assert weak < 0.1 < 0.45 < middle < 0.55 < 0.9 < strong <= 1.0


def _scorer(passages, passage_songs, bags, topics=None):
    rows = [(song, word, count) for song, bag in bags.items() for word, count in sorted(bag.items())]
    topics = np.full((max(passage_songs) + 1, 2), 0.5) if topics is None else topics
    return recommend.LyricScorer(np.asarray(passages, np.float32), np.asarray(passage_songs),
                                 np.array([r[0] for r in rows]), [r[1] for r in rows], np.array([r[2] for r in rows]),
                                 topics, np.eye(2, 3, dtype=np.float32))


def test_best_passage_and_whole_song_both_count():
    e = np.eye(3, dtype=np.float32)
    # song 0: one passage on the query; song 1: two half-related passages; song 2: unrelated
    scorer = _scorer([e[0], e[1], (e[0] + e[1]) / np.sqrt(2), (e[0] + e[1]) / np.sqrt(2), e[2]], [0, 0, 1, 1, 2],
                     {0: {"sun": 1}, 1: {"rain": 2}, 2: {"snow": 1}})
    found = scorer.query(e[0], "a quiet walk")
    assert found.best.tolist() == pytest.approx([1.0, 2 ** -0.5, 0.0])
    assert found.whole[0] == pytest.approx(2 ** -0.5)  # the mean of passages e0 and e1
    assert found.relevance[0] > found.relevance[1] > found.relevance[2]


def test_shared_rare_words_lift_a_song_and_are_reported():
    e = np.eye(3, dtype=np.float32)
    scorer = _scorer([e[0], e[0], e[2]], [0, 1, 2], {0: {"river": 1}, 1: {"lighthouse": 3, "river": 1}, 2: {}})
    found = scorer.query(e[0], "Lighthouses by the river")
    assert found.words == ["lighthouse", "river"]
    assert found.relevance[1] > found.relevance[0]
    assert scorer.shared_words(found.words, 1) == ["lighthouse", "river"] and scorer.shared_words(found.words, 0) == [
        "river"]


def test_the_topic_prior_ranks_songs_of_the_querys_topic_first():
    e = np.eye(3, dtype=np.float32)
    topics = np.array([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]])
    scorer = _scorer([e[2], e[2], e[2]], [0, 1, 2], {0: {}, 1: {}, 2: {}}, topics)
    near_topic_1 = np.array([0.1, 0.5, 0.3], np.float32) / np.linalg.norm([0.1, 0.5, 0.3])
    found = scorer.query(near_topic_1, "x")
    assert found.line == 0.0  # not a lyric line: the topic prior applies
    assert np.argmax(found.query_topics) == 1 and np.argmax(found.relevance) == 1


def test_a_lyric_passage_finds_its_own_song(catalog):
    songs = _table(catalog)
    raw = pd.read_excel(b.DEFAULT_DATA_DIR / "billboard_lyrics_1964-2015.xlsx")
    keyed = {k: row.Lyrics for row in raw.itertuples() if isinstance(row.Lyrics, str)
             for k in b.song_keys(row.Artist, row.Song)}
    for row in songs[songs.has_lyrics].itertuples():
        lyric = next((keyed[k] for k in b.song_keys(row.artist, row.title) if k in keyed), None)
        if lyric and len(b.passages(lyric)) >= 2:
            break
    else:
        pytest.skip("no Billboard song in the slice")
    query = b.passages(lyric)[0]
    matches = catalog.search_lyrics(query, k=5)
    assert matches[0].song_id == row.id and matches[0].score > 0.9
    assert "shared words:" in matches[0].why
    assert all(0 <= m.score <= 1 for m in matches)


def test_unrelated_text_scores_low(catalog):
    matches = catalog.search_lyrics("quarterly tax accounting spreadsheet for the municipal budget", k=5)
    assert matches and max(m.score for m in matches) < 0.5


def test_empty_lyric_query_is_refused(catalog):
    with pytest.raises(InputError):
        catalog.search_lyrics("   ")


# -- fusion --------------------------------------------------------------------------------------------------------

def test_reciprocal_rank_fusion():
    fused = recommend.fuse({"features": {1: 0.9, 2: 0.8, 3: 0.7}, "lyrics": {3: 0.95, 4: 0.9}})
    assert fused[0][0] == 3 and fused[0][2] == {"features": 3, "lyrics": 1}
    assert fused[0][1] == pytest.approx((1 / 63 + 1 / 61) / (2 / 61))
    assert all(0 <= score <= 1 for _, score, _ in fused)


def test_fused_list_explains_both_ranks(catalog):
    songs = _table(catalog)
    both = songs[songs.has_features & songs.has_lyrics].iloc[0]
    fused = catalog.search_fused(both[list(FEATURES)].to_dict(), f"{both.themes}, {both.keywords}", k=10)
    assert len(fused) == 10
    both_sides = [m.why for m in fused if "sound #" in m.why and "lyrics #" in m.why]
    assert both_sides and all("↔" in why for why in both_sides)
    assert [m.score for m in fused] == sorted((m.score for m in fused), reverse=True)


def test_songs_found_by_lyrics_get_the_sound_score_the_sound_ranking_gives(catalog):
    """The fused list completes the sound ranking with the songs found by lyrics: their scores must be those of
    the sound ranking (mood fit included), or a song found by lyrics alone would jump into the sound list."""
    songs = _table(catalog)
    text = "love and tears on a rainy night"
    for row in (11, 12, 13):
        query = songs[songs.has_features].iloc[row][list(FEATURES)].to_dict()
        by_features, by_lyrics, _ = catalog.recommend(query, text, k=50, pool=50)
        alone = catalog.search_features(query, k=50)
        assert [(m.song_id, m.score) for m in by_features] == [(m.song_id, m.score) for m in alone]
        assert {m.song_id for m in by_lyrics} - {m.song_id for m in alone}  # some were scored by the completion


def test_spotify_links_and_counts(catalog):
    assert spotify_url("4cjHy6TwppuNZ05yrP8Fic") == "https://open.spotify.com/track/4cjHy6TwppuNZ05yrP8Fic"
    assert spotify_url("") == ""
    songs = _table(catalog)
    assert catalog.counts == {"songs": len(songs), "with_features": int(songs.has_features.sum()),
                              "with_lyrics": int(songs.has_lyrics.sum()),
                              "with_both": int((songs.has_features & songs.has_lyrics).sum())}


# -- integrity -----------------------------------------------------------------------------------------------------

@pytest.fixture()
def index_copy(small_index, tmp_path):
    target = tmp_path / "index"
    shutil.copytree(small_index, target)
    return target


@pytest.mark.parametrize("name", ["songs.parquet", "lyrics.faiss", "features.faiss", "passage_song_ids.npy"])
def test_a_tampered_file_is_refused_by_name(index_copy, name):
    path = index_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match=name):
        Catalog.load(index_copy)


def test_a_truncated_file_is_refused(index_copy):
    path = index_copy / "lyrics.faiss"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(IndexIntegrityError, match="lyrics.faiss"):
        Catalog.load(index_copy)


def test_a_missing_manifest_or_schema_mismatch_is_refused(index_copy):
    manifest = json.loads((index_copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (index_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexIntegrityError, match="schema version"):
        Catalog.load(index_copy)
    (index_copy / "manifest.json").unlink()
    with pytest.raises(IndexIntegrityError, match="manifest.json"):
        Catalog.load(index_copy)


def test_a_different_embedder_is_refused(small_index):
    class OtherEmbedder:
        def fingerprint(self):
            rng = np.random.default_rng(1)
            return (rng.normal(size=(3, 384)) / math.sqrt(384)).tolist()

    catalog = Catalog.load(small_index)
    with pytest.raises(IndexIntegrityError, match="does not match"):
        catalog.attach_embedder(OtherEmbedder())


# -- building ------------------------------------------------------------------------------------------------------

def test_titles_in_other_scripts_are_keys_of_their_own():
    """A Chinese or Cyrillic title used to fold to nothing, and the song was dropped from the catalog."""
    assert b.normalize_title("Судно (Борис Рижий)") == "судно"
    assert b.normalize_title("吻別") != b.normalize_title("每天愛你多一些")
    assert len(b.merge_records([b.Record("吻別", "張學友", "spotify_tracks", spotify_id="6" * 22),
                                b.Record("每天愛你多一些", "張學友", "spotify_tracks", spotify_id="7" * 22)])) == 2
    assert b.normalize_artist("Røyksopp") == "ryksopp"  # Latin letters still fold as before


def test_normalisation_for_deduplication():
    assert b.normalize_title("Hey Jude - Remastered 2009") == b.normalize_title("Hey Jude")
    assert b.normalize_title("Crazy (feat. Someone) [Live]") == "crazy"
    assert b.normalize_artist("The Beatles") == b.normalize_artist("Beatles")
    assert b.normalize_artist("Beyoncé") == "beyonce"
    assert b.normalize_artist("Simon & Garfunkel") == b.normalize_artist("Simon and Garfunkel")
    assert b.first_artist("Calvin Harris, Rihanna") == "calvinharris"
    assert b.first_artist("Jay-Z featuring Alicia Keys") == "jayz"


def test_records_merge_by_spotify_id_then_by_name():
    sid = "4cjHy6TwppuNZ05yrP8Fic"
    full = {**{f: 0.5 for f in FEATURES}, "time_signature": 4.0}
    records = [
        b.Record("Hey Jude - Remastered", "The Beatles", "tidytuesday", spotify_id=sid, genres=("rock", "album rock"),
                 features={k: v for k, v in full.items() if k != "time_signature"}),
        b.Record("Hey Jude", "Beatles", "musicoset", spotify_id=sid, features=full, popularity=80),
        b.Record("Hey Jude", "The Beatles", "spotify_tracks", spotify_id="1" * 22, genres=("Rock", "british"),
                 features=full),
        b.Record("hey jude", "the beatles", "billboard_lyrics", lyrics="na na na " * 20, lyrics_source="billboard_lyrics"),
        b.Record("Umbrella", "Rihanna featuring Jay-Z", "billboard_lyrics", lyrics="ella " * 30,
                 lyrics_source="billboard_lyrics"),
        b.Record("Umbrella", "Rihanna, JAY-Z", "tidytuesday", spotify_id="2" * 22, features=full),
        b.Record("Different Song", "The Beatles", "tidytuesday", spotify_id="3" * 22, features=full),
    ]
    songs = b.merge_records(records)
    assert len(songs) == 3
    jude = next(s for s in songs if s.spotify_id == sid)
    assert jude.sources == {"tidytuesday", "musicoset", "billboard_lyrics", "spotify_tracks"} and jude.lyrics
    # a song listed under several genres, in several tables, keeps them all, each once, the first source's first
    assert jude.genres == ["rock", "album rock", "british"] and jude.popularity == 80
    assert jude.features.get("time_signature") == 4.0  # the source without one takes it from another
    umbrella = next(s for s in songs if s.spotify_id == "2" * 22)
    assert umbrella.lyrics and umbrella.sources == {"tidytuesday", "billboard_lyrics"}


def test_missing_time_signature_is_imputed_and_flagged():
    frame = pd.DataFrame([{**{f: 0.5 for f in FEATURES}, "time_signature": 3.0},
                          {**{f: 0.5 for f in FEATURES}, "time_signature": 4.0},
                          {**{f: 0.5 for f in FEATURES}, "time_signature": 4.0},
                          {**{f: 0.5 for f in FEATURES}, "time_signature": None}])
    values, flags = b.impute_time_signature(frame)
    assert values.tolist() == [3.0, 4.0, 4.0, 4.0] and flags.tolist() == [False, False, False, True]


def test_passages_and_keywords_carry_no_running_text():
    lyric = ("hold me close tonight " * 3 + "chorus " + "we dance until the morning light " * 4).strip()
    parts = b.passages(lyric)
    assert parts and all(len(p.split()) <= b.PASSAGE_WORDS * 1.5 for p in parts)
    assert len(parts) == len(set(parts))
    keywords = b.keywords_by_song([words(lyric), words("the quick brown fox " * 10)])[0]
    assert "chorus" not in keywords and "the" not in keywords and len(keywords) <= b.KEYWORDS_PER_SONG
    assert b.passages("too short") == []


def test_build_is_deterministic(tmp_path):
    args = ["--limit-songs", "120", "--max-passages-per-song", "2", "--quiet"]
    b.build(b.parse_args(["--out", str(tmp_path / "a"), *args]))
    b.build(b.parse_args(["--out", str(tmp_path / "b"), *args]))
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_an_extra_table_can_be_added(tmp_path):
    table = tmp_path / "my_songs.csv"
    features = dict(zip(FEATURES, [0.6, 0.7, 5, -7.5, 1, 0.04, 0.2, 0.0, 0.1, 0.8, 118.0, 201000, 4]))
    pd.DataFrame([{"track_name": "Brand New Tune", "track_artist": "Nobody Famous", "track_id": "5" * 22,
                   **features, "lyrics": "a brand new tune about rivers and rain " * 6}]).to_csv(table, index=False)
    b.build(b.parse_args(["--out", str(tmp_path / "idx"), "--no-default-sources", "--table", str(table), "--quiet"]))
    catalog = Catalog.load(tmp_path / "idx")
    assert catalog.counts == {"songs": 1, "with_features": 1, "with_lyrics": 1, "with_both": 1}
    match = catalog.search_features(features, k=1)[0]
    assert match.title == "Brand New Tune" and match.spotify_id == "5" * 22 and match.features["tempo"] == 118.0


def test_the_documented_use_works_without_an_embedder_factory(small_index):
    catalog = Catalog.load(small_index)  # as the module docstring shows: the embedder comes from the settings
    matches = catalog.search_lyrics("dancing all night long under the city lights", k=3)
    assert len(matches) == 3 and all(0 <= m.score <= 1 for m in matches)


def test_bags_of_words_are_unordered_single_words(small_index):
    import pyarrow.parquet as pq

    bags = pq.read_table(small_index / "bags.parquet").to_pandas()
    assert list(bags.columns) == ["song", "word", "count"]
    assert bags["word"].str.fullmatch(r"[a-z0-9']+").all() and (bags["count"] > 0).all()
    for _, group in bags.groupby("song"):
        assert group["word"].tolist() == sorted(group["word"])  # alphabetical, never the lyric's order


@pytest.mark.parametrize("bad", ['x" onload="alert(1)', "4uLU6hMCjMI75M1A2tKUQ", "4uLU6hMCjMI75M1A2tKUQC/../..", ""])
def test_the_build_drops_spotify_ids_of_the_wrong_shape_from_every_source(bad):
    from scripts import build_index as b

    assert b.Record(title="t", artist="a", source="tidytuesday", spotify_id=bad).spotify_id is None
    good = b.Record(title="t", artist="a", source="musicoset", spotify_id="4uLU6hMCjMI75M1A2tKUQC")
    assert good.spotify_id == "4uLU6hMCjMI75M1A2tKUQC"


# -- genres and filters --------------------------------------------------------------------------------------------

def test_every_fine_genre_of_the_five_tables_has_a_family():
    import zipfile

    from pipeline import genres
    from tests.conftest import DATA_DIR

    with zipfile.ZipFile(DATA_DIR / "spotify_tracks_114k.zip") as archive:
        fine = set(pd.read_csv(archive.open("spotify_tracks_114k.csv"), usecols=["track_genre"]).track_genre.dropna())
    with zipfile.ZipFile(DATA_DIR / "tidytuesday_spotify_songs.zip") as archive:
        tidy = pd.read_csv(archive.open("spotify_songs.csv"), usecols=["playlist_genre", "playlist_subgenre"])
    fine |= set(tidy.playlist_genre) | set(tidy.playlist_subgenre)
    fine |= set(pd.read_csv(DATA_DIR / "tcc_ceds_music_partial.csv", usecols=["genre"]).genre)
    assert len(fine) == 139  # 114 + TidyTuesday's 6 genres and 24 subgenres + tcc's 7, less the shared names
    assert not [g for g in fine if genres.family_of(g) is None]
    assert 15 <= len(genres.families()) <= 25
    assert genres.families_for(["deep-house", "k-pop", "house"]) == ["east asian pop", "electronic"]


def test_the_slice_holds_rows_of_every_table_and_songs_keep_genres_and_families(catalog):
    from pipeline import genres

    songs = _table(catalog)
    sources = set(",".join(songs.sources).split(","))
    assert {"spotify_tracks", "tidytuesday", "musicoset", "tcc_ceds", "billboard_lyrics"} <= sources
    for fine, families in zip(songs.genres, songs.families):
        assert genres.split(families) == genres.families_for(genres.split(fine))
    assert (songs.genres.str.contains(", ")).any()  # some song is listed under several genres


@pytest.mark.parametrize("value, message", [
    ({"mood": "sad"}, "Unknown filter 'mood'"),
    ({"years": [1990, 1980]}, "runs backwards"),
    ({"years": 1985}, "must be a range"),
    ({"years": ["a", 1990]}, "filters.years must be"),
    ({"years": [1985.5, 1990]}, "whole number"),
    ({"popularity": [0, 140]}, "filters.popularity must be"),
    ({"genre": 7}, "genre name"),
    ("not json", "JSON object"),
    ([1, 2], "JSON object"),
])
def test_bad_filters_get_clear_messages(value, message):
    from pipeline.filters import Filters

    with pytest.raises(InputError, match=message):
        Filters.from_json(value)


def test_filters_read_json_text_objects_and_nothing_alike():
    from pipeline.filters import Filters

    assert Filters.from_json('{"genre": " Jazz ", "years": [1980, 1989]}') == Filters("jazz", (1980, 1989))
    assert Filters.from_json({"popularity": [0, 40]}).describe() == "popularity 0–40"
    assert not Filters.from_json(None).active and not Filters.from_json("").active and not Filters.from_json({}).active


def test_an_unknown_genre_names_the_families(catalog):
    with pytest.raises(InputError, match="Unknown genre 'polka'.*rock"):
        catalog.search_features({"valence": 0.5}, k=3, filters={"genre": "polka"})


def _passes(songs, filters) -> np.ndarray:
    from pipeline import genres

    mask = np.ones(len(songs), dtype=bool)
    if "genre" in filters:
        mask &= [filters["genre"] in genres.split(g) + genres.split(f) for g, f in zip(songs.genres, songs.families)]
    for column, key in (("year", "years"), ("popularity", "popularity")):
        if key in filters:
            values = songs[column].to_numpy(dtype=float, na_value=np.nan)
            with np.errstate(invalid="ignore"):
                mask &= (values >= filters[key][0]) & (values <= filters[key][1])
    return mask


def _reference_scores(catalog, keep, query: dict) -> np.ndarray:
    return reference_feature_scores(catalog.space, keep[list(FEATURES)].to_numpy(dtype=float), query)


def _brute_force(catalog, songs, query: dict, mask: np.ndarray, k: int) -> list[int]:
    keep = songs[mask & songs.has_features.to_numpy()]
    scores, ids = _reference_scores(catalog, keep, query), keep["id"].to_numpy()
    return ids[np.lexsort((ids, -scores))[:k]].tolist()


@pytest.mark.parametrize("filters", [
    {"genre": "pop"},  # a family: most of the slice passes (the scan of every row)
    {"genre": "electronic", "popularity": [20, 100]},
    {"years": [1970, 1989]},  # few pass: the scan of the passing rows only
    {"genre": "hip hop"},  # a fine genre (TidyTuesday's subgenre)
])
def test_filtered_feature_search_is_exact(catalog, filters):
    songs = _table(catalog)
    mask = _passes(songs, filters)
    assert 10 <= (mask & songs.has_features.to_numpy()).sum() < len(songs)
    query = songs[songs.has_features].iloc[7][list(FEATURES)].to_dict()
    found = catalog.search_features(query, k=10, filters=filters)
    assert [m.song_id for m in found] == _brute_force(catalog, songs, query, mask, 10)
    partial = {"valence": 0.2, "energy": 0.9, "tempo": 150.0}
    found = catalog.search_features(partial, k=10, filters=filters)
    assert [m.song_id for m in found] == _brute_force(catalog, songs, partial, mask, 10)
    assert all(mask[m.song_id] for m in found)


def test_the_mood_ranking_on_an_inverted_file_index_grows_its_candidates_until_exact(small_index, tmp_path,
                                                                                    monkeypatch):
    """Above the exact limit the candidates come nearest-first from the index; the ranking is final once the last
    kept score reaches the farthest candidate's similarity. Every list probed: the result must equal brute force."""
    from pipeline import catalog as catalog_module
    from pipeline import catalog_schema, vector_index

    copy = tmp_path / "ivf"
    shutil.copytree(small_index, copy)
    flat = vector_index.load(copy / catalog_schema.FEATURE_INDEX)
    ivf = vector_index.build(vector_index.all_vectors(flat), "l2", exact_limit=100, nprobe=10_000)
    assert not vector_index.is_exact(ivf)
    vector_index.save(ivf, copy / catalog_schema.FEATURE_INDEX)
    monkeypatch.setattr(catalog_module, "MOOD_CANDIDATES", 1)  # the first draw: k songs, too few to be final
    catalog = Catalog.load(copy, verify=False)
    songs = _table(catalog)
    moods = pd.read_csv(EVAL_DIR / "moods_dev.csv")
    for mood in ("happy", "calm"):
        query = moods[moods.mood == mood][[f for f in FEATURES if f in moods]].mean().to_dict()
        for filters in (None, {"genre": "pop"}):
            mask = _passes(songs, filters or {})
            found = catalog.search_features(query, k=10, filters=filters)
            assert [m.song_id for m in found] == _brute_force(catalog, songs, query, mask, 10), (mood, filters)


def test_every_list_holds_the_best_songs_that_pass(catalog):
    songs = _table(catalog)
    filters = {"genre": "rock"}
    mask = _passes(songs, filters)
    text = "love and tears on a rainy night"
    whole = catalog.search_lyrics(text, k=len(songs))
    expected = [m.song_id for m in whole if mask[m.song_id]][:5]
    assert len(expected) == 5
    assert [m.song_id for m in catalog.search_lyrics(text, k=5, filters=filters)] == expected
    by_features, by_lyrics, fused = catalog.recommend({"valence": 0.3, "energy": 0.4}, text, k=5, filters=filters)
    assert [m.song_id for m in by_lyrics] == expected
    assert len(by_features) == len(fused) == 5
    for match in by_features + by_lyrics + fused:
        assert "rock" in match.families and match.genres and match.genre == match.genres[0]
    assert catalog.filter_note(filters, 5) is None


def test_filters_that_leave_few_songs_return_them_all_with_a_note(catalog):
    songs = _table(catalog)
    years = songs.year.dropna().astype(int)
    # a genre and a span of years that leave a handful of songs with features
    for genre in ("rock", "pop", "r&b and soul", "hip-hop"):
        for year in sorted(years.unique()):
            filters = {"genre": genre, "years": [int(year), int(year) + 2], "popularity": [0, 100]}
            mask = _passes(songs, filters)
            few = int((mask & songs.has_features.to_numpy()).sum())
            if 1 <= few < 10:
                break
        else:
            continue
        break
    else:
        pytest.fail("no filter leaves between 1 and 9 songs in the slice")
    by_features, by_lyrics, fused = catalog.recommend({"valence": 0.5}, "summer love", k=10, filters=filters)
    assert len(by_features) == few and {m.song_id for m in by_features} == set(np.flatnonzero(
        mask & songs.has_features.to_numpy()).tolist())
    assert len(by_lyrics) == int((mask & songs.has_lyrics.to_numpy()).sum())
    assert all(mask[m.song_id] for m in fused)
    note = catalog.filter_note(filters, 10)
    assert note and f"{few:,} song" in note and "fewer than the 10" in note and genre in note
    nothing = {"genre": genre, "years": [1900, 1901]}
    assert catalog.recommend({"valence": 0.5}, "summer love", k=10, filters=nothing) == ([], [], [])
    assert "leave 0 songs" in catalog.filter_note(nothing, 10)


def test_a_song_of_unknown_year_or_popularity_does_not_pass_a_filter_on_it(catalog):
    songs = _table(catalog)
    found = catalog.search_features({"energy": 0.5}, k=50, filters={"years": [1900, 2100], "popularity": [0, 100]})
    assert found and all(m.year is not None and m.popularity is not None for m in found)
    assert songs.year.isna().any() and songs.popularity.isna().any()


def test_the_index_checks_a_filter_inside_its_scan_exact_and_inverted_file():
    from pipeline import vector_index

    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(3000, 14)).astype(np.float32)
    allowed = rng.random(3000) < 0.3
    query = vectors[7] + 0.01
    truth = np.flatnonzero(allowed)[np.argsort(np.sum((vectors[allowed] - query) ** 2, axis=1))[:10]]
    flat = vector_index.build(vectors, "l2")
    _, rows = vector_index.search(flat, query, 10, allowed=allowed)
    assert rows[0].tolist() == truth.tolist()
    ivf = vector_index.build(vectors, "l2", exact_limit=100, nprobe=10_000)  # every list probed: exact again
    assert not vector_index.is_exact(ivf)
    _, rows = vector_index.search(ivf, query, 10, allowed=allowed)
    assert rows[0].tolist() == truth.tolist()
    _, few = vector_index.search(flat, query, 10, allowed=np.arange(3000) < 4)
    assert sorted(r for r in few[0].tolist() if r >= 0) == [0, 1, 2, 3]  # fewer pass than asked: all of them


def test_an_inverted_file_index_probes_more_lists_when_asked():
    from pipeline import vector_index

    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(3000, 14)).astype(np.float32)
    ivf = vector_index.build(vectors, "l2", exact_limit=100, nprobe=1)
    queries = vectors[:40] + 0.3 * rng.normal(size=(40, 14)).astype(np.float32)
    truth = np.argsort(((queries[:, None, :] - vectors[None]) ** 2).sum(-1), axis=1)[:, :10]

    def recall(**options):
        found = [vector_index.search(ivf, q, 10, **options)[1][0] for q in queries]
        return np.mean([len(set(f.tolist()) & set(t.tolist())) / 10 for f, t in zip(found, truth)])

    assert recall() < 0.9 and recall(probe_factor=ivf.nlist) == 1.0  # every list probed: exact
    allowed = rng.random(3000) < 0.5
    _, rows = vector_index.search(ivf, queries[0], 10, allowed=allowed, probe_factor=ivf.nlist)
    nearest = np.argsort(((vectors[allowed] - queries[0]) ** 2).sum(1))[:10]
    assert rows[0].tolist() == np.flatnonzero(allowed)[nearest].tolist()
    assert ivf.nprobe == 1  # the index itself is left as it was


def test_embeddings_are_cached_per_text_whatever_the_order(tmp_path):
    from types import SimpleNamespace

    from pipeline.embedder import encode_cached

    class Counting:
        info = SimpleNamespace(model_id="m", revision="r", dimension=3)
        seen: list[str] = []

        def encode(self, texts, show_progress=False):
            self.seen.extend(texts)
            return np.array([[len(t), t.count("a"), 1.0] for t in texts], dtype=np.float32)

    embedder = Counting()
    first = encode_cached(embedder, ["a cat", "a dog", "rain"], tmp_path)
    again = encode_cached(embedder, ["rain", "new text", "a cat", "rain"], tmp_path)  # reordered, one new
    assert embedder.seen == ["a cat", "a dog", "rain", "new text"]
    assert again.tolist() == [first[2].tolist(), [8, 0, 1], first[0].tolist(), first[2].tolist()]
    # a cache file of the older kind (one whole list, in order) is taken into the store, not embedded again
    import hashlib

    legacy = ["old one", "old two"]
    digest = hashlib.sha256("\n".join(["m", "r", *legacy]).encode()).hexdigest()[:24]
    (tmp_path / "old").mkdir()
    np.save(tmp_path / "old" / f"{digest}.npy", np.array([[9, 9, 9], [8, 8, 8]], dtype=np.float32))
    embedder.seen.clear()
    assert encode_cached(embedder, legacy, tmp_path / "old").tolist() == [[9, 9, 9], [8, 8, 8]]
    assert encode_cached(embedder, legacy[::-1], tmp_path / "old").tolist() == [[8, 8, 8], [9, 9, 9]]
    assert embedder.seen == []


def test_a_feature_outside_its_range_is_a_placeholder_not_a_measurement():
    """The Spotify Tracks Dataset writes time signature 0 for unknown: the build drops it (then imputes it, flagged),
    so every song of the catalog is a valid query for the feature search."""
    from scripts import build_index as b

    record = b.Record(title="t", artist="a", source="spotify_tracks",
                      features={"time_signature": 0.0, "tempo": 120.0, "loudness": -80.0})
    assert record.features == {"tempo": 120.0}


def test_the_embedder_gives_what_sentence_transformers_gives(embedder):
    # the app runs all-MiniLM-L6-v2 on transformers directly (no sentence_transformers import at start); the
    # catalog was built, and is checked, against sentence_transformers' vectors
    from sentence_transformers import SentenceTransformer

    texts = ["a couple holding hands at sunset", "  rain on the window  ", "", "la " * 400,
             "dancing all night long under the city lights", "Ich vermisse dich jede Nacht"]
    reference = SentenceTransformer(embedder.info.path, device="cpu").encode(
        texts, batch_size=4, normalize_embeddings=True, convert_to_numpy=True)
    ours = embedder.encode(texts, batch_size=4)
    assert type(embedder._model).__module__ == "pipeline.embedder"  # the fast path, not the fallback
    assert ours.shape == reference.shape == (len(texts), 384)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_an_embedder_folder_of_another_kind_goes_to_sentence_transformers(embedder, tmp_path):
    from pipeline.embedder import SentenceEmbedder

    folder = tmp_path / "lower"
    shutil.copytree(embedder.info.path, folder)
    config = json.loads((folder / "sentence_bert_config.json").read_text())
    (folder / "sentence_bert_config.json").write_text(json.dumps({**config, "do_lower_case": True}))
    lowered = SentenceEmbedder(folder, "m", "r")
    assert type(lowered._model).__name__ == "SentenceTransformer"  # lower-casing is not what the fast path does
    np.testing.assert_allclose(lowered.encode(["RAIN ON THE WINDOW"]), embedder.encode(["rain on the window"]),
                               atol=1e-5)


def test_the_build_writes_titles_without_a_capital_after_an_apostrophe(small_index):
    """The title-cased sources (Billboard lyrics, the TCC set) went through str.title(), which wrote "Don'T"."""
    songs = pd.read_parquet(small_index / "songs.parquet", columns=["title", "artist"])
    contraction = re.compile(r"[a-z]'(S|T|D|M|Ll|Re|Ve)\b|\bI'(D|M|Ll|Ve)\b")
    assert songs.title.str.contains("'").sum() > 10  # the slice has names with apostrophes to check
    assert not [t for t in songs.title if contraction.search(t)]
    assert not [a for a in songs.artist if contraction.search(a)]
