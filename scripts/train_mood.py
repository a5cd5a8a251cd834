"""Train the FastMLP mood head (CLIP image embedding → 13 Spotify audio features), the DYLUMO design.

    python scripts/train_mood.py --dataset ecnu-aigc/EMID --out mood-head/
    python scripts/train_mood.py --images photos/ --csv labels.csv --out mood-head/

The data: images paired with the audio features of music that suits them (EMID-style). From the Hub, a dataset
with an image column and the feature columns; locally, a folder of images and a CSV with an `image` column
(file name inside the folder) plus the feature columns. All 13 features (see `pipeline.features.FEATURES`) are
needed.

Writes `mood_mlp.safetensors` (weights + feature scaler, loaded by I2M_MOOD_PREDICTOR=mlp I2M_MOOD_MLP=...),
`metrics.json` and a model card `README.md`. Metrics on the held-out split: MSE per feature (standardised and in
Spotify units), emotion accuracy (valence × energy quadrant labels) and P@10: the share of the 10 catalog songs
recommended from the predicted features whose emotion matches the image's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pipeline.features import FEATURES  # noqa: E402
from pipeline.mood import build_fast_mlp, emotion_of, save_fast_mlp  # noqa: E402


def _progress(message: str) -> None:
    print(f"[train_mood] {message}", flush=True)


def load_local(images_dir: Path, csv_path: Path):
    import pandas as pd
    from PIL import Image

    table = pd.read_csv(csv_path)
    missing = [c for c in ("image", *FEATURES) if c not in table.columns]
    if missing:
        raise SystemExit(f"{csv_path} lacks columns: {', '.join(missing)}")
    pictures = [Image.open(images_dir / name).convert("RGB") for name in table["image"]]
    return pictures, table[list(FEATURES)].to_numpy(dtype=np.float64)


def load_hub(name: str, split: str, image_column: str):
    from datasets import load_dataset

    dataset = load_dataset(name, split=split)
    missing = [c for c in (image_column, *FEATURES) if c not in dataset.column_names]
    if missing:
        raise SystemExit(f"{name} lacks columns: {', '.join(missing)}")
    pictures = [item.convert("RGB") for item in dataset[image_column]]
    return pictures, np.stack([np.asarray(dataset[f], dtype=np.float64) for f in FEATURES], axis=1)


def embed(pictures, clip_path: Path, batch: int = 32) -> np.ndarray:
    from pipeline.mood import ClipImageEncoder

    encoder = ClipImageEncoder(clip_path)
    return np.concatenate([encoder.embed(pictures[i:i + batch]) for i in range(0, len(pictures), batch)])


def train(embeddings: np.ndarray, targets: np.ndarray, *, seed: int = 0, epochs: int = 200, patience: int = 15,
          lr: float = 1e-3, batch_size: int = 64, val_fraction: float = 0.2):
    """Returns (model, mean, std, split indices, history)."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(embeddings))
    n_val = max(1, int(round(len(order) * val_fraction)))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    mean = targets[train_idx].mean(axis=0)
    std = targets[train_idx].std(axis=0)
    std = np.where(std < 1e-8, 1.0, std)
    z = (targets - mean) / std
    x = torch.as_tensor(embeddings, dtype=torch.float32)
    y = torch.as_tensor(z, dtype=torch.float32)
    model = build_fast_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    best, best_state, waited, history = float("inf"), None, 0, []
    for _ in range(epochs):
        model.train()
        perm = torch.as_tensor(rng.permutation(train_idx))
        for start in range(0, len(perm), batch_size):
            rows = perm[start:start + batch_size]
            if len(rows) < 2:  # BatchNorm needs two rows
                continue
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = float(torch.nn.functional.mse_loss(model(x[val_idx]), y[val_idx]))
        history.append(val_loss)
        if val_loss < best - 1e-6:
            best, waited = val_loss, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return model, mean, std, (train_idx, val_idx), history


