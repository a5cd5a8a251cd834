"""Build the shipped song catalog (`index/`) from raw song tables.

    python scripts/build_index.py                          # ../shared/data (five tables) → index/
    python scripts/build_index.py --data-dir DIR --out DIR
    python scripts/build_index.py --table my_songs.csv     # add your own table (see README: "Rebuild the catalog")
    python scripts/build_index.py --hub-dataset user/songs --no-default-sources
    HF_TOKEN=... python scripts/build_index.py --push-to-hub user/songs   # publish; the app reads I2M_CATALOG

Steps: read every source into one schema → de-duplicate by Spotify id, then by normalised artist + title (with the
first credited artist as fallback; a song keeps every fine genre it is listed under, and their families from
`pipeline/genre_families.json`) → impute and flag a missing time signature → cut lyrics into stanza-sized
passages and embed them with all-MiniLM-L6-v2 → per-song bags of words (unordered single words with counts),
keywords, and lyric-topic profiles learned from the tcc_ceds topic labels → write parquet / FAISS / npy files and a
manifest with checksums (the contract is `pipeline/catalog_schema.py`). Never lyric text. Output is deterministic:
the same inputs give the same bytes. Passage embeddings are cached per text (`I2M_CACHE_DIR`/embeddings), so a
rebuild embeds only passages it has not seen, even when a new source reorders every song.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import math
import re
import sys
import time
import unicodedata
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pipeline import catalog_schema as schema  # noqa: E402
from pipeline import genres as vocabulary  # noqa: E402
from pipeline import recommend, vector_index  # noqa: E402
from pipeline.catalog_schema import SCHEMA_VERSION, file_sha256  # noqa: E402
from pipeline.features import FEATURES, RANGES, FeatureSpace  # noqa: E402

BUILDER_VERSION = "3.0"
PASSAGE_WORDS = 40
MIN_LYRIC_WORDS = 12
KEYWORDS_PER_SONG = 8
LYRIC_STORAGE = "sq8"  # 8 bits per dimension: 17 MB for 45k passages, recall@10 0.99 against fp32
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"

SONG_COLUMNS = ["id", "title", "artist", "year", "genres", "families", "popularity", "spotify_id", *FEATURES,
                "time_signature_imputed", "sources", "has_features", "has_lyrics", "keywords", "themes"]

# Lyric topics: the `topic` labels of the tcc_ceds table (CC BY 4.0): name → (shown as, description written from
# the name). The build appends each topic's most telling lyric words, measured on the labelled songs, and embeds
# the result as the topic's prototype: a caption is compared with these to find the topics it asks for.
TOPICS = {
    "feelings": ("feelings", "feelings, emotions, the heart, what I feel inside, touch, tenderness"),
    "music": ("music", "music, songs, singing, dancing to the band, rhythm, beat"),
    "night/time": ("night and time", "night, moon, stars, time passing, midnight, dreams until morning"),
    "obscene": ("explicit", "sex, money, drugs, bitches, swearing, gangsters, guns in the street"),
    "romantic": ("romance", "romance, love, kisses, my darling, holding you tight forever"),
    "sadness": ("sadness", "sadness, tears, crying, pain, a broken heart, loneliness, death"),
    "violence": ("violence", "violence, war, fighting, blood, killing, fire, destruction"),
    "world/life": ("life and the world", "the world, life, work, people, the struggle of living, land, years"),
}
TOPIC_WORDS = 12  # telling words appended to each topic's description
TOPIC_MIN_SONGS = 20  # a telling word is used by at least this many labelled songs
TOPIC_FOLDS = 5
TOPIC_RIDGE = 1.0

SOURCE_CREDITS = {
    "tidytuesday": {"title": "TidyTuesday 2020-01-21 'Spotify songs' (spotifyr)", "licence": "CC0-1.0",
                    "url": "https://github.com/rfordatascience/tidytuesday/tree/master/data/2020/2020-01-21"},
    "musicoset": {"title": "MusicOSet (Silva, Oliveira & Moro, SBBD 2019)", "licence": "CC BY 4.0 (dataset terms)",
                  "url": "https://marianaossilva.github.io/DSW2019/"},
    "billboard_lyrics": {"title": "50 Years of Pop Music Lyrics (Billboard year-end Hot 100, 1965-2015)",
                         "licence": "No licence; lyrics copyrighted: only embeddings and keywords are kept",
                         "url": "https://github.com/walkerkq/musiclyrics"},
    "tcc_ceds": {"title": "Music Dataset: 1950 to 2019 (Moura et al., Mendeley Data, 2020)",
                 "licence": "CC BY 4.0", "url": "https://data.mendeley.com/datasets/3t9vbwxgr5/3"},
    # the Hugging Face card says BSD, the Kaggle page (DOI 10.34740/KAGGLE/DSV/4372070) ODbL: the stricter holds
    "spotify_tracks": {"title": "Spotify Tracks Dataset (M. Pandya, 2022)",
                       "licence": "ODbL 1.0 (credited; the catalog built from it is a database under ODbL)",
                       "url": "https://huggingface.co/datasets/maharshipandya/spotify-tracks-dataset"},
}

# Words a family audience would not want in a keyword list.
_BLOCKED = set("""fuck fucking fucked fucker motherfucker motherfuckin shit bitch bitches nigga niggas nigger pussy dick
cock cunt whore hoe hoes ass asshole damn bastard slut""".split())


# -- normalisation ------------------------------------------------------------------------------------------------

_BRACKETS = re.compile(r"\([^)]*\)|\[[^\]]*\]|\{[^}]*\}")
_FEAT = re.compile(r"\s(feat\.?|ft\.?|featuring|with)\s.*$")
_DASH_SUFFIX = re.compile(r"\s+-\s+.*$")
_FIRST_ARTIST_SPLIT = re.compile(r"\s*(?:,|&|\band\b|\bx\b|\bvs\.?\b|\bfeat\.?\b|\bft\.?\b|\bfeaturing\b|\bwith\b|/|;)\s*")


def _fold(text: str) -> str:
    """Lower case with Latin letters folded to ASCII ('Beyoncé' → 'beyonce'; a Latin letter with no ASCII form is
    dropped) and other scripts kept: a Chinese, Japanese or Cyrillic title is a key of its own, not an empty one."""
    text = str(text)
    if text.isascii():  # most names; NFKD leaves ASCII as it is
        return text.lower()
    decomposed = unicodedata.normalize("NFKD", text).lower()
    return "".join(ch for ch in decomposed if ch.isascii() or (
        not unicodedata.combining(ch) and not unicodedata.name(ch, "LATIN").startswith("LATIN")))


def _key_chars(text: str) -> str:
    if text.isascii():
        return _NOT_ASCII_KEY.sub("", text)
    return "".join(ch for ch in text if ch.isalnum() and (not ch.isascii() or ch in _ASCII_KEY))


_ASCII_KEY = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_NOT_ASCII_KEY = re.compile(r"[^a-z0-9]+")


def normalize_title(title: str) -> str:
    """'Crazy (Remastered 2011) - Radio Edit' → 'crazy'. Used only as a de-duplication key."""
    text = _fold(title)
    text = _BRACKETS.sub(" ", text)
    text = _DASH_SUFFIX.sub("", text)
    text = _FEAT.sub("", " " + text).strip()
    text = re.sub(r"^the\s+", "", text.replace("&", " and "))
    return _key_chars(text)


def normalize_artist(artist: str) -> str:
    text = _fold(artist)
    text = _BRACKETS.sub(" ", text)
    text = _FEAT.sub("", " " + text).strip()
    text = re.sub(r"^the\s+", "", text.replace("&", " and "))
    return _key_chars(text)


def first_artist(artist: str) -> str:
    parts = [p for p in _FIRST_ARTIST_SPLIT.split(_fold(artist)) if p and p.strip()]
    return normalize_artist(parts[0]) if parts else normalize_artist(artist)


def song_keys(artist: str, title: str) -> list[str]:
    """Keys under which two records count as the same song: full artist, then first credited artist."""
    t = normalize_title(title)
    if not t:
        return []
    keys = [f"{normalize_artist(artist)}|{t}"]
    fa = f"{first_artist(artist)}|{t}"
    if fa not in keys:
        keys.append(fa)
    return [k for k in keys if not k.startswith("|")]


# -- reading sources ------------------------------------------------------------------------------------------------

@dataclass
class Record:
    title: str
    artist: str
    source: str
    spotify_id: str | None = None
    year: int | None = None
    genres: tuple[str, ...] = ()  # fine genres as the source names them, the most telling first
    popularity: float | None = None
    features: dict | None = None  # name → value in Spotify units; absent names are missing
    lyrics: str | None = None
    lyrics_source: str | None = None
    topic: str | None = None  # the tcc_ceds topic label of the lyrics

    def __post_init__(self):
        # every source alike: an id that is not Spotify's shape is dropped here, not trusted downstream
        self.spotify_id = schema.spotify_id(self.spotify_id)
        self.genres = tuple(dict.fromkeys(g for g in map(vocabulary.fine_genre, self.genres) if g))
        # a value outside a feature's range is a placeholder (the Spotify Tracks Dataset writes time signature 0 for
        # "unknown"), not a measurement: it is dropped, so the song is imputed and flagged or left without it, and
        # every catalog song stays a valid query
        if self.features:
            self.features = {name: value for name, value in self.features.items()
                             if RANGES[name][0] <= value <= RANGES[name][1]}


def _year(value) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    match = re.match(r"(\d{4})", str(value))
    if not match:
        return None
    year = int(match.group(1))
    return year if 1900 <= year <= 2100 else None


def _num(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def read_tidytuesday(path: Path) -> list[Record]:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".csv"))
        table = pd.read_csv(archive.open(name), dtype={"track_id": str})
    table = table.dropna(subset=["track_id", "track_name", "track_artist"])
    # the same track appears under several playlists: it keeps every playlist genre (most common first), then
    # every subgenre
    # (one pass over plain columns: a pandas group per track took half a minute)
    counts: dict[str, tuple[Counter, Counter]] = {}
    for track, genre, subgenre in zip(table.track_id, table.playlist_genre, table.playlist_subgenre):
        by_genre, by_subgenre = counts.setdefault(track, (Counter(), Counter()))
        if pd.notna(genre):
            by_genre[genre] += 1
        if pd.notna(subgenre):
            by_subgenre[subgenre] += 1
    genres = {track: tuple(g for counter in pair for g, _ in counter.most_common()) for track, pair in counts.items()}
    table = table.drop_duplicates("track_id", keep="first")
    records = []
    for row in table.itertuples(index=False):
        feats = {f: _num(getattr(row, f)) for f in FEATURES if f != "time_signature"}
        records.append(Record(title=str(row.track_name), artist=str(row.track_artist), source="tidytuesday",
                              spotify_id=row.track_id, year=_year(row.track_album_release_date),
                              genres=genres[row.track_id], popularity=_num(row.track_popularity),
                              features={k: v for k, v in feats.items() if v is not None}))
    return records


def read_musicoset(folder: Path) -> list[Record]:
    songs = pd.read_csv(folder / "songs.csv", sep="\t", dtype={"song_id": str})
    feats = pd.read_csv(folder / "acoustic_features.csv", sep="\t", dtype={"song_id": str})
    tracks = pd.read_csv(folder / "tracks.csv", sep="\t", dtype={"song_id": str})
    table = songs.merge(feats, on="song_id", how="inner").merge(
        tracks[["song_id", "release_date"]], on="song_id", how="left")
    records = []
    for row in table.itertuples(index=False):
        try:
            artists = ast.literal_eval(row.artists) if isinstance(row.artists, str) else {}
            names = list(artists.values()) if isinstance(artists, dict) else []
        except (ValueError, SyntaxError):
            names = []
        if not names:
            try:
                names = [ast.literal_eval(row.billboard)[1]]
            except (ValueError, SyntaxError, IndexError, TypeError):
                continue
        values = {f: _num(getattr(row, f)) for f in FEATURES}
        records.append(Record(title=str(row.song_name), artist=", ".join(str(n) for n in names), source="musicoset",
                              spotify_id=row.song_id, year=_year(row.release_date),
                              popularity=_num(row.popularity),
                              features={k: v for k, v in values.items() if v is not None}))
    return records


def read_spotify_tracks(path: Path) -> list[Record]:
    """The Spotify Tracks Dataset: all 13 features and popularity, no release date; a track listed under several
    genres appears once per genre (one row each), and keeps them all, in the file's order."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".csv"))
        table = pd.read_csv(archive.open(name), dtype={"track_id": str})
    table = table.dropna(subset=["track_id", "track_name", "artists"])
    genres: dict[str, list] = {}
    for track, genre in zip(table.track_id, table.track_genre):
        listed = genres.setdefault(track, [])
        if pd.notna(genre):
            listed.append(genre)
    table = table.drop_duplicates("track_id", keep="first")
    records = []
    for row in table.itertuples(index=False):
        feats = {f: _num(getattr(row, f)) for f in FEATURES}
        records.append(Record(title=str(row.track_name), artist=", ".join(str(row.artists).split(";")),
                              source="spotify_tracks", spotify_id=row.track_id, genres=tuple(genres[row.track_id]),
                              popularity=_num(row.popularity),
                              features={k: v for k, v in feats.items() if v is not None}))
    return records


