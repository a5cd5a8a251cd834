"""Fit the song-mood centroids (`pipeline/song_moods.json`) on a table of tracks labelled with a mood.

    python scripts/fit_song_moods.py                               # ../shared/eval/moods_dev.csv
    python scripts/fit_song_moods.py --table my_moods.csv --check  # compare with the shipped file, write nothing

The table needs a `mood` column and the mood-bearing features (valence, energy, danceability, acousticness) in
Spotify units. The result is a few numbers per mood, so the file is rewritten byte for byte from the same table;
it records the table's name, row count and sha256. After a refit, `python scripts/eval_recs.py --json` measures the
feature search again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pipeline.artifacts import file_sha256  # noqa: E402
from pipeline.song_moods import MODEL_FILE, SongMoods  # noqa: E402

DEFAULT_TABLE = REPO_ROOT.parent / "shared" / "eval" / "moods_dev.csv"
MOOD_FEATURES = ("valence", "energy", "danceability", "acousticness")


def fit_table(table: Path) -> dict:
    import pandas as pd

    frame = pd.read_csv(table)
    missing = [c for c in (*MOOD_FEATURES, "mood") if c not in frame.columns]
    if missing:
        raise SystemExit(f"{table} has no column {', '.join(missing)}.")
    frame = frame.dropna(subset=[*MOOD_FEATURES, "mood"])
    model = SongMoods.fit(frame[list(MOOD_FEATURES)].to_numpy(dtype=float), frame["mood"].astype(str).str.lower(),
                          MOOD_FEATURES)
    source = {"table": table.name, "rows": int(len(frame)), "sha256": file_sha256(table)}
    return model.to_json(source)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE, help="labelled tracks (CSV)")
    parser.add_argument("--out", type=Path, default=MODEL_FILE)
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from a refit; write nothing")
    args = parser.parse_args(argv)
    text = json.dumps(fit_table(args.table), indent=1) + "\n"
    if args.check:
        same = args.out.is_file() and args.out.read_text() == text
        print(f"{args.out}: {'matches' if same else 'differs from'} a refit on {args.table}")
        return 0 if same else 1
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
