"""Training data: samples, loaders, the prompt template, images and the DataModule."""

from medix.data.samples import LoadReport, Sample, split_samples
from medix.data.sources import load_report, load_samples

__all__ = ["LoadReport", "Sample", "load_report", "load_samples", "split_samples"]
