"""One evaluation: load tasks, generate what is missing, judge what is unjudged, aggregate, report, log."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from medix.errors import ConfigError, MedixError
from medix.eval.items import BenchmarkItem
from medix.eval.judge_protocol import names_several_options
from medix.eval.judging import ConversationJudge, ProtocolSettings, RuleVerdicts
from medix.eval.results import TaskResults, results_markdown, summary_metrics
from medix.eval.tasks import TaskSpec, load_task, task_specs

MODEL_KINDS = ("backbone", "endpoint")


@dataclass
class LoadedTask:
    spec: TaskSpec
    items: list[BenchmarkItem]
    modality: str
    store: TaskResults

    def unjudged(self) -> list[BenchmarkItem]:
        return [it for it in self.items if it.id not in self.store.items]


@dataclass
class EvalOutcome:
    metrics: dict[str, float]
    markdown: str
    output_dir: Path  # results.md and each task's items.jsonl
    item_files: dict[str, Path]  # task name -> its items.jsonl
    run_id: str | None = None  # the MLflow run medix.evaluate logged it to


def check_model_config(cfg: DictConfig) -> None:
    kind = cfg.model.kind
    if kind not in MODEL_KINDS:
        raise ConfigError(f"model.kind={kind!r}; expected one of {MODEL_KINDS}")
    if kind == "endpoint":
        for key in ("base_url", "name"):
            if not cfg.model.get(key):
                raise ConfigError(f"model.kind=endpoint needs model.{key} (an OpenAI-compatible server and its model)")


def load_tasks(cfg: DictConfig, output_dir: Path) -> list[LoadedTask]:
    if cfg.benchmark.missing not in ("error", "skip"):
        raise ConfigError(f"benchmark.missing={cfg.benchmark.missing!r}; expected error or skip")
    tasks = []
    for spec in task_specs(cfg.benchmark):
        loaded = load_task(spec, cfg.benchmark)
        if loaded is None:
            print(f"skipping {spec.name}: no local file under benchmark.data_dir={cfg.benchmark.data_dir}")
            continue
        items, modality = loaded
        tasks.append(LoadedTask(spec, items, modality, TaskResults(output_dir, spec.name)))
    if not tasks:
        raise MedixError("no benchmark task has items to evaluate (all skipped)")
    return tasks


def build_generator(cfg: DictConfig):
    """The model under test; the backbone is loaded only when some item still lacks a prediction."""
    gen = cfg.generation
    if cfg.model.kind == "endpoint":
        from medix.eval.generation import EndpointGenerator

        return EndpointGenerator(cfg.model.base_url, cfg.model.name, cfg.model.api_key,
                                 max_new_tokens=gen.max_new_tokens, max_concurrency=gen.max_concurrency,
                                 timeout_s=cfg.model.timeout_s, max_retries=cfg.model.max_retries,
                                 send_images=cfg.model.send_images)
    from medix.instantiate import build
    from medix.eval.generation import BackboneGenerator

    backbone_cfg = cfg.backbone.copy()
    if cfg.model.get("adapter"):  # the loader applies it (LoRA weights, and the tiny_vlm vision tower)
        backbone_cfg.adapter = cfg.model.adapter
    backbone = build(backbone_cfg)
    options = dict(max_new_tokens=gen.max_new_tokens, reasoning_tag=cfg.reasoning_tag,
                   use_training_prompt=gen.use_training_prompt)
    if cfg.get("rollout") is not None:  # rollout=vllm: the answers come from the engine training samples with
        from medix.eval.generation import EngineGenerator

        return EngineGenerator(backbone, build(cfg.rollout), **options)
    return BackboneGenerator(backbone, **options)


def evaluation_judge(client, cfg: DictConfig) -> ConversationJudge | RuleVerdicts:
    """The paper's conversation on an LLM judge client; one verdict per item for a judge without chat turns (rule)."""
    from medix.instantiate import build

    if hasattr(client, "areply"):
        settings: ProtocolSettings = build(cfg.judge_protocol)
        return ConversationJudge(client, settings, cfg.reasoning_tag)
    return RuleVerdicts(client, cfg.reasoning_tag)


