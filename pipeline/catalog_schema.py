"""The catalog contract shared by its writer (`scripts/build_index.py`) and its reader (`pipeline.catalog`).

A catalog folder holds the files below and a `manifest.json` listing each file's sha256 and size. Lyric text is
never stored: only passage embeddings, per-song bags of single words with counts (unordered, as the musiXmatch
dataset publishes lyrics), keywords and themes.
"""

from __future__ import annotations

import re
import unicodedata

from .artifacts import file_sha256

SCHEMA_VERSION = 3

SONGS = "songs.parquet"  # one row per song: metadata, fine genres and families (", "-joined, `pipeline.genres`), the 13 features, keywords, themes
FEATURE_IDS = "feature_song_ids.npy"  # row i of the feature index → song id
FEATURE_INDEX = "features.faiss"
PASSAGE_IDS = "passage_song_ids.npy"  # row i of the passage index → song id, grouped by song
PASSAGE_INDEX = "lyrics.faiss"
BAGS = "bags.parquet"  # (song, word, count), sorted by song then word
TOPICS = "topics.npy"  # per song with lyrics: its lyric-topic profile (`manifest["lyrics"]["topics"]`)
TOPIC_MODEL = "topic_model.npy"  # one prototype embedding per topic, to read a query's topics
REQUIRED_FILES = (SONGS, FEATURE_IDS, FEATURE_INDEX, PASSAGE_IDS, PASSAGE_INDEX, BAGS, TOPICS, TOPIC_MODEL)

__all__ = ["SCHEMA_VERSION", "REQUIRED_FILES", "file_sha256", "words", "stem", "spotify_id", "tidy_name"]

# str.title() capitalises after an apostrophe: "Don'T", "Mattie'S Rag", "I'Ll". Only English contractions and the
# possessive are put back in lower case, so names such as "O'Connor" or "D'Arienzo" keep their capital.
_TITLED_CONTRACTION = re.compile(r"(?<=[a-z])'(?:S|T|D|M|Ll|Re|Ve)\b|\bI'(?:D|M|Ll|Ve)\b")


def tidy_name(text: str) -> str:
    """A title or an artist as `str.title()` wrote it, without the capitals it puts after an apostrophe
    ("You'Ve Got A Cold" → "You've Got A Cold"); other text is returned as it is."""
    if "'" not in text:
        return text
    return _TITLED_CONTRACTION.sub(lambda m: m.group(0)[0] + m.group(0)[1:].lower(), text)

_WORD = re.compile(r"[a-z0-9']+")
# Spotify's track ids: 22 base-62 characters. Anything else never reaches a link or the embedded player.
_SPOTIFY_ID = re.compile(r"[A-Za-z0-9]{22}")


def spotify_id(value) -> str | None:
    """`value` if it has the shape of a Spotify track id, else None (checked at build and again at render)."""
    return value if isinstance(value, str) and _SPOTIFY_ID.fullmatch(value) else None


def words(text: str) -> list[str]:
    """Lower-case ASCII words of a text (apostrophes inside words kept), in order."""
    ascii_text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii").lower()
    return [w.strip("'") for w in _WORD.findall(ascii_text) if w.strip("'")]


def stem(word: str) -> str:
    """A light plural stemmer, so that a query's 'tears' meets a lyric's 'tear' (and tcc's lemmatised lyrics)."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word
