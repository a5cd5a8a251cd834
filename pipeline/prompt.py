"""Caption + mood → a MusicGen prompt: genre, mood words, instruments, tempo in BPM, key and mode.

Deterministic (the same inputs give the same prompt) and bounded in length: the caption is shortened first, so the
musical part of the prompt always survives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InputError
from .features import KEY_NAMES
from .mood import MoodResult

GENRES: dict[str, str] = {
    "pop": "bright synths, punchy drums and bass",
    "rock": "distorted electric guitars, bass and live drums",
    "electronic": "pulsing synthesizers, four-on-the-floor kick and deep bass",
    "hip hop": "boom-bap drums, deep 808 bass and vinyl samples",
    "jazz": "upright bass, brushed drums, piano and saxophone",
    "classical": "string quartet and grand piano",
    "cinematic": "orchestral strings, french horns and timpani",
    "ambient": "warm pads, soft textures and distant piano",
    "folk": "acoustic guitar, fiddle and light percussion",
    "lo-fi": "dusty drums, mellow electric piano and tape hiss",
    "funk": "slap bass, clavinet, tight drums and brass stabs",
    "r&b": "smooth keys, soft drums and warm bass",
}

EMOTION_WORDS = {
    "excitement": ("exhilarating", "euphoric"),
    "amusement": ("playful", "upbeat"),
    "contentment": ("peaceful", "warm"),
    "anger": ("aggressive", "intense"),
    "fear": ("tense", "ominous"),
    "sadness": ("melancholic", "wistful"),
}


@dataclass(frozen=True)
class MusicPrompt:
    text: str
    genre: str
    tempo_bpm: int
    key: str
    truncated: bool = False


def genre_for(features: dict[str, float]) -> str:
    """A genre that suits the predicted features, when the user did not pick one."""
    energy, valence = features["energy"], features["valence"]
    dance, acoustic = features["danceability"], features["acousticness"]
    instrumental = features["instrumentalness"]
    if instrumental > 0.5 and acoustic > 0.5:
        return "cinematic" if energy > 0.45 else "classical"
    if energy < 0.3:
        return "ambient"
    if acoustic > 0.6:
        return "folk" if valence > 0.4 else "lo-fi"
    if energy > 0.75 and dance > 0.65:
        return "electronic"
    if valence < 0.35 and energy > 0.6:
        return "rock"
    if dance > 0.7 and valence > 0.6:
        return "funk"
    if energy < 0.5:
        return "lo-fi"
    return "pop"


def _clean(text: str) -> str:
    text = "".join(ch if ch.isprintable() else " " for ch in (text or ""))
    return re.sub(r"\s+", " ", text).strip(" ,.")


def build_prompt(caption: str, mood: MoodResult, *, genre: str | None = None, extra: str | None = None,
                 max_chars: int = 400) -> MusicPrompt:
    features = mood.features
    genre = (genre or "").strip().lower() or genre_for(features)
    instruments = GENRES.get(genre, GENRES["pop"])
    words = list(EMOTION_WORDS.get(mood.emotion, ("expressive",)))
    words.append("driving" if features["energy"] > 0.65 else "gentle" if features["energy"] < 0.35 else "steady")
    tempo = int(round(features["tempo"]))
    key = f"{KEY_NAMES[int(features['key']) % 12]} {'major' if features['mode'] >= 0.5 else 'minor'}"
    head = f"{genre} track, {', '.join(words)}, {instruments}, {tempo} BPM, {key}"
    extra = _clean(extra or "")
    if extra:
        head += f", {extra}"
    caption = _clean(caption)
    truncated = False
    tail = f", inspired by {caption[:1].lower() + caption[1:]}" if caption else ""
    if len(head) > max_chars:
        head, tail, truncated = head[:max_chars].rsplit(" ", 1)[0].rstrip(" ,"), "", True
    elif len(head) + len(tail) > max_chars:
        room = max_chars - len(head)
        tail = tail[:room].rsplit(" ", 1)[0].rstrip(" ,") if room > len(", inspired by ") + 3 else ""
        truncated = True
    return MusicPrompt(text=head + tail, genre=genre, tempo_bpm=tempo, key=key, truncated=truncated)


def clean_user_prompt(text: str, max_chars: int) -> tuple[str, bool]:
    """A prompt typed by the user: control characters removed, whitespace collapsed, cut at `max_chars`."""
    cleaned = _clean(text)
    if len(cleaned) <= max_chars:
        return cleaned, False
    return cleaned[:max_chars].rsplit(" ", 1)[0] or cleaned[:max_chars], True


def check_genre(genre: str | None) -> str | None:
    """A genre picked by the user: one of GENRES (any case), or None for "pick from the mood"."""
    value = (genre or "").strip().lower()
    if value and value not in GENRES:
        raise InputError(f"Unknown genre {genre!r}. Choose one of: {', '.join(GENRES)}.")
    return value or None
