"""Offline jobs: build the catalog, train the mood head, benchmarks."""
