"""What a person sees in the terminal: medix's own lines, not every library's."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_third_party_logs(verbose: bool) -> None:
    """One line per judge HTTP request, transformers/peft FutureWarnings, weight-loading progress bars and
    Lightning's tips drown medix's own lines; `verbose=true` keeps them."""
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("httpx", "httpx2", "openai", "sentence_transformers", "lightning.pytorch", "lightning.fabric",
                 "transformers", "peft", "urllib3", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # HF loads models in eval mode
    # validation statistics are computed over every rank (torchmetrics) before they are logged
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")
    # FSDP2 flags outputs that are views; medix never changes a model output in place
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
