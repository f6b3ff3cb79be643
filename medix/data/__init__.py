"""Training data: samples, loaders, the prompt template, images and the DataModule."""
