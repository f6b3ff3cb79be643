"""Training data: samples, loaders, the prompt template, images and the DataModule."""

from medix.data.samples import LoadReport, Sample, split_samples
from medix.data.sources import load_report, load_samples

__all__ = ["LoadReport", "PromptBatch", "PromptDataModule", "Sample", "load_report", "load_samples", "split_samples"]


def __getattr__(name: str):
    """The DataModule is imported on first use, so `from medix.data import Sample` does not import Lightning."""
    if name in ("PromptDataModule", "PromptBatch"):
        from medix.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'medix.data' has no attribute {name!r}")
