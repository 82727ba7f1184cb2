"""Datasets (embedded default, local files, Hub), the preprocessing-ops registry and the Arrow image cache."""
