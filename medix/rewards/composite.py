"""The composite MediX-R1 reward: overall = Σ weights[c] · c over its components (paper: llm_judge, embedding,
modality, format; users add their own by config)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from medix.config import DegenerateGuardConfig
from medix.errors import ConfigError, DataError
from medix.rewards.components import split_solutions
from medix.rewards.guard import degenerate_reason

PAPER_COMPONENTS = ("llm_judge", "embedding", "modality", "format")
SEMANTICS = ("medix", "paper")


@dataclass
class RewardBatch:
    """Per-completion component scores (None = not scored), the weighted overall (None = excluded) and, where the
    degenerate guard ran, why each completion was guarded (None = not guarded)."""

    components: dict[str, list[float | None]]
    overall: list[float | None]
    guarded: list[str | None] | None = None

    def select(self, rows: list[int]) -> "RewardBatch":
        return RewardBatch({k: [v[i] for i in rows] for k, v in self.components.items()},
                           [self.overall[i] for i in rows],
                           None if self.guarded is None else [self.guarded[i] for i in rows])

    @staticmethod
    def concat(batches: list["RewardBatch"]) -> "RewardBatch":
        guarded = None if any(b.guarded is None for b in batches) else [x for b in batches for x in b.guarded]
        return RewardBatch({k: [x for b in batches for x in b.components[k]] for k in batches[0].components},
                           [x for b in batches for x in b.overall], guarded)


def weighted_overall(scores: dict[str, float | None], weights: dict[str, float]) -> float | None:
    """Σ weights[c] · scores[c]; None when a component with a positive weight is None (a failed judge call)."""
    total = 0.0
    for name, weight in weights.items():
        if weight == 0:
            continue
        if scores[name] is None:
            return None
        total += weight * scores[name]
    return total


def validate_weights(weights, components) -> dict[str, float]:
    """The weights as floats, one per component; ConfigError naming a missing, unknown, non-numeric or negative one."""
    given = dict(weights or {})
    names = list(components)
    for key in given:
        if key not in components:
            raise ConfigError(f"reward.weights.{key} names no component; add reward.components.{key}._target_ or "
                              f"use one of {', '.join(names)}")
    out: dict[str, float] = {}
    for key in names:
        if given.get(key) is None:
            raise ConfigError(f"reward.weights.{key} is missing for reward.components.{key}; give every component a "
                              "weight (0 disables one)")
        try:
            out[key] = float(given[key])
        except (TypeError, ValueError):
            raise ConfigError(f"reward.weights.{key}={given[key]!r} is not a number") from None
        if out[key] < 0 or not math.isfinite(out[key]):
            raise ConfigError(f"reward.weights.{key}={given[key]!r} must be a finite number >= 0")
    return out


def guard_settings(guard) -> DegenerateGuardConfig | None:
    """`reward.guard` as its schema dataclass (None or enabled=false: no guard); ConfigError naming a bad value."""
    if guard is None:
        return None
    settings = guard if isinstance(guard, DegenerateGuardConfig) else DegenerateGuardConfig(**dict(guard))
    checks = {"tag_share": 0 < settings.tag_share <= 1, "max_repeats": settings.max_repeats >= 2,
              "option_share": 0 < settings.option_share <= 1, "echo_share": 0 < settings.echo_share <= 1,
              "hedge_items": settings.hedge_items >= 0}
    for key, ok in checks.items():
        if not ok:
            expected = {"max_repeats": "an integer >= 2", "hedge_items": "an integer >= 0 (0 = off)"}.get(
                key, "a share in (0, 1]")
            raise ConfigError(f"reward.guard.{key}={getattr(settings, key)!r}; expected {expected}")
    return settings if settings.enabled else None


def build_component(name: str, cfg):
    """`reward.components.<name>`: a class is instantiated with the other keys; a function is the component itself,
    its other keys bound as keyword arguments. A bad target or argument is a ConfigError naming it."""
    import importlib
    import inspect

    from hydra.errors import InstantiationException  # here, not at the top: the GPU image has no hydra

    from medix.instantiate import build

    target = cfg.get("_target_")
    if not target:
        raise ConfigError(f"reward.components.{name} has no _target_; name a function or class, e.g. "
                          f"+reward.components.{name}._target_=my_module.my_reward")
    module, _, attribute = str(target).rpartition(".")
    try:
        is_function = not inspect.isclass(getattr(importlib.import_module(module), attribute))
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"reward.components.{name}._target_={target!r} cannot be imported ({err})") from None
    try:
        return build(cfg, _partial_=is_function)
    except InstantiationException as err:
        raise ConfigError(f"reward.components.{name}: cannot build {target!r}: {err.__cause__ or err}") from err
    except ConfigError as err:
        raise ConfigError(f"reward.components.{name}: {err}") from None


class CompositeReward:
    """Scores a batch of completions against `"<TAG> answer"` solutions with every component whose weight is > 0
    (a component with weight 0 is never built: embed_only starts no judge), and weights them into `overall`. With
    the degenerate guard (reward.guard), a guarded completion scores 0 on reward.guard.components (llm_judge by
    default) without calling them."""

    def __init__(self, weights, components, semantics: str = "medix", guard=None, reasoning_tag: str = "thinking"):
        """`components`: by name, the config (`_target_` + arguments) of each component, or (from Python) the
        callable itself. `semantics`, `guard`: see medix.config.RewardConfig (None = no degenerate guard)."""
        if semantics not in SEMANTICS:
            raise ConfigError(f"reward.semantics={semantics!r}; expected one of {', '.join(SEMANTICS)}")
        self.semantics = semantics
        self.guard = guard_settings(guard) if semantics == "medix" else None
        self.reasoning_tag = reasoning_tag
        self.weights = validate_weights(weights, components)
        for name in self.guard.components if self.guard is not None else ():
            if name not in self.weights:
                raise ConfigError(f"reward.guard.components names {name!r}, which is no component; use one of "
                                  f"{', '.join(self.weights)}")
        self.components = {}
        for name, spec in components.items():
            if self.weights[name] == 0:
                continue
            self.components[name] = spec if callable(spec) else build_component(name, spec)

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    def __call__(self, completions: list[str], solutions: list[str], **columns) -> RewardBatch:
        n = len(completions)
        for key, values in [("solutions", solutions), *columns.items()]:
            if values is not None and len(values) != n:
                raise ValueError(f"reward: {key} has {len(values)} entries for {n} completions")
        references = [answer for _, answer in split_solutions(solutions)]  # a DataError names a row without a tag
        guarded = self.guarded(completions, references, columns) if self.guard is not None else None
        scores = {name: [None] * n for name in self.weights}
        for name, component in self.components.items():
            if guarded is not None and name in self.guard.components:
                scores[name] = self.scored_unguarded(name, component, guarded, completions, solutions, columns)
            else:
                scores[name] = checked(name, component(completions, solutions, **columns), n)
        overall = [weighted_overall({c: scores[c][i] for c in scores}, self.weights) for i in range(n)]
        return RewardBatch(scores, overall, guarded)

    def guarded(self, completions: list[str], references: list[str], columns: dict) -> list[str | None]:
        """The guard's reason per completion (columns `questions` and `truncated` where given)."""
        questions = columns.get("questions") or [None] * len(completions)
        truncated = columns.get("truncated") or [None] * len(completions)
        return [degenerate_reason(c, q, t, self.guard, self.reasoning_tag, reference)
                for c, q, t, reference in zip(completions, questions, truncated, references)]

    @staticmethod
    def scored_unguarded(name, component, guarded, completions, solutions, columns) -> list[float | None]:
        """0.0 for every guarded row; the component called on the other rows only."""
        rows = [i for i, reason in enumerate(guarded) if reason is None]
        out: list[float | None] = [0.0] * len(completions)
        if rows:
            picked = {key: None if values is None else [values[i] for i in rows] for key, values in columns.items()}
            values = component([completions[i] for i in rows], [solutions[i] for i in rows], **picked)
            for i, value in zip(rows, checked(name, values, len(rows))):
                out[i] = value
        return out

    def stats(self) -> dict[str, float]:
        """The statistics of every component that keeps some (the judge's `judge/*` counters)."""
        out: dict[str, float] = {}
        for component in self.components.values():
            if callable(getattr(component, "stats", None)):
                out.update(component.stats())
        return out

    def close(self) -> None:
        for component in self.components.values():
            if callable(getattr(component, "close", None)):
                component.close()

    def __enter__(self) -> "CompositeReward":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def checked(name: str, values, n: int) -> list[float | None]:
    """A component's output as floats: one per completion, None or a finite number."""
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise DataError(f"reward component {name!r} returned {got} for {n} completions; expected a list of "
                        "float | None, one per completion")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            value = float(v)
        except (TypeError, ValueError):
            raise DataError(f"reward component {name!r} gave {v!r} for completion {i}; expected a float or None") \
                from None
        if not math.isfinite(value):
            raise DataError(f"reward component {name!r} gave {value} for completion {i}; expected a finite value")
        out.append(value)
    return out
