"""Patches: the tiler, the patch store, sampling and loading, augmentation, synthetic data."""
