"""Measuring accuracy: MVTec-layout datasets, metrics, baselines."""
