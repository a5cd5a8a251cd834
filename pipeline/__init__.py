"""Everything the UI calls: settings, artifacts, models, the song catalog and the recommenders.

    from pipeline import get_pipeline
    pipe = get_pipeline()                      # loads every model in the background, once per process
    analysis = pipe.analyze("photo.jpg")       # caption, mood, music prompt, three song lists
    music = pipe.generate(analysis.prompt.text, duration_s=8, seed=42)

Importing this package does not import torch; models load on a background thread.
"""

from .catalog import Catalog, SongMatch
from .core import Analysis, ComponentStatus, Pipeline, get_pipeline
from .mood import MoodResult
from .prompt import MusicPrompt
from .settings import Settings

__all__ = ["Analysis", "Catalog", "ComponentStatus", "MoodResult", "MusicPrompt", "Pipeline", "Settings",
           "SongMatch", "get_pipeline"]
