"""The mood of a photo: CLIP image embedding → 13 Spotify audio features → an emotion label.

Two predictors share one interface (`predict(embeddings, images) -> list[MoodResult]`):

* `ZeroShotMood` (default, no training): for each feature, CLIP compares the photo with text prompts for the
  feature's two poles (calm ↔ energetic, sad ↔ joyful, electronic ↔ acoustic, ...). The probability of the upper
  pole places the value between the pole values in Spotify units. Key is not visible in a photo: it follows the
  photo's dominant hue through Scriabin's colour–key correspondence (red C, orange G, yellow D, green A, ...).
* `FastMLP` (the DYLUMO head): 512 → 512 → 256 → 128 → 13 with BatchNorm, ReLU and Dropout 0.2, trained by
  `scripts/train_mood.py` on standardised features; weights and the feature scaler live in one safetensors file.

The emotion comes from valence × energy: the nearest of six prototypes, with a softmax confidence.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .features import FEATURES, RANGES
from .memory import release_file_pages, trim
from .runtime import build_model, fast_bf16

EMBED_DIM = 512

# (valence, energy) prototypes of the six emotions
EMOTIONS: dict[str, tuple[float, float]] = {
    "excitement": (0.80, 0.85),
    "amusement": (0.78, 0.55),
    "contentment": (0.68, 0.25),
    "anger": (0.25, 0.85),
    "fear": (0.22, 0.55),
    "sadness": (0.22, 0.22),
}
EMOTION_TEMPERATURE = 0.02  # squared-distance scale of the softmax over prototypes

# feature → (prompts for the low pole, prompts for the high pole, value at low pole, value at high pole)
POLES: dict[str, tuple[tuple[str, ...], tuple[str, ...], float, float]] = {
    "valence": (("a sad, gloomy photo", "a melancholic, lonely scene"),
                ("a happy, joyful photo", "a cheerful, sunny scene"), 0.12, 0.92),
    "energy": (("a calm, still, peaceful photo", "a quiet, sleepy scene"),
               ("an energetic, intense photo", "an action-packed, exciting scene"), 0.12, 0.95),
    "danceability": (("a static, solemn, formal scene", "a motionless landscape"),
                     ("people dancing at a lively party", "a groovy, rhythmic scene"), 0.25, 0.88),
    "acousticness": (("an electronic, neon, high-tech scene", "a modern city with screens and lights"),
                     ("a natural, rustic, organic scene", "a wooden cabin in the countryside"), 0.03, 0.9),
    "instrumentalness": (("people singing and talking", "a portrait of a person"),
                         ("an empty landscape with no people", "a still life with objects"), 0.0, 0.75),
    "speechiness": (("a quiet scene without people", "an empty room"),
                    ("people talking and arguing", "a rapper holding a microphone"), 0.03, 0.3),
    "liveness": (("a private, intimate, indoor scene", "a photo taken in a studio"),
                 ("a live concert with a cheering crowd", "a stage with a band performing"), 0.08, 0.65),
    "loudness": (("a soft, delicate, quiet scene", "a whisper-quiet place"),
                 ("a loud, noisy, powerful scene", "a thunderous, booming scene"), -18.0, -4.0),
    "tempo": (("a slow, relaxed, lazy scene", "a slow-moving, drifting scene"),
              ("a fast, rushing, high-speed scene", "a hectic, racing scene"), 72.0, 158.0),
    "mode": (("a dark, tense, mysterious photo", "a sombre, ominous scene"),
             ("a bright, optimistic, sunny photo", "a warm, hopeful scene"), 0.0, 1.0),
}
DEFAULT_DURATION_MS = 215_000.0
DEFAULT_TIME_SIGNATURE = 4.0

# Scriabin's colour keyboard: hue (degrees) → pitch class, following the circle of fifths around the colour wheel
_SCRIABIN_HUES = ((0, 0), (30, 7), (60, 2), (120, 9), (190, 4), (230, 11), (260, 6), (280, 1), (300, 8),
                  (320, 3), (340, 10), (350, 5))


@dataclass(frozen=True)
class MoodResult:
    features: dict[str, float]  # the 13 audio features in Spotify units
    emotion: str
    confidence: float  # in [0, 1]
    emotion_scores: dict[str, float] = field(default_factory=dict)
    predictor: str = "zeroshot"


def emotion_of(valence: float, energy: float) -> tuple[str, float, dict[str, float]]:
    d2 = {name: (valence - v) ** 2 + (energy - e) ** 2 for name, (v, e) in EMOTIONS.items()}
    logits = {name: -value / EMOTION_TEMPERATURE for name, value in d2.items()}
    top = max(logits.values())
    weights = {name: math.exp(v - top) for name, v in logits.items()}
    total = sum(weights.values())
    scores = {name: round(w / total, 4) for name, w in weights.items()}
    best = max(scores, key=lambda n: (scores[n], n))
    return best, scores[best], scores


def _finish(values: dict[str, float], predictor: str) -> MoodResult:
    features = {}
    for name in FEATURES:
        lo, hi = RANGES[name]
        features[name] = float(min(hi, max(lo, values[name])))
    features["key"] = float(int(round(features["key"])) % 12)
    features["time_signature"] = float(int(round(features["time_signature"])))
    emotion, confidence, scores = emotion_of(features["valence"], features["energy"])
    return MoodResult(features={k: round(v, 4) for k, v in features.items()}, emotion=emotion,
                      confidence=confidence, emotion_scores=scores, predictor=predictor)


def dominant_hue_key(image: Image.Image) -> int:
    """Pitch class for the photo's dominant saturated hue (Scriabin); C when the photo is grey."""
    hsv = np.asarray(image.convert("RGB").resize((64, 64)).convert("HSV"), dtype=np.float64)
    hue, sat, val = hsv[..., 0] * (360 / 255), hsv[..., 1] / 255, hsv[..., 2] / 255
    weight = sat * val
    if weight.sum() < 1e-3 * weight.size:
        return 0
    hist, edges = np.histogram(hue, bins=36, range=(0, 360), weights=weight)
    peak = (edges[np.argmax(hist)] + 5) % 360
    return min(_SCRIABIN_HUES, key=lambda hk: min(abs(peak - hk[0]), 360 - abs(peak - hk[0])))[1]


