"""Datasets (embedded default, local files, Hub), the preprocessing-ops registry, the image cache (encoded
bytes or decoded pixels, in Arrow shards) and the loaders."""
