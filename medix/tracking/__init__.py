"""Experiment tracking: MLflow params (flattened, redacted), run names, tags, artifacts."""
