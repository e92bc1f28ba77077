"""Data layer: sources, manifests, splits, caches and synthetic phantoms."""