class ClipImageEncoder:
    """CLIP's vision tower and projection; the text tower is used once, for the zero-shot prompts, then freed."""

    def __init__(self, path: Path, *, device: str = "cpu", dtype=None, prompts: Sequence[str] = ()):
        import torch
        from transformers import CLIPModel, CLIPProcessor
        from transformers.models.clip import CLIPImageProcessorPil

        self.device = device
        self._dtype = dtype or torch.float32
        processor = CLIPProcessor.from_pretrained(path, image_processor=CLIPImageProcessorPil.from_pretrained(path))
        model = build_model(CLIPModel.from_pretrained, path, dtype=self._dtype).eval().to(device)
        self.logit_scale = float(model.logit_scale.exp().item())
        self.text_embeddings: dict[str, np.ndarray] = {}
        if prompts:
            tokens = processor(text=list(prompts), return_tensors="pt", padding=True)
            with torch.inference_mode():
                text = _pooled(model.get_text_features(**{k: v.to(device) for k, v in tokens.items()}))
            text = torch.nn.functional.normalize(text.float(), dim=-1).cpu().numpy()
            self.text_embeddings = dict(zip(prompts, text))
        self._vision = model.vision_model
        self._projection = model.visual_projection
        if device == "cpu" and self._dtype == torch.float32 and fast_bf16():
            # 50 patch tokens at once: bf16 matrix units halve the time and the memory; features are read after
            # an fp32 projection and normalisation, so the mood values move by ~1e-3 at most
            originals = [p.detach() for p in self._vision.parameters()]  # the fp32 storages, not the Parameters
            self._vision.to(torch.bfloat16)
            release_file_pages(originals)
            del originals
            self._dtype = torch.bfloat16
        release_file_pages([*model.text_model.parameters(), *model.text_projection.parameters()])
        del model.text_model, model.text_projection, model
        trim()
        self._processor = processor
        self._lock = threading.Lock()
        self.dimension = int(self._projection.out_features)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, 512) L2-normalised image embeddings, each exactly the one the image gets on its own."""
        import torch

        pixels = self._processor(images=list(images), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self._dtype)
        with self._lock, torch.inference_mode():
            # bf16 products on the CPU give each image the same result whatever the batch; fp32 ones block
            # differently by batch size and would move the last bits, so there the images go one at a time
            if self.device == "cpu" and self._dtype == torch.bfloat16:
                pooled = self._vision(pixel_values=pixels).pooler_output
            else:
                pooled = torch.cat([self._vision(pixel_values=one[None]).pooler_output for one in pixels])
            pooled = pooled.to(self._projection.weight.dtype)
            # the fp32 projection too, row by row (a 768 × 512 product each: nothing to gain from batching it)
            embedded = torch.cat([self._projection(row[None]) for row in pooled])
        return torch.nn.functional.normalize(embedded.float(), dim=-1).cpu().numpy()


def _pooled(output):
    return output if not hasattr(output, "pooler_output") else output.pooler_output


class ZeroShotMood:
    name = "zeroshot"

    @staticmethod
    def prompts() -> list[str]:
        return [p for low, high, _, _ in POLES.values() for p in (*low, *high)]

    def __init__(self, text_embeddings: dict[str, np.ndarray], logit_scale: float):
        self._poles = {}
        for feature, (low, high, lo_value, hi_value) in POLES.items():
            lo_vec = np.mean([text_embeddings[p] for p in low], axis=0)
            hi_vec = np.mean([text_embeddings[p] for p in high], axis=0)
            self._poles[feature] = (lo_vec / np.linalg.norm(lo_vec), hi_vec / np.linalg.norm(hi_vec),
                                    lo_value, hi_value)
        self._scale = logit_scale

    def predict(self, embeddings: np.ndarray, images: Sequence[Image.Image]) -> list[MoodResult]:
        results = []
        for embedding, image in zip(embeddings, images):
            values = {}
            for feature, (lo_vec, hi_vec, lo_value, hi_value) in self._poles.items():
                logit = self._scale * (float(embedding @ hi_vec) - float(embedding @ lo_vec))
                p = 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, logit))))
                values[feature] = lo_value + p * (hi_value - lo_value)
            values["key"] = float(dominant_hue_key(image))
            values["duration_ms"] = DEFAULT_DURATION_MS
            values["time_signature"] = DEFAULT_TIME_SIGNATURE
            results.append(_finish(values, self.name))
        return results


# -- FastMLP ------------------------------------------------------------------------------------------------------

def build_fast_mlp(dropout: float = 0.2):
    import torch.nn as nn

    def block(n_in, n_out):
        return [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU(), nn.Dropout(dropout)]

    return nn.Sequential(*block(EMBED_DIM, 512), *block(512, 256), *block(256, 128), nn.Linear(128, len(FEATURES)))


def save_fast_mlp(model, mean: np.ndarray, std: np.ndarray, path: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    metadata = {"features": json.dumps(list(FEATURES)), "mean": json.dumps([float(v) for v in mean]),
                "std": json.dumps([float(v) for v in std]), "architecture": "fastmlp-512-512-256-128-13"}
    metadata.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


class FastMLPMood:
    name = "mlp"

    def __init__(self, path: Path):
        import torch
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if json.loads(meta.get("features", "[]")) != list(FEATURES):
            raise ValueError(f"{path} is not a FastMLP mood head for the 13 Spotify features.")
        self._mean = np.array(json.loads(meta["mean"]), dtype=np.float64)
        self._std = np.array(json.loads(meta["std"]), dtype=np.float64)
        model = build_fast_mlp()
        model.load_state_dict(load_file(str(path)))
        self._model = model.eval()
        self._torch = torch

    def predict(self, embeddings: np.ndarray, images: Sequence[Image.Image]) -> list[MoodResult]:
        torch = self._torch
        with torch.inference_mode():
            z = self._model(torch.as_tensor(np.asarray(embeddings, dtype=np.float32))).numpy()
        values = z * self._std + self._mean
        return [_finish(dict(zip(FEATURES, row.tolist())), self.name) for row in values]
