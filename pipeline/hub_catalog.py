"""The song catalog from the Hub: `I2M_CATALOG=user/songs@<commit>` names a dataset repo that
`scripts/build_index.py --push-to-hub` wrote, at a pinned revision (a branch name would let the catalog change
under a running Space).

The app downloads it once into the Hugging Face cache (the status panel shows the download's progress), then checks
it as it checks the shipped catalog — the schema version, every file against the sha256 and size in its manifest —
and also that it was built with the sentence embedder the app uses (its manifest's fingerprint against the shipped
catalog's): lyric vectors from another embedder would silently mismatch every query. When any step fails (no
network, a tampered or truncated file, an interrupted download, another embedder, a malformed setting), the app
loads the shipped `index/` instead and says why in the catalog's status.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .artifacts import ArtifactError, ArtifactSpec, DownloadProgress, hub_reachable, resolve
from .catalog import Catalog
from .errors import IndexIntegrityError

# a Hub dataset id and the revision it is pinned to
REF = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)@(?P<revision>[\w.-]+)")


@dataclass(frozen=True)
class LoadedCatalog:
    catalog: Catalog
    source: str  # "index" (shipped), "hub" (downloaded now) or "cache" (downloaded before)
    note: str | None = None  # why the Hub catalog was not used, when one was asked for


def load_catalog(settings, *, embedder_factory: Callable[[], object] | None = None,
                 progress: DownloadProgress | None = None,
                 reachable: Callable[[], bool] = hub_reachable) -> LoadedCatalog:
    """The catalog `settings.catalog` names, checked, else the shipped one (`settings.index_dir`) with a note."""
    shipped = Path(settings.index_dir)
    ref = (settings.catalog or "").strip()
    if not ref:
        return LoadedCatalog(Catalog.load(shipped, embedder_factory=embedder_factory), "index")
    try:
        path, source = _download(ref, settings.hf_token or None, progress, reachable)
        _check_embedder(path, shipped)
        return LoadedCatalog(Catalog.load(path, embedder_factory=embedder_factory), source)
    except (ArtifactError, IndexIntegrityError) as exc:
        note = f"The Hub catalog {ref} could not be used, so the shipped one is: {_reason(exc)}"
        return LoadedCatalog(Catalog.load(shipped, embedder_factory=embedder_factory), "index", note)


def _reason(exc: Exception) -> str:
    """One line: the artifact resolver's full story is written for model weights (demo mode, cache copies)."""
    if isinstance(exc, ArtifactError) and exc.offline:
        return "the Hub is out of reach and no copy is cached."
    lines = str(exc).splitlines()
    download = [line.strip(" -") for line in lines if line.strip(" -").startswith("Hub download:")]
    return download[0] if download else lines[0]


def _download(ref: str, token: str | None, progress: DownloadProgress | None,
              reachable: Callable[[], bool]) -> tuple[Path, str]:
    match = REF.fullmatch(ref)
    if match is None:
        raise ArtifactError(f"I2M_CATALOG must name a Hub dataset at a pinned revision, such as "
                            f"user/songs@<commit sha>; got {ref!r}.")
    spec = ArtifactSpec("song catalog", match["repo"], match["revision"], repo_type="dataset")
    resolved = resolve(spec, token=token, reachable=reachable, **({"progress": progress} if progress else {}))
    return resolved.path, resolved.source


def _check_embedder(path: Path, shipped: Path) -> None:
    from .embedder import fingerprint_matches

    try:
        theirs = json.loads((path / "manifest.json").read_text())["embedder"]
        ours = json.loads((shipped / "manifest.json").read_text())["embedder"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IndexIntegrityError(f"its manifest cannot be read ({type(exc).__name__}).") from None
    ok, worst = fingerprint_matches(ours["fingerprint"], theirs.get("fingerprint") or [])
    if theirs.get("model_id") != ours["model_id"] or not ok:
        raise IndexIntegrityError(f"it was built with another sentence embedder ({theirs.get('model_id')}, probe "
                                  f"cosine {worst:.4f}) than the app's ({ours['model_id']}).")