def read_billboard_lyrics(path: Path) -> list[Record]:
    table = pd.read_excel(path)
    records = []
    for row in table.itertuples(index=False):
        lyrics = row.Lyrics if isinstance(row.Lyrics, str) else None
        records.append(Record(title=schema.tidy_name(str(row.Song).title()),
                              artist=schema.tidy_name(str(row.Artist).title()),
                              source="billboard_lyrics", year=_year(row.Year), lyrics=lyrics,
                              lyrics_source="billboard_lyrics"))
    return records


def read_tcc_ceds(path: Path) -> list[Record]:
    table = pd.read_csv(path)
    records = []
    for row in table.itertuples(index=False):
        # min-max scaled in the source; the 0-1 features keep their meaning, loudness (scaled dB) does not
        feats = {f: _num(getattr(row, f)) for f in ("danceability", "acousticness", "instrumentalness",
                                                    "valence", "energy")}
        records.append(Record(title=schema.tidy_name(str(row.track_name).title()),
                              artist=schema.tidy_name(str(row.artist_name).title()),
                              source="tcc_ceds", year=_year(row.release_date), genres=(row.genre,),
                              features={k: v for k, v in feats.items() if v is not None},
                              lyrics=row.lyrics if isinstance(row.lyrics, str) else None, lyrics_source="tcc_ceds",
                              topic=row.topic if isinstance(row.topic, str) else None))
    return records


