"""Everything the UI calls: settings, artifacts, models, the song catalog and the recommenders."""
