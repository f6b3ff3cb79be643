"""One home for each default: no YAML file under conf/ restates what its schema already holds, no two paper presets repeat a setting, every schema key is read by something, and every constructor
default that a schema also holds agrees with it. Pure checks of files and signatures: no model is built."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from medix import config as schemas
from medix.judges import config as judge_schemas

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
ROOTS = {"config.yaml": schemas.TrainConfig, "score.yaml": schemas.ScoreConfig, "eval.yaml": schemas.EvalConfig}
HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
# Targets that hand their **kwargs on: the keys they accept are those of the callee too.
FORWARDS = {"medix.grpo.trainer.grpo_trainer": "lightning.Trainer"}
# Schema nodes whose every key is an object built by iterating over them (run.py: `cfg.callbacks.values()`).
ITERATED = {schemas.CallbacksConfig}
# Schema nodes without a `_target_` whose keys are handed, as a dict, to a class's constructor.
CONSUMERS = {schemas.VLLMServerOptions: "medix.rollout.vllm_server.VLLMServer",
             schemas.VLLMClientOptions: "medix.rollout.vllm_server.VLLMClient"}


def schema_of(path: Path):
    """The dataclass a conf/ file is checked against: a root's, or the `_schema_<kind>` first in its defaults."""
    if path.name in ROOTS and path.parent == CONF:
        return ROOTS[path.name]
    text = yaml.safe_load(path.read_text()) or {}
    for entry in text.get("defaults", []) if isinstance(text, dict) else []:
        if isinstance(entry, str) and entry.startswith("_schema_"):
            kind = entry.removeprefix("_schema_")
            group = path.parent.name
            if group == "judge":
                return judge_schemas.SCHEMAS[kind]
            return schemas.GROUP_SCHEMAS[group][kind]
        if isinstance(entry, str) and entry.startswith("_") and (path.parent / f"{entry}.yaml").is_file():
            return schema_of(path.parent / f"{entry}.yaml")  # a shared part of the group (reward/_components)
    return None


def resolve(name: str):
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def signature_defaults(target: str, medix_only: bool = False) -> dict:
    """The parameters of `target` that have defaults (a class: its constructor's, along the MRO when it forwards);
    medix_only: only those written in medix/ (a library's own defaults are its business)."""
    obj = resolve(target)
    found: dict = {}
    for fn in ([c.__init__ for c in obj.__mro__ if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]):
        if medix_only and not getattr(fn, "__module__", "").startswith("medix."):
            continue
        for name, p in inspect.signature(fn).parameters.items():
            if p.default is not inspect.Parameter.empty and name not in found:
                found[name] = p.default
    return found


def restated(value, default, path: str) -> list[str]:
    """Keys under `path` whose YAML value equals the schema default beside it (dicts compared key by key). Untyped
    nodes (`reward.components`, `benchmark.tasks`, a strategy's `_target_`) have no schema default: the keys written
    there are what can be set on the command line."""
    if isinstance(value, dict):
        if not isinstance(default, dict) or value.get("_target_", default.get("_target_")) != default.get("_target_"):
            return []
        return [p for key, v in value.items() if key not in HYDRA_KEYS and key != "defaults" and key in default
                for p in restated(v, default[key], f"{path}.{key}".lstrip("."))]
    if default is None and value is None:
        return [path]
    if value is None or default is None or isinstance(default, (dict, list)) != isinstance(value, (dict, list)):
        return []
    return [path] if value == default and type(value) is type(default) or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value == default) else []


def schema_defaults(schema) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(schema), resolve=False)


CHOICE_FILES = sorted(p for p in CONF.rglob("*.yaml") if schema_of(p) is not None)


def test_every_group_choice_names_its_schema():
    """Every choice of a typed group starts from its schema (so the checks below see every file)."""
    typed = set(schemas.GROUP_SCHEMAS) | {"judge"}
    untyped = [p.relative_to(CONF) for p in CONF.glob("*/*.yaml")
               if p.parent.name in typed and schema_of(p) is None
               and set(yaml.safe_load(p.read_text()) or {}) - {"defaults"}]
    assert untyped == [], f"choices without a _schema_ in their defaults: {untyped}"
    assert len(CHOICE_FILES) >= 40


@pytest.mark.parametrize("path", CHOICE_FILES, ids=lambda p: str(p.relative_to(CONF)))
def test_no_yaml_restates_a_schema_default(path):
    text = yaml.safe_load(path.read_text()) or {}
    own = {k: v for k, v in text.items() if k not in ("defaults", "hydra")}
    repeats = restated(own, schema_defaults(schema_of(path)), "")
    assert repeats == [], f"{path.relative_to(CONF)} restates its schema's defaults: {repeats} (medix/config.py)"


def test_the_restated_default_check_can_fail():
    """A YAML that repeats a default (and one that repeats a _target_'s own default) is caught; a change is not."""
    algorithm = schema_defaults(schemas.AlgorithmConfig)
    assert restated({"name": "x", "group_size": 4, "optimizer": {"lr": 1.0e-5}}, algorithm, "") == [
        "group_size", "optimizer.lr"]
    assert restated({"group_size": 5, "micro_batch_size": None, "clip_low": 0.3}, algorithm, "") == []
    assert restated({"dynamic_sampling": {"enabled": True, "max_tries": 20}}, algorithm, "") == [
        "dynamic_sampling.max_tries"]