def evaluate(model, embeddings, targets, mean, std, val_idx, catalog=None) -> dict:
    import torch

    with torch.no_grad():
        predicted = model(torch.as_tensor(embeddings[val_idx], dtype=torch.float32)).numpy() * std + mean
    truth = targets[val_idx]
    mse_std = np.mean(((predicted - truth) / std) ** 2, axis=0)
    mse_units = np.mean((predicted - truth) ** 2, axis=0)
    v, e = FEATURES.index("valence"), FEATURES.index("energy")
    true_emotions = [emotion_of(t[v], t[e])[0] for t in truth]
    predicted_emotions = [emotion_of(float(np.clip(p[v], 0, 1)), float(np.clip(p[e], 0, 1)))[0] for p in predicted]
    metrics = {
        "validation_size": int(len(val_idx)),
        "mse_standardised": {f: round(float(m), 5) for f, m in zip(FEATURES, mse_std)},
        "mse_spotify_units": {f: round(float(m), 5) for f, m in zip(FEATURES, mse_units)},
        "mse_standardised_mean": round(float(mse_std.mean()), 5),
        "emotion_accuracy": round(float(np.mean([a == b for a, b in zip(true_emotions, predicted_emotions)])), 4),
    }
    if catalog is not None:
        from pipeline.features import RANGES

        hits = []
        for row, emotion in zip(predicted, true_emotions):
            query = {f: float(np.clip(row[i], *RANGES[f])) for i, f in enumerate(FEATURES)}
            songs = catalog.search_features(query, k=10)
            hits.append(np.mean([emotion_of(s.features["valence"], s.features["energy"])[0] == emotion
                                 for s in songs]) if songs else 0.0)
        metrics["precision_at_10_emotion"] = round(float(np.mean(hits)), 4)
    return metrics


MODEL_CARD = """---
library_name: safetensors
tags: [image-to-music, clip, audio-features, mood]
datasets: [{dataset}]
metrics: [mse, accuracy, precision_at_k]
---

# FastMLP mood head

Maps a CLIP ViT-B/32 image embedding (512-d) to the 13 Spotify audio features (danceability, energy, key,
loudness, mode, speechiness, acousticness, instrumentalness, liveness, valence, tempo, duration_ms,
time_signature): 512 → 512 → 256 → 128 → 13 with BatchNorm, ReLU and Dropout 0.2 (the DYLUMO design).
Targets are standardised; the scaler (mean, std) is stored in the safetensors metadata.

Trained by `scripts/train_mood.py` on {dataset} ({n_train} training / {n_val} validation images, seed {seed},
{epochs} epochs with early stopping).

## Validation metrics

{metrics}

## Use

    I2M_MOOD_PREDICTOR=mlp I2M_MOOD_MLP=path/to/mood_mlp.safetensors python app.py
"""


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="Hub dataset id (e.g. ecnu-aigc/EMID)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--images", type=Path, help="local folder of images")
    parser.add_argument("--csv", type=Path, help="local CSV: image file name + the 13 feature columns")
    parser.add_argument("--clip-model", help="CLIP checkpoint (default: I2M_CLIP_MODEL, resolved like the app)")
    parser.add_argument("--index", help="catalog for the P@10 metric (default: the shipped index/)")
    parser.add_argument("--no-catalog", action="store_true", help="skip the P@10 metric")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.dataset:
        pictures, targets = load_hub(args.dataset, args.split, args.image_column)
        source = args.dataset
    elif args.images and args.csv:
        pictures, targets = load_local(args.images, args.csv)
        source = f"local:{args.csv.name}"
    else:
        parser.error("give --dataset, or --images with --csv")
    if len(pictures) < 10:
        raise SystemExit("Need at least 10 images to train and validate.")
    _progress(f"{len(pictures)} images from {source}")

    from pipeline.artifacts import ArtifactSpec, resolve
    from pipeline.settings import Settings

    settings = Settings.from_env()
    clip_ref = args.clip_model or settings.clip_model
    clip_path = resolve(ArtifactSpec("CLIP model", clip_ref, settings.revision_for("clip")),
                        token=settings.hf_token or None).path
    started = time.time()
    embeddings = embed(pictures, clip_path)
    _progress(f"embedded in {time.time() - started:.1f} s")
    model, mean, std, (train_idx, val_idx), history = train(embeddings, targets, seed=args.seed, epochs=args.epochs,
                                                            patience=args.patience)
    catalog = None
    if not args.no_catalog:
        from pipeline.catalog import Catalog

        catalog = Catalog.load(args.index or settings.index_dir)
    metrics = evaluate(model, embeddings, targets, mean, std, val_idx, catalog)
    metrics.update({"epochs_run": len(history), "best_validation_loss": round(min(history), 5), "seed": args.seed,
                    "train_size": int(len(train_idx)), "dataset": source})
    args.out.mkdir(parents=True, exist_ok=True)
    save_fast_mlp(model, mean, std, args.out / "mood_mlp.safetensors", extra={"metrics": metrics})
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    table = "\n".join(f"- {k}: {v}" for k, v in metrics.items() if not isinstance(v, dict))
    (args.out / "README.md").write_text(MODEL_CARD.format(dataset=source, n_train=len(train_idx), n_val=len(val_idx),
                                                          seed=args.seed, epochs=len(history), metrics=table))
    _progress(f"saved to {args.out}: {json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)})}")
    return metrics


if __name__ == "__main__":
    main()