def first_medix_error(group: BaseExceptionGroup) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = first_medix_error(exc)
        if isinstance(exc, MedixError):
            return exc
    return group.exceptions[0]


async def evaluate_task(task: LoadedTask, generator, judge, batch_size: int) -> None:
    """Generate missing predictions chunk by chunk while earlier chunks are judged; append each result at once. An
    item whose judge request failed (judge.on_failure=exclude) is not saved, so a rerun judges it. A multiple-choice
    prediction that names several options scores 0 without a judge call (`option_echo` in its row)."""
    store = task.store

    async def judge_one(item: BenchmarkItem, prediction: str) -> None:
        if names_several_options(prediction, item.choices, judge.reasoning_tag):
            store.add_item({"id": item.id, "question": item.question, "reference": item.reference,
                            "prediction": prediction, "round_scores": [], "replies": [], "score": 0.0,
                            "parse_failures": 0, "unparsed_replies": 0, "option_echo": True})
            return
        verdict = await judge.judge(task.spec.scoring, item.question, item.reference, prediction)
        if verdict is None:
            return
        row = {"id": item.id, "question": item.question, "reference": item.reference, "prediction": prediction,
               "round_scores": verdict.round_scores, "replies": verdict.replies, "score": verdict.score,
               "parse_failures": verdict.parse_failures, "unparsed_replies": verdict.unparsed_replies}
        if verdict.judge_failed:
            row["judge_failed"] = True
        store.add_item(row)

    pending = task.unjudged()
    to_generate = [it for it in pending if it.id not in store.predictions]
    async with asyncio.TaskGroup() as group:
        for item in pending:
            if item.id in store.predictions:
                group.create_task(judge_one(item, store.predictions[item.id]))
        for start in range(0, len(to_generate), batch_size):
            chunk = to_generate[start:start + batch_size]
            if asyncio.iscoroutinefunction(generator.generate):
                predictions = await generator.generate(chunk)
            else:
                predictions = await asyncio.to_thread(generator.generate, chunk)
            for item, prediction in zip(chunk, predictions):
                store.add_prediction(item.id, prediction)
                group.create_task(judge_one(item, prediction))


def run_evaluation(cfg: DictConfig) -> EvalOutcome:
    from medix.instantiate import build

    check_model_config(cfg)
    output_dir = Path(cfg.eval.output_dir)
    tasks = load_tasks(cfg, output_dir)
    started = time.perf_counter()
    judge_metrics: dict[str, float] = {}
    if any(t.unjudged() for t in tasks):
        needs_generation = any(it.id not in t.store.predictions for t in tasks for it in t.unjudged())
        generator = build_generator(cfg) if needs_generation else None
        with build(cfg.judge) as client:
            judge = evaluation_judge(client, cfg)

            async def main() -> None:
                try:
                    for task in tasks:
                        if task.unjudged():
                            print(f"{task.spec.name}: {len(task.unjudged())} of {len(task.items)} items to evaluate")
                            await evaluate_task(task, generator, judge, cfg.generation.batch_size)
                except BaseExceptionGroup as group:
                    raise first_medix_error(group) from None

            try:
                asyncio.run(main())
            finally:
                if hasattr(generator, "close"):  # a rollout engine's server stops with the evaluation
                    generator.close()
            judge_metrics = judge.metrics()
    unjudged = sum(len(t.unjudged()) for t in tasks)
    if unjudged:
        print(f"{unjudged} items are not judged (judge failures, judge.on_failure=exclude); rerun to judge them")
    modalities = {t.spec.name: t.modality for t in tasks}
    rows = {t.spec.name: [t.store.items[it.id] for it in t.items if it.id in t.store.items] for t in tasks}
    metrics = {**summary_metrics(rows, modalities), **judge_metrics, "eval/unjudged": float(unjudged),
               "time/eval_s": time.perf_counter() - started}
    model_name = cfg.model.name if cfg.model.kind == "endpoint" else cfg.backbone.name
    markdown = results_markdown(metrics, modalities, title=f"{model_name} (judge: {cfg.judge.get('model')})")
    (output_dir / "results.md").write_text(markdown, encoding="utf-8")
    return EvalOutcome(metrics, markdown, output_dir, {t.spec.name: t.store.items_path for t in tasks})