def preset_settings(path: Path) -> set[tuple[str, str]]:
    """(dotted key, value) of every leaf a preset file sets itself (its defaults list aside)."""
    text = yaml.safe_load(path.read_text()) or {}
    text.pop("defaults", None)

    def leaves(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from leaves(value, f"{prefix}.{key}" if prefix else key)
        else:
            yield prefix, repr(node)

    return set(leaves(text, ""))


def test_no_preset_setting_is_repeated_across_presets():
    presets = sorted((CONF / "experiment").glob("paper_*.yaml"))
    assert len(presets) == 5
    seen: dict[tuple[str, str], str] = {}
    repeated = []
    for path in presets:
        for setting in preset_settings(path):
            if setting in seen:
                repeated.append((setting, seen[setting], path.stem))
            seen[setting] = path.stem
    assert repeated == [], f"settings repeated across presets (move them to conf/experiment/_paper.yaml): {repeated}"


# ---- every schema key has a reader ---------------------------------------------------------------------------
def schema_nodes():
    """Every schema dataclass reachable from the roots and the group schemas, once."""
    seen, order = set(), []
    todo = [*ROOTS.values(), *(s for group in schemas.GROUP_SCHEMAS.values() for s in group.values()),
            *judge_schemas.SCHEMAS.values()]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        order.append(node)
        for f in dataclasses.fields(node):
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                todo.append(f.default_factory)
            elif f.default_factory is not dataclasses.MISSING:
                made = f.default_factory()
                if dataclasses.is_dataclass(made):
                    todo.append(type(made))
    return sorted(order, key=lambda n: n.__name__)


def target_parameters(target: str) -> set[str] | None:
    """The keyword names `target` accepts; None when it takes **kwargs that go nowhere we can follow."""
    obj = resolve(target)
    names: set[str] = set()
    functions = [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]
    for fn in functions:
        params = inspect.signature(fn).parameters
        names |= set(params) - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return names
    if target in FORWARDS:
        return names | target_parameters(FORWARDS[target])
    return None


def medix_sources() -> str:
    return "\n".join(p.read_text() for p in (REPO / "medix").rglob("*.py") if p.name != "config.py")


def interpolated_keys() -> set[str]:
    texts = [p.read_text() for p in CONF.rglob("*.yaml")] + [(REPO / "medix" / "config.py").read_text()]
    return {m.split(".")[-1] for t in texts for m in re.findall(r"\$\{([\w.]+)\}", t)}


def unread_keys(node, sources: str, interpolated: set[str]) -> list[str]:
    if node in ITERATED:
        return []
    fields = [f.name for f in dataclasses.fields(node) if f.name not in HYDRA_KEYS]
    target = next((f.default for f in dataclasses.fields(node) if f.name == "_target_"), None)
    consumer = CONSUMERS.get(node, target)
    if isinstance(consumer, str) and not consumer.startswith("?"):
        accepted = target_parameters(consumer)
        if accepted is not None:
            return [f"{node.__name__}.{name}" for name in fields if name not in accepted]
    return [f"{node.__name__}.{name}" for name in fields
            if not re.search(rf"\.{name}\b|[\"']{name}[\"']", sources) and name not in interpolated]


def test_every_schema_key_has_a_reader():
    """A key with a `_target_` is an argument of it; any other key is read in medix/ (attribute or item) or
    interpolated in conf/."""
    sources, interpolated = medix_sources(), interpolated_keys()
    unread = [key for node in schema_nodes() for key in unread_keys(node, sources, interpolated)]
    assert unread == []


def test_the_reader_check_can_fail():
    @dataclasses.dataclass
    class Dead:
        _target_: str = "medix.rewards.embedding.EmbeddingReward"
        threshold: float = 0.5
        colour: str = "red"

    @dataclasses.dataclass
    class Plain:
        clip_low: float = 0.2
        never_read_anywhere_xyz: int = 0

    assert unread_keys(Dead, "", set()) == ["Dead.colour"]
    assert unread_keys(Plain, ".clip_low", set()) == ["Plain.never_read_anywhere_xyz"]


def test_constructor_defaults_agree_with_the_schema():
    """Where a class built from config also has a default for a key, it is the schema's (one value, not two)."""
    disagree = []
    for node in schema_nodes():
        target = CONSUMERS.get(node) or next((f.default for f in dataclasses.fields(node) if f.name == "_target_"),
                                             None)
        if not isinstance(target, str) or target.startswith("?"):
            continue
        defaults = signature_defaults(target, medix_only=True)
        for f in dataclasses.fields(node):
            if f.name in HYDRA_KEYS or f.name not in defaults or f.default in (dataclasses.MISSING, schemas.MISSING):
                continue
            if isinstance(f.default, str) and "${" in f.default:
                continue
            if f.default != defaults[f.name]:
                disagree.append(f"{node.__name__}.{f.name}: schema {f.default!r}, {target} {defaults[f.name]!r}")
    assert disagree == []