_ALIASES = {
    "title": ("title", "track_name", "song", "song_name", "name"),
    "artist": ("artist", "track_artist", "artist_name", "artists"),
    "spotify_id": ("spotify_id", "track_id", "id", "song_id"),
    "year": ("year", "release_date", "track_album_release_date", "album_release_date"),
    "genre": ("genre", "playlist_genre", "track_genre"),
    "popularity": ("popularity", "track_popularity"),
    "lyrics": ("lyrics", "lyric", "text"),
}


def records_from_table(table: pd.DataFrame, source: str) -> list[Record]:
    """Any table with a title and artist column (names as in `_ALIASES`), optional features and lyrics."""
    lowered = {c.lower(): c for c in table.columns}

    def column(key):
        return next((lowered[a] for a in _ALIASES[key] if a in lowered), None)

    title_col, artist_col = column("title"), column("artist")
    if not title_col or not artist_col:
        raise SystemExit(f"{source}: needs a title column ({', '.join(_ALIASES['title'])}) and an artist column "
                         f"({', '.join(_ALIASES['artist'])}); found {', '.join(table.columns)}")
    cols = {k: column(k) for k in _ALIASES}
    feature_cols = {f: lowered[f] for f in FEATURES if f in lowered}
    records = []
    for row in table.to_dict("records"):
        spotify = row.get(cols["spotify_id"]) if cols["spotify_id"] else None
        feats = {f: _num(row[c]) for f, c in feature_cols.items()}
        lyrics = (row.get(cols["lyrics"]) or None) if cols["lyrics"] else None
        records.append(Record(title=str(row[title_col]), artist=str(row[artist_col]), source=source,
                              spotify_id=spotify, year=_year(row.get(cols["year"])) if cols["year"] else None,
                              genres=(row[cols["genre"]],) if cols["genre"] else (),
                              popularity=_num(row.get(cols["popularity"])) if cols["popularity"] else None,
                              features={k: v for k, v in feats.items() if v is not None},
                              lyrics=lyrics if isinstance(lyrics, str) else None,
                              lyrics_source=source if isinstance(lyrics, str) else None))
    return records


