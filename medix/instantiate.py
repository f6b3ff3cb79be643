"""Building objects from config nodes: `hydra.utils.instantiate` with medix's errors passed on as themselves. A leaf
module (it imports only medix.errors), so that every layer may build its parts from config."""

from __future__ import annotations


def build(node, **kwargs):
    """`hydra.utils.instantiate(node, **kwargs)`, with a MedixError raised inside the target (a bad value the user
    can fix) passed on as itself, so the entry points print it as one line."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from medix.errors import ConfigError, MedixError

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, MedixError):
            raise cause from None
        if isinstance(cause, TypeError) and "argument" in str(cause):  # an unknown or missing key of a _target_
            raise ConfigError(f"{node.get('_target_')}: {cause}") from None
        raise