def read_table_file(path: Path) -> list[Record]:
    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
    elif path.suffix in (".tsv", ".tab"):
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    else:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)  # ids stay text; numbers are parsed per field
    return records_from_table(table, source=path.stem)


def read_hub_dataset(name: str, split: str) -> list[Record]:
    from datasets import load_dataset

    dataset = load_dataset(name, split=split)
    return records_from_table(dataset.to_pandas(), source=name.replace("/", "__"))


# -- merging ----------------------------------------------------------------------------------------------------

SOURCE_PRIORITY = {"musicoset": 0, "tidytuesday": 1}  # whose features win when two records merge


@dataclass
class Song:
    title: str
    artist: str
    spotify_id: str | None
    year: int | None
    genres: list[str]
    popularity: float | None
    features: dict
    feature_source_rank: int
    sources: set
    lyrics: str | None = None
    lyrics_source: str | None = None
    topic: str | None = None


def _rank(source: str) -> int:
    return SOURCE_PRIORITY.get(source, 5 if source == "tcc_ceds" else 2)


def merge_records(records: Iterable[Record]) -> list[Song]:
    """De-duplicate: first by Spotify id, then by normalised artist + title (full, then first credited artist)."""
    songs: list[Song] = []
    by_spotify: dict[str, int] = {}
    by_key: dict[str, int] = {}

    def absorb(index: int, rec: Record) -> None:
        song = songs[index]
        song.sources.add(rec.source)
        if rec.features:
            full = len(rec.features) > len(song.features) or (
                len(rec.features) == len(song.features) and _rank(rec.source) < song.feature_source_rank)
            if full:
                song.features = dict(rec.features)
                song.feature_source_rank = _rank(rec.source)
            else:
                for k, v in rec.features.items():
                    song.features.setdefault(k, v)
        song.spotify_id = song.spotify_id or rec.spotify_id
        song.year = min(y for y in (song.year, rec.year) if y) if (song.year or rec.year) else None
        song.genres.extend(g for g in rec.genres if g not in song.genres)
        song.topic = song.topic or rec.topic
        song.popularity = max(p for p in (song.popularity, rec.popularity) if p is not None) \
            if (song.popularity is not None or rec.popularity is not None) else None
        if rec.lyrics and (not song.lyrics or (rec.lyrics_source == "billboard_lyrics"
                                               and song.lyrics_source != "billboard_lyrics")):
            song.lyrics, song.lyrics_source = rec.lyrics, rec.lyrics_source

    # records carrying Spotify ids first, so name-only records (lyrics tables) attach to them
    ordered = sorted(records, key=lambda r: (r.spotify_id is None, _rank(r.source)))
    for rec in ordered:
        keys = song_keys(rec.artist, rec.title)
        if not keys:
            continue
        index = by_spotify.get(rec.spotify_id) if rec.spotify_id else None
        if index is None:
            index = next((by_key[k] for k in keys if k in by_key), None)
        if index is None:
            songs.append(Song(title=rec.title.strip(), artist=rec.artist.strip(), spotify_id=rec.spotify_id,
                              year=rec.year, genres=list(rec.genres), popularity=rec.popularity,
                              features=dict(rec.features or {}), feature_source_rank=_rank(rec.source),
                              sources={rec.source}, lyrics=rec.lyrics, lyrics_source=rec.lyrics_source,
                              topic=rec.topic))
            index = len(songs) - 1
        else:
            absorb(index, rec)
        if rec.spotify_id:
            by_spotify.setdefault(rec.spotify_id, index)
        for k in keys:
            by_key.setdefault(k, index)
    return songs


# -- lyrics → passages, keywords ----------------------------------------------------------------------------------

def passages(text: str, size: int = PASSAGE_WORDS) -> list[str]:
    """Stanza-sized windows of `size` words; a short tail joins the previous window; repeats (choruses) once."""
    words = schema.words(text)
    if len(words) < MIN_LYRIC_WORDS:
        return []
    chunks = [words[i:i + size] for i in range(0, len(words), size)]
    if len(chunks) > 1 and len(chunks[-1]) < size // 2:
        chunks[-2].extend(chunks.pop())
    seen, out = set(), []
    for chunk in chunks:
        joined = " ".join(chunk)
        if joined not in seen:
            seen.add(joined)
            out.append(joined)
    return out


def keywords_by_song(lyrics: list[list[str]], limit: int = KEYWORDS_PER_SONG, min_songs: int = 3) -> list[list[str]]:
    """Top TF-IDF words per song, ordered by score, never by position in the lyric.

    Only plain words (3-12 letters, no stop words or slurs) used by at least `min_songs` songs: one-off tokens are
    mostly transcription debris, such as words glued together where a line break was lost."""
    docs = [[w for w in words if 3 <= len(w) <= 12 and w.isalpha() and w not in recommend.STOPWORDS and w not in _BLOCKED
             and "chorus" not in w and "verse" not in w] for words in lyrics]
    df = Counter(w for doc in docs for w in set(doc))
    n = max(1, len(docs))
    out = []
    for doc in docs:
        tf = Counter(w for w in doc if df[w] >= min(min_songs, n))
        scored = sorted(tf, key=lambda w: (-(1 + math.log(tf[w])) * math.log((1 + n) / (1 + df[w])), w))
        out.append(scored[:limit])
    return out


# -- build --------------------------------------------------------------------------------------------------------

def _progress(message: str) -> None:
    print(f"[build_index] {message}", flush=True)


def impute_time_signature(features: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Missing time signatures take the catalog's most common one (4/4); the flag column says where."""
    ts = features["time_signature"]
    mode = float(ts.dropna().mode().iloc[0]) if ts.notna().any() else 4.0
    imputed = ts.isna() & features.drop(columns=["time_signature"]).notna().all(axis=1)
    return ts.where(~imputed, mode), imputed


def build_songs_table(songs: list[Song]) -> tuple[pd.DataFrame, list[Song]]:
    songs = sorted(songs, key=lambda s: (normalize_artist(s.artist), normalize_title(s.title), s.spotify_id or "",
                                         s.title, s.artist))
    rows = []
    for i, s in enumerate(songs):
        row = {"id": i, "title": s.title, "artist": s.artist, "year": s.year, "genres": vocabulary.join(s.genres),
               "families": vocabulary.join(vocabulary.families_for(s.genres)),
               "popularity": s.popularity, "spotify_id": s.spotify_id or "",
               "sources": ",".join(sorted(s.sources))}
        row.update({f: s.features.get(f) for f in FEATURES})
        rows.append(row)
    table = pd.DataFrame(rows)
    for f in FEATURES:
        table[f] = pd.to_numeric(table[f], errors="coerce").astype("float64")
    table["time_signature"], table["time_signature_imputed"] = impute_time_signature(table[list(FEATURES)])
    table["has_features"] = table[list(FEATURES)].notna().all(axis=1)
    table["year"] = table["year"].astype("Int32")
    table["popularity"] = pd.to_numeric(table["popularity"], errors="coerce").astype("float32")
    table["id"] = table["id"].astype("int32")
    return table, songs


def _write_parquet(table: pd.DataFrame, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table, preserve_index=False).replace_schema_metadata(None)
    pq.write_table(arrow, path, compression="zstd", write_statistics=False, store_schema=False)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# Query-like texts (captions and moods, as the app sends) used to measure chance-level lyric similarity.
CALIBRATION_QUERIES = (
    "a dog running on the beach at sunset", "a city street at night with neon lights", "a bowl of fruit on a table",
    "children playing in a park", "snowy mountains under a blue sky", "an old man reading a newspaper",
    "a crowded concert with colorful lights", "a cat sleeping on a sofa", "rain on a window, grey and quiet",
    "a field of sunflowers in summer", "a busy kitchen in a restaurant", "two friends laughing over coffee",
    "a lonely road through the desert", "fireworks over a river", "a wedding couple dancing",
    "a foggy forest in the morning", "a skateboarder in an empty parking lot", "a sailboat on a calm lake",
    "joyful, energetic, upbeat", "calm, peaceful, gentle", "sad, melancholic, slow", "tense, dark, dramatic",
    "a birthday party with balloons", "a train station at rush hour", "waves crashing on rocks",
    "a garden full of flowers and bees", "a soldier standing in the rain", "a family dinner at home",
    "a neon sign in a dark alley", "an empty classroom with sunlight", "a horse galloping across a field",
    "a couple walking hand in hand", "a storm over the ocean", "a lighthouse at dusk",
)


def song_means(vectors: np.ndarray, passage_song: np.ndarray, n_songs: int) -> np.ndarray:
    """(n_songs, d) normalised mean passage vector per song (zeros where a song has no lyrics)."""
    sums = np.zeros((n_songs, vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, passage_song, vectors)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return sums / np.where(norms > 0, norms, 1.0)


def _ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    xb = np.hstack([x, np.ones((len(x), 1))])
    a = xb.T @ xb + lam * np.diag(np.r_[np.ones(x.shape[1]), 0.0])
    return np.linalg.solve(a, xb.T @ y)


def _apply(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((len(x), 1))]) @ weights


def topic_profiles(means: np.ndarray, has_lyrics: np.ndarray, labels: list[str | None],
                   names: list[str]) -> np.ndarray:
    """Each song's lyric-topic profile, predicted from its mean passage vector by ridge regression on the labelled
    songs' one-hot topics. Labelled songs get out-of-fold predictions, so no song is scored by a model that saw
    its own label."""
    profiles = np.zeros((len(means), len(names)), dtype=np.float64)
    labelled = np.array([i for i, t in enumerate(labels) if t in names and has_lyrics[i]], dtype=np.int64)
    if len(labelled) < 2 * TOPIC_FOLDS:
        return profiles.astype(np.float16)
    y = np.zeros((len(labelled), len(names)))
    y[np.arange(len(labelled)), [names.index(labels[i]) for i in labelled]] = 1.0
    lyric_rows = np.flatnonzero(has_lyrics)
    profiles[lyric_rows] = _apply(_ridge(means[labelled], y, TOPIC_RIDGE), means[lyric_rows])
    fold = np.arange(len(labelled)) % TOPIC_FOLDS
    for f in range(TOPIC_FOLDS):
        weights = _ridge(means[labelled[fold != f]], y[fold != f], TOPIC_RIDGE)
        profiles[labelled[fold == f]] = _apply(weights, means[labelled[fold == f]])
    return np.clip(profiles, 0.0, 1.0).astype(np.float16)


def telling_words(bags: dict[int, Counter], labels: list[str | None], names: list[str]) -> dict[str, list[str]]:
    """Per topic, the words whose share of labelled songs using them most exceeds their share elsewhere (log-odds)."""
    labelled = [i for i in sorted(bags) if labels[i] in names]
    df_all: Counter = Counter(w for i in labelled for w in bags[i])
    out = {}
    for name in names:
        inside = [i for i in labelled if labels[i] == name]
        df_in: Counter = Counter(w for i in inside for w in bags[i])
        n_in, n_out = len(inside), len(labelled) - len(inside)

        def log_odds(word: str) -> float:
            p1 = (df_in[word] + 1) / (n_in + 2)
            p0 = (df_all[word] - df_in[word] + 1) / (n_out + 2)
            return math.log(p1 / (1 - p1)) - math.log(p0 / (1 - p0))

        candidates = [w for w, n in df_all.items() if n >= TOPIC_MIN_SONGS and w not in _BLOCKED and len(w) >= 3]
        out[name] = sorted(candidates, key=lambda w: (-log_odds(w), w))[:TOPIC_WORDS]
    return out


def bags_table(bags: dict[int, Counter]) -> pd.DataFrame:
    """(song, word, count) sorted by song then word: which words a song uses and how often, never in what order."""
    rows = [(song, word, min(count, 32767)) for song in sorted(bags) for word, count in sorted(bags[song].items())]
    table = pd.DataFrame(rows, columns=["song", "word", "count"])
    return table.astype({"song": "int32", "word": "string", "count": "int16"})


def build(args: argparse.Namespace) -> dict:
    started = time.time()
    data = Path(args.data_dir)
    records: list[Record] = []
    used_sources = []
    if not args.no_default_sources:
        readers = [("tidytuesday", data / "tidytuesday_spotify_songs.zip", read_tidytuesday),
                   ("musicoset", data / "musicoset", read_musicoset),
                   ("spotify_tracks", data / "spotify_tracks_114k.zip", read_spotify_tracks),
                   ("billboard_lyrics", data / "billboard_lyrics_1964-2015.xlsx", read_billboard_lyrics),
                   ("tcc_ceds", data / "tcc_ceds_music_partial.csv", read_tcc_ceds)]
        for name, path, reader in readers:
            if not path.exists():
                raise SystemExit(f"Missing source {path}. Pass --data-dir, or --no-default-sources with --table.")
            part = reader(path)
            _progress(f"read {name}: {len(part):,} rows")
            records += part
            used_sources.append({"name": name, "file": path.name, "rows": len(part), **SOURCE_CREDITS[name]})
    for table_path in args.table or []:
        part = read_table_file(Path(table_path))
        _progress(f"read {table_path}: {len(part):,} rows")
        records += part
        used_sources.append({"name": Path(table_path).stem, "file": Path(table_path).name, "rows": len(part)})
    if args.hub_dataset:
        part = read_hub_dataset(args.hub_dataset, args.hub_split)
        _progress(f"read Hub dataset {args.hub_dataset}: {len(part):,} rows")
        records += part
        used_sources.append({"name": args.hub_dataset, "file": f"hf://datasets/{args.hub_dataset}", "rows": len(part)})
    if not records:
        raise SystemExit("No input rows.")

    songs = merge_records(records)
    _progress(f"merged into {len(songs):,} unique songs")
    if args.limit_songs:
        # a small, deterministic slice for tests: songs with lyrics first, then the rest
        rng = np.random.default_rng(0)
        order = rng.permutation(len(songs))
        with_lyrics = [songs[i] for i in order if songs[i].lyrics][: args.limit_songs // 4]
        others = [songs[i] for i in order if not songs[i].lyrics][: args.limit_songs - len(with_lyrics)]
        songs = with_lyrics + others
    table, songs = build_songs_table(songs)

    # lyrics → passages
    passage_texts, passage_song, lyric_word_lists = [], [], {}
    for i, song in enumerate(songs):
        if not song.lyrics:
            continue
        parts = passages(song.lyrics)
        if args.max_passages_per_song:
            parts = parts[: args.max_passages_per_song]
        if parts:
            lyric_word_lists[i] = schema.words(song.lyrics)
            passage_texts += parts
            passage_song += [i] * len(parts)
    passage_song = np.asarray(passage_song, dtype=np.int32)
    table["has_lyrics"] = False
    table.loc[sorted(lyric_word_lists), "has_lyrics"] = True
    _progress(f"{len(passage_texts):,} lyric passages from {len(lyric_word_lists):,} songs")

    # keywords and bags of words (derived single words, never lyric text in order)
    ids = sorted(lyric_word_lists)
    keywords = dict(zip(ids, keywords_by_song([lyric_word_lists[i] for i in ids])))
    table["keywords"] = [", ".join(keywords.get(i, [])) for i in range(len(table))]
    bags = {i: Counter(recommend.bag_words(" ".join(lyric_word_lists[i]))) for i in ids}
    del lyric_word_lists

    # embeddings
    from pipeline.artifacts import ArtifactSpec, resolve
    from pipeline.embedder import SentenceEmbedder, encode_cached
    from pipeline.settings import Settings

    settings = Settings.from_env()
    spec = ArtifactSpec("sentence embedder", settings.embedder_model, settings.revision_for("embedder"))
    resolved = resolve(spec, token=settings.hf_token)
    import torch

    torch.manual_seed(0)
    embedder = SentenceEmbedder(resolved.path, settings.embedder_model, settings.revision_for("embedder"))
    _progress(f"embedding {len(passage_texts):,} passages with {settings.embedder_model} ({resolved.source}) ...")
    t0 = time.time()
    vectors = encode_cached(embedder, passage_texts, Path(settings.cache_dir) / "embeddings",
                            show_progress=not args.quiet)
    # rounded to fp16 so that tiny run-to-run float noise in the encoder cannot change the quantised bytes
    vectors = vectors.astype(np.float16).astype(np.float32)
    _progress(f"embedded in {time.time() - t0:.0f} s")
    del passage_texts

    # lyric topics: song profiles learned from the tcc_ceds labels, query-side prototypes
    topic_names = list(TOPICS)
    has_lyrics = table["has_lyrics"].to_numpy(dtype=bool)
    means = song_means(vectors, passage_song, len(table))
    labels = [s.topic for s in songs]
    profiles = topic_profiles(means, has_lyrics, labels, topic_names)
    words = telling_words(bags, labels, topic_names)
    described = embedder.encode([TOPICS[t][1] for t in topic_names])
    telling = embedder.encode([" ".join(words[t]) or TOPICS[t][1] for t in topic_names])
    prototypes = described + telling
    prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)
    shown = [TOPICS[t][0] for t in topic_names]
    top = np.argsort(-profiles.astype(np.float32), axis=1, kind="stable")[:, :2]
    table["themes"] = [", ".join(shown[j] for j in top[i] if profiles[i, j] >= 0.2) if has_lyrics[i] else ""
                       for i in range(len(table))]
    topics_meta = {"names": topic_names, "shown_as": shown, "telling_words": words,
                   "descriptions": {t: TOPICS[t][1] for t in topic_names},
                   "labelled_songs": int(sum(1 for i, t in enumerate(labels) if t in TOPICS and has_lyrics[i])),
                   "source": "tcc_ceds topic labels (CC BY 4.0), ridge on mean passage vectors, out of fold"}

    embedder_meta = {"model_id": settings.embedder_model, "revision": settings.revision_for("embedder"),
                     "dimension": embedder.info.dimension, "fingerprint": embedder.fingerprint()}
    bag_frame = bags_table(bags)
    calibration = lyric_calibration(vectors, passage_song, bag_frame, profiles, prototypes,
                                    embedder.encode(list(CALIBRATION_QUERIES)), list(CALIBRATION_QUERIES))
    manifest = write_catalog(Path(args.out), table, vectors, passage_song, bag_frame, profiles, prototypes,
                             topics_meta, embedder_meta, used_sources, calibration=calibration)
    _progress(f"wrote {args.out} in {time.time() - started:.0f} s: {json.dumps(manifest['counts'])}")
    return manifest


def lyric_calibration(vectors, passage_song, bag_frame, profiles, prototypes, query_vectors, queries) -> dict | None:
    """Chance level of the lyric rule of `pipeline.recommend`, over query-like texts and every song."""
    if not len(passage_song):
        return None
    scorer = recommend.LyricScorer(vectors, passage_song, bag_frame["song"].to_numpy(), bag_frame["word"].tolist(),
                                   bag_frame["count"].to_numpy(), profiles, prototypes)
    return recommend.calibrate([scorer.query(q, text).relevance for q, text in zip(query_vectors, queries)])


def write_catalog(out: Path, table: pd.DataFrame, passage_vectors: np.ndarray, passage_song: np.ndarray,
                  bag_frame: pd.DataFrame, song_topics: np.ndarray, topic_prototypes: np.ndarray, topics_meta: dict,
                  embedder_meta: dict, sources: list[dict], *, calibration: dict | None = None,
                  feature_space: FeatureSpace | None = None) -> dict:
    """Write the catalog files and their manifest. Also used by the benchmark to write synthetic catalogs."""
    table = table[SONG_COLUMNS]
    with_features = table[table["has_features"]]
    feature_matrix = with_features[list(FEATURES)].to_numpy(dtype=np.float64)
    space = feature_space or FeatureSpace.fit(feature_matrix)
    feature_vectors = space.transform(feature_matrix)
    feature_ids = with_features["id"].to_numpy(dtype=np.int32)

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*"):
        if stale.is_file() and stale.name != "README.md":
            stale.unlink()
    _write_parquet(table, out / schema.SONGS)
    (out / schema.FEATURE_IDS).write_bytes(_npy_bytes(feature_ids))
    vector_index.save(vector_index.build(feature_vectors, "l2"), out / schema.FEATURE_INDEX)
    (out / schema.PASSAGE_IDS).write_bytes(_npy_bytes(np.asarray(passage_song, dtype=np.int32)))
    passage_index = vector_index.build(passage_vectors, "ip", storage=LYRIC_STORAGE, exact_limit=None)
    vector_index.save(passage_index, out / schema.PASSAGE_INDEX)
    _write_parquet(bag_frame[["song", "word", "count"]], out / schema.BAGS)
    (out / schema.TOPICS).write_bytes(_npy_bytes(np.asarray(song_topics, dtype=np.float16)))
    (out / schema.TOPIC_MODEL).write_bytes(_npy_bytes(np.asarray(topic_prototypes, dtype=np.float32)))

    counts = {"songs": int(len(table)), "with_features": int(table["has_features"].sum()),
              "with_lyrics": int(table["has_lyrics"].sum()),
              "with_both": int((table["has_features"] & table["has_lyrics"]).sum()),
              "passages": int(len(passage_song)),
              "time_signature_imputed": int(table["time_signature_imputed"].sum())}
    files = {}
    for path in sorted(out.glob("*")):
        if path.is_file() and path.name not in ("manifest.json", "README.md"):
            files[path.name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "builder": f"scripts/build_index.py {BUILDER_VERSION}",
        "counts": counts,
        "embedder": embedder_meta,
        "feature_space": space.to_json(),
        "lyrics": {"passage_words": PASSAGE_WORDS, "min_words": MIN_LYRIC_WORDS, "storage": LYRIC_STORAGE,
                   "calibration": calibration, "topics": topics_meta},
        "files": files,
        "sources": sources,
        "notice": "No lyric text is stored: only passage embeddings, per-song bags of single words with counts "
                  "(unordered), keywords and topics.",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="folder of the raw tables (SOURCES.md)")
    parser.add_argument("--out", default=str(REPO_ROOT / "index"), help="output folder")
    parser.add_argument("--table", action="append", help="extra CSV/TSV/parquet table of songs (repeatable)")
    parser.add_argument("--hub-dataset", help="a Hub dataset of songs, read with datasets.load_dataset")
    parser.add_argument("--hub-split", default="train")
    parser.add_argument("--no-default-sources", action="store_true", help="skip the five tables of --data-dir")
    parser.add_argument("--limit-songs", type=int, default=0, help="keep a deterministic slice (for tests)")
    parser.add_argument("--max-passages-per-song", type=int, default=0, help="cap passages per song (for tests)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--push-to-hub", metavar="REPO", help="publish the built catalog as a Hub dataset repo "
                        "(needs HF_TOKEN) and print the pinned I2M_CATALOG value")
    return parser.parse_args(argv)


def hub_token(token: str | None) -> str:
    """The write token `--push-to-hub` needs; the script asks before building, which takes minutes to hours."""
    if not token:
        raise SystemExit("--push-to-hub needs a write token in HF_TOKEN.")
    return token


def push_to_hub(folder: Path, repo: str, token: str) -> str:
    """Upload a built catalog as one commit of a Hub dataset repo that then holds that build alone; returns
    `repo@commit` for I2M_CATALOG."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    token = hub_token(token)
    manifest = json.loads((folder / "manifest.json").read_text())
    sources = "\n".join(f"- {s.get('title', s['name'])}: {s.get('licence', 'see its source')}"
                        for s in manifest["sources"])
    # the Spotify Tracks Dataset is ODbL: a catalog built from it is a database under the ODbL
    card = (f"---\nlicense: odbl\n---\n# Song catalog for Picture Soundtrack\n\nBuilt by scripts/build_index.py "
            f"(schema {manifest['schema_version']}): {json.dumps(manifest['counts'])}. No lyric text: only passage "
            f"embeddings, bags of single words, keywords and topics.\n\nSources:\n{sources}\n")
    operations = [CommitOperationAdd(name, str(folder / name)) for name in ["manifest.json", *manifest["files"]]]
    operations.append(CommitOperationAdd("README.md", card.encode()))
    api = HfApi(token=token)
    api.create_repo(repo, repo_type="dataset", exist_ok=True)
    # the app downloads the whole snapshot at the pinned commit: a file an earlier build had and this one does not
    # (dropped or renamed) would come with it for nothing, so the same commit removes it; `.gitattributes` is the
    # Hub's, and routes the binary files to LFS
    ours = {operation.path_in_repo for operation in operations}
    operations += [CommitOperationDelete(name) for name in api.list_repo_files(repo, repo_type="dataset")
                   if name not in ours and name != ".gitattributes"]
    commit = api.create_commit(repo, operations, repo_type="dataset",
                               commit_message=f"Catalog: {json.dumps(manifest['counts'])}")
    return f"{repo}@{commit.oid}"


if __name__ == "__main__":
    import os

    arguments = parse_args()
    token = hub_token(os.environ.get("HF_TOKEN")) if arguments.push_to_hub else None
    build(arguments)
    if arguments.push_to_hub:
        ref = push_to_hub(Path(arguments.out), arguments.push_to_hub, token)
        _progress(f"published: run the app with I2M_CATALOG={ref}")
