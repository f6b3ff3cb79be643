"""Typed schemas of the config groups under conf/, registered in Hydra's ConfigStore.

Each `conf/<group>/<choice>.yaml` starts its defaults list with one of these (`_schema_<kind>`), so a misspelt or
unknown key fails when the config is composed, naming the key, and values are type-checked. `_target_` names what
`hydra.utils.instantiate` builds; every other field is an argument of it. Entry points call `register_configs()`
before `@hydra.main` composes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

MISSING = "???"  # omegaconf.MISSING: a value the config must set (the module stays importable without Hydra)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- backbone: the policy ---------------------------------------------------------------------------------------
@dataclass
class GGUFSpec:
    package: str = MISSING  # an installed Python package holding the file
    file: str = MISSING


@dataclass
class LoraSpec:
    """peft's LoraConfig; `backbone.lora: null` trains every weight instead (a full fine-tune)."""

    _target_: str = "peft.LoraConfig"
    _convert_: str = "all"  # target_modules as a plain list
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    task_type: str = "CAUSAL_LM"


@dataclass
class CausalLMBackbone:
    _target_: str = "medix.models.causal_lm.load_causal_lm"
    name: str = MISSING
    source: str = "hub"  # gguf_package | hub | local
    model: str = MISSING  # hub id or folder (source=gguf_package: the original's hub id, for reference)
    gguf: Optional[GGUFSpec] = None
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    adapter: Optional[str] = None  # a trained adapter/model folder to start from
    lora: Optional[LoraSpec] = field(default_factory=LoraSpec)
    cache_dir: str = "${paths.cache_dir}"


@dataclass
class QwenVLBackbone(CausalLMBackbone):
    _target_: str = "medix.models.qwen_vl.load_qwen_vl"
    dtype: str = "bfloat16"
    gradient_checkpointing: bool = True
    train_vision_tower: bool = True


@dataclass
class VisionSpec:
    image_size: int = 64
    patch_size: int = 16
    width: int = 128
    layers: int = 2
    heads: int = 4
    seed: int = 0


@dataclass
class TinyVLMBackbone(CausalLMBackbone):
    _target_: str = "medix.models.tiny_vlm.load_tiny_vlm"
    language_model: str = "smollm2_135m"  # cache folder name of the text model, shared with that backbone
    train_vision_tower: bool = True
    vision: VisionSpec = field(default_factory=VisionSpec)


# ---- reward, embedder -------------------------------------------------------------------------------------------
@dataclass
class DegenerateGuardConfig:
    """medix.rewards.guard: answers that score 0 on `components` (llm_judge by default) without calling them (counted in
    reward/guarded_share):
    truncated at the token cap without <answer>…</answer>, empty or form-only, tag soup, a repeated token or n-gram,
    an echo of the question or of a multiple-choice question's options, text addressed to the grader, a denial of
    the reference, a hedge, the reference set aside for another answer. The paper's own guard (empty, one character, `__`, `:`, `?`) always applies."""

    enabled: bool = True  # false: the paper's guard only (the paper presets)
    answer_block: bool = True  # no <answer>…</answer> in the completion: no judge call (false: judge the whole text)
    tag_share: float = 0.5  # tag soup: this share of the answer's non-space characters is <...> tags or stray < >
    max_repeats: int = 5  # repetition: a token or an n-gram of up to 3 tokens this many times in a row
    single_answer: bool = True  # two or more <answer> tags (several answers, or one and then junk): no judge call
    option_share: float = 0.5  # option echo: names >= 2 and at least this share of the question's options
    echo_share: float = 0.6  # question echo: repeats this share of the question's word 3-grams, adding no word
    grader_address: bool = True  # text for the grader: a verdict, a dictated YES, ground-truth lines, chat tokens,
    # the reference or the answer key named, an encoded message
    other_language: bool = True  # a clause in a language or script that neither the question nor the reference uses
    # (a plea to the grader in German or Chinese after an English answer)
    denial: bool = True  # the answer names a word of the reference only to deny it ("pneumothorax is ruled out")
    hedge_items: int = 6  # hedge: alternatives ("or") the reference lacks, a differential, or a list of more
    # items; 0 = off
    set_aside: bool = True  # the reference named only as a first thought, a distractor or a concession ("while x is
    # typical, ..."), and something else answered; or another answer committed to ("x fits, but the final answer is y")
    # the components a guarded completion scores 0 on, never called for it; add embedding so that garbage earns no
    # similarity either (experiments/reward_ablation: with the continuous embedding, garbage earned as much as the rest)
    components: list[str] = field(default_factory=lambda: ["llm_judge"])


@dataclass
class RewardConfig:
    _target_: str = "medix.rewards.composite.CompositeReward"
    _recursive_: bool = False  # only the components with a positive weight are built (no judge for embed_only)
    weights: dict[str, float] = field(default_factory=dict)
    components: dict[str, Any] = field(default_factory=dict)
    # medix | paper. paper: MediX-R1's medical.py exactly, whatever the judge config says: no degenerate guard, the
    # judge asked with medical.py's prompt on the raw answer (no delimiters, cleaning or cut), 4 tokens, 1 iff "YES"
    # is in the reply, a failed judge call 0. medix: the guard below, and the judge as conf/judge configures it
    # (delimited and cleaned prediction, judge.max_prediction_chars, judge.parser / judge.scoring, judge.on_failure).
    semantics: str = "medix"
    guard: DegenerateGuardConfig = field(default_factory=DegenerateGuardConfig)
    reasoning_tag: str = "${reasoning_tag}"  # the guard reads a cut-off completion by its open tags


@dataclass
class EmbedderConfig:
    _target_: str = "medix.rewards.embedding.Embedder"
    name: str = MISSING
    model: Optional[str] = None  # hub id (in the local HF cache) or folder
    package: Optional[str] = None  # or a package with get_model_path() (the bundled MiniLM)
    device: str = "auto"  # auto = this rank's GPU when there is one, else cpu
    batch_size: int = 64


# ---- data -------------------------------------------------------------------------------------------------------
@dataclass
class DatasetConfig:
    _target_: str = "medix.data.datamodule.PromptDataModule"
    name: str = MISSING
    path: Optional[str] = None
    hub_id: Optional[str] = None
    split: Optional[str] = None
    image_dir: Optional[str] = None
    val_size: Any = 16  # an int count or a float fraction in [0, 1)
    seed: int = "${seed}"  # type: ignore[assignment]
    on_bad_row: str = "error"
    min_pixels: int = 262144
    max_pixels: int = 4194304
    batch_size: int = "${algorithm.prompts_per_step}"  # type: ignore[assignment]
    val_batch_size: int = 8
    num_workers: int = 0


# ---- algorithm, rollout -----------------------------------------------------------------------------------------
@dataclass
class DynamicSampling:
    enabled: bool = False
    min_mean: float = 0.01
    max_mean: float = 0.99
    max_tries: int = 20


@dataclass
class MismatchCorrection:
    """Truncated importance sampling for the gap between the engine's sampling distribution and the trainer's (TRL's
    vllm_importance_sampling_*): each completion's policy-gradient term is weighted by pi_trainer / pi_engine of its
    tokens, and weights outside [clip_min, clip_max] are masked to 0 (`*_mask`) or clipped (`*_truncate`). pi_engine
    is the engine's own log-probs of what it sampled, so the weight covers both the engine/trainer numerical mismatch
    and the policy lag of asynchronous rollouts (rollout.max_staleness >= 1). Modes: token_truncate = verl's Token-TIS,
    sequence_truncate = Seq-TIS, sequence_mask = Seq-MIS (TRL's default, cap 3), token_mask = a per-token mask like
    prime-rl's. Needs an engine that reports its sampling log-probs (rollout=vllm)."""

    enabled: bool = False
    mode: str = "sequence_mask"  # sequence_mask | sequence_truncate | token_mask | token_truncate
    clip_max: Optional[float] = 3.0
    clip_min: Optional[float] = None


@dataclass
class OptimizerConfig:
    """The policy's optimizer, made by GRPOModule.configure_optimizers for the trainable parameters (`_partial_`);
    another one: `algorithm.optimizer._target_=torch.optim.SGD` (its own keys with `+algorithm.optimizer.<key>=`)."""

    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 1.0e-5
    weight_decay: float = 0.01


@dataclass
class SamplingConfig:
    """How the rollout engine samples completions (medix.rollout.base.Sampling)."""

    _target_: str = "medix.rollout.base.Sampling"
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    min_new_tokens: int = 0


@dataclass
class AlgorithmConfig:
    """A GRPO-family algorithm: the defaults are EasyR1's (MediX-R1's trainer) at CPU-friendly run sizes; each
    conf/algorithm choice says what it changes."""

    name: str = MISSING
    group_size: int = 4  # completions per prompt
    prompts_per_step: int = 2  # per rank
    clip_low: float = 0.2
    clip_high: float = 0.2
    aggregation: str = "token_mean"  # sequence_mean | token_mean | constant
    importance: str = "token"  # token | sequence (GSPO)
    beta: float = 0.0  # KL coefficient (k3 estimator); 0 = no reference forward
    advantage_scale: str = "group"  # group | batch | none
    eps: float = 1.0e-6
    num_iterations: int = 1  # passes over each rollout
    mini_batch_size: int = 8  # completions per optimizer step (per rank)
    # rows per forward/backward; a mini-batch's gradients add up over them (EasyR1's
    # micro_batch_size_per_device_for_update, default 4); null = the whole mini-batch
    micro_batch_size: Optional[int] = 4
    dynamic_sampling: DynamicSampling = field(default_factory=DynamicSampling)
    mask_truncated: bool = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    warmup_steps: int = 0  # linear learning-rate warm-up over this many optimizer steps
    max_grad_norm: float = 1.0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    mismatch_correction: MismatchCorrection = field(default_factory=MismatchCorrection)


@dataclass
class HFRollout:
    _target_: str = "medix.rollout.hf.HFEngine"
    share_prompt_cache: bool = True  # prefill each distinct prompt once and copy its KV cache to the group
    cache_implementation: Optional[str] = None  # transformers' generate(cache_implementation=...), e.g. static
    max_staleness: int = 0  # 0 only: generate samples from the trainer's own model (asynchronous: rollout=vllm)
    merge_lora: bool = True  # sample with each LoRA adapter folded into a temporary copy of its layer's weight


@dataclass
class VLLMServerOptions:
    """medix.rollout.vllm_server.VLLMServer's settings (a server medix starts)."""

    python: Optional[str] = None  # the interpreter with vllm; null = <repo>/.venv-vllm (MEDIX_VLLM=1 scripts/setup.sh)
    dtype: str = "float32"  # float32 on the CPU: its log-probs equal the trainer's to ~1e-5 (bf16: ~0.05)
    max_model_len: int = 2048
    max_lora_rank: Optional[int] = None  # at least backbone.lora.r (taken when larger)
    kv_cache_space_gib: float = 2.0
    cpu_threads_bind: Optional[str] = "auto"  # VLLM_CPU_OMP_THREADS_BIND; auto = every core of this process
    block_size: int = 32  # small blocks let a prompt's G children share its prefill
    # a vision-language policy's most images in one prompt (vLLM's limit_mm_per_prompt); null: 1 for a VLM policy
    images_per_prompt: Optional[int] = None
    startup_timeout_s: float = 600.0
    seed: int = "${seed}"  # type: ignore[assignment]
    log_path: Optional[str] = None  # null = a file under the sync folder


@dataclass
class VLLMClientOptions:
    timeout_s: float = 600.0
    max_retries: int = 3
    max_concurrency: int = 16


@dataclass
class VLLMRollout:
    _target_: str = "medix.rollout.vllm.VLLMEngine"
    base_url: Optional[str] = None  # a server you run (http://host:port/v1); null = medix starts one
    model_name: str = "policy"  # the name the server serves the base model under
    adapter_name: str = "medix-policy"  # the LoRA adapter's name on the server (replaced in place every step)
    sync_dir: str = "${paths.output_dir}/rollout_sync"  # where the adapter or the weights are written for the server
    max_restarts: int = 2  # a server medix started that dies is restarted (and re-synced) this many times
    placeholder_logit_bias: float = -100.0  # on a VLM's image/video placeholder tokens: never sampled (EasyR1's)
    # 0: the synchronous step. k >= 1: a thread samples and scores the next k steps' batches while the trainer
    # updates; no sample more than k policy versions old is trained on (medix.grpo.producer)
    max_staleness: int = 0
    server: VLLMServerOptions = field(default_factory=VLLMServerOptions)
    client: VLLMClientOptions = field(default_factory=VLLMClientOptions)


# ---- trainer, logger, callbacks ---------------------------------------------------------------------------------
@dataclass
class TrainerConfig:
    _target_: str = "medix.grpo.trainer.grpo_trainer"
    max_steps: Optional[int] = 8  # GRPO steps (one rollout and its updates each); null = until max_epochs ends
    max_epochs: Optional[int] = 1000
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: Any = "32-true"
    val_check_interval: Optional[int] = 4  # validate every N GRPO steps (and at the last one); null = never
    default_root_dir: str = "${paths.output_dir}"


@dataclass
class MLflowLoggerConfig:
    _target_: str = "medix.tracking.mlflow_run.ResumableMLFlowLogger"
    experiment_name: str = "medix"
    tracking_uri: str = "sqlite:///mlflow.db"


@dataclass
class CheckpointCallback:
    _target_: str = "medix.grpo.callbacks.GRPOCheckpoint"
    dirpath: str = "${paths.output_dir}/checkpoints"
    every_n_steps: int = 0  # 0 = only at the end (and after a judge error)


@dataclass
class FinalModelCallback:
    _target_: str = "medix.grpo.callbacks.SaveTrainedPolicy"
    dirpath: str = "${paths.output_dir}"  # adapter/ (LoRA) or model/ (full fine-tune) inside it


@dataclass
class WarmStartCallback:
    _target_: str = "medix.grpo.warm_start.WarmStart"
    # Supervised steps on the training answers written in the required form, before GRPO: SmolLM2-135M never writes
    # the tags by itself, so format and modality would give GRPO no signal. 0 = off, as in the paper (its presets).
    steps: int = 6
    lr: float = 1.0e-3
    batch_size: int = 4
    thinking: str = "The question and the findings point to this answer."
    reasoning_tag: str = "${reasoning_tag}"
    seed: int = "${seed}"  # type: ignore[assignment]


@dataclass
class SampleTablesCallback:
    _target_: str = "medix.tracking.callbacks.SampleTables"
    every_n_steps: int = 5  # 0 = never


@dataclass
class RewardHackingCallback:
    _target_: str = "medix.tracking.callbacks.RewardHackingAlerts"
    window: int = 10
    jump: float = 0.2
    stall: float = 0.02
    # the format reward's mean over the last `window` steps falls below (1 - format_drop) x its peak; null = off
    format_drop: Optional[float] = 0.5
    # reward/guarded_share averaged over the last `window` steps reaches this; null = off
    max_guarded_share: Optional[float] = 0.3


@dataclass
class PlainCallback:
    _target_: str = MISSING


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointCallback = field(default_factory=CheckpointCallback)
    final_model: FinalModelCallback = field(default_factory=FinalModelCallback)
    warm_start: WarmStartCallback = field(default_factory=WarmStartCallback)
    samples: SampleTablesCallback = field(default_factory=SampleTablesCallback)
    reward_hacking: RewardHackingCallback = field(default_factory=RewardHackingCallback)
    judge_stats: PlainCallback = field(default_factory=lambda: PlainCallback("medix.tracking.callbacks.JudgeStats"))
    progress: PlainCallback = field(default_factory=lambda: PlainCallback("medix.grpo.callbacks.GRPOProgressBar"))
    summary: PlainCallback = field(default_factory=lambda: PlainCallback("medix.tracking.callbacks.RunSummary"))


# ---- the LightningModule -----------------------------------------------------------------------------------------
@dataclass
class ModuleConfig:
    """medix.grpo.module.GRPOModule; run.py passes it the built backbone, rollout engine and rewards."""

    _target_: str = "medix.grpo.module.GRPOModule"
    _convert_: str = "object"  # the algorithm arrives as an AlgorithmConfig, its optimizer and sampling built
    algorithm: Any = "${algorithm}"
    reasoning_tag: str = "${reasoning_tag}"
    seed: int = "${seed}"  # type: ignore[assignment]


# ---- roots ------------------------------------------------------------------------------------------------------
@dataclass
class Paths:
    cache_dir: str = "${oc.env:MEDIX_CACHE_DIR,${oc.env:HOME}/.cache/medix}"  # converted models, rebuilt GGUFs, the
    # judge cache, server logs
    output_dir: str = MISSING  # where a run writes checkpoints and its trained policy


@dataclass
class TrainConfig:
    backbone: Any = MISSING
    reward: Any = MISSING
    judge: Any = MISSING
    embedder: Any = MISSING
    dataset: Any = MISSING
    algorithm: Any = MISSING
    rollout: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    module: ModuleConfig = field(default_factory=ModuleConfig)
    paths: Paths = field(default_factory=Paths)
    # Validation with another reward than training's (e.g. every mix of an ablation judged by the composite):
    # `+reward@val_reward=composite`; null = the training reward.
    val_reward: Any = None
    reasoning_tag: str = "thinking"  # read by both the prompt template and the reward (the paper's text says `think`)
    seed: int = 0
    optimize_metric: Optional[str] = "val/reward/llm_judge/mean"  # what a job returns to a sweep (conf/hparams_search)
    resume: Optional[str] = None  # a checkpoint (.ckpt) or a run folder to continue from, into the same MLflow run
    verbose: bool = False  # true: every library's log lines and warnings (HTTP requests, FutureWarnings, tips)


@dataclass
class ScoreConfig:
    reward: Any = MISSING
    judge: Any = MISSING
    embedder: Any = MISSING
    paths: Paths = field(default_factory=Paths)
    input: Optional[str] = None
    output: Optional[str] = None
    reasoning_tag: str = "thinking"


# ---- evaluation (conf/eval.yaml) --------------------------------------------------------------------------------
@dataclass
class BenchmarkConfig:
    """A benchmark choice (conf/benchmark): its tasks, and where their items come from."""

    name: Optional[str] = None  # benchmark=local: the task's name in results; null = the file's folder name or stem
    tasks: dict[str, Any] = field(default_factory=dict)  # task name -> source, folder, hub, fields, filter, scoring, ...
    data_dir: Optional[str] = None  # read each paper task from <data_dir>/<folder>/test.jsonl instead of the hub
    path: Optional[str] = None  # benchmark=local: the JSONL file to evaluate
    limit: Optional[int] = None  # first N items per task (small runs)
    missing: str = "error"  # a task with no local file under data_dir: error | skip


@dataclass
class EvalModelConfig:
    kind: str = "backbone"  # backbone (cfg.backbone, greedy on this machine) | endpoint (OpenAI-compatible chat)
    adapter: Optional[str] = None  # a PEFT adapter folder saved by a medix run (<run>/adapter), kind=backbone only
    base_url: Optional[str] = None  # kind=endpoint: e.g. http://127.0.0.1:8005/v1
    name: Optional[str] = None  # kind=endpoint: the served model name
    api_key: str = "${oc.env:MEDIX_MODEL_API_KEY,EMPTY}"
    timeout_s: float = 600.0
    max_retries: int = 2
    send_images: bool = True  # kind=endpoint: attach item images (false for a text-only server)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256  # the paper uses 2048; smaller keeps CPU runs short
    batch_size: int = 4  # items generated per step (backbone: one padded batch; endpoint: sent together)
    max_concurrency: int = 8  # kind=endpoint: requests in flight
    use_training_prompt: bool = False  # true: the training template instead of the raw question


@dataclass
class JudgeProtocolConfig:
    """medix.eval.judging.ProtocolSettings: how the reference-based judge is asked (conf/eval.yaml explains each)."""

    _target_: str = "medix.eval.judging.ProtocolSettings"
    prompt: str = "paper"  # paper | judge
    rounds: int = 3
    max_parse_retries: int = 2
    parse_failure_score: float = 0.0
    max_tokens: int = 512
    prompt_suffix: str = " /no_think"


@dataclass
class EvalOutput:
    output_dir: str = "${paths.output_dir}/eval"  # per-task items.jsonl; rerun with the same folder to resume
    experiment: str = "medix-eval"  # MLflow experiment (logger.tracking_uri)
    run_name: Optional[str] = None


@dataclass
class EvalConfig:
    backbone: Any = MISSING
    judge: Any = MISSING
    benchmark: Any = MISSING
    logger: Any = MISSING
    rollout: Any = None  # null = HF generate; vllm = the rollout engine training uses
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge_protocol: JudgeProtocolConfig = field(default_factory=JudgeProtocolConfig)
    eval: EvalOutput = field(default_factory=EvalOutput)
    compare: Any = None  # a list of MLflow run ids, or {experiment: <name>}: compare finished runs instead
    paths: Paths = field(default_factory=Paths)
    reasoning_tag: str = "thinking"  # predictions are cut after its last closing tag (and </think>)
    seed: int = 0  # the vLLM server's sampling seed with rollout=vllm (rollout.server.seed)


GROUP_SCHEMAS = {
    "backbone": {"causal_lm": CausalLMBackbone, "qwen_vl": QwenVLBackbone, "tiny_vlm": TinyVLMBackbone},
    "reward": {"reward": RewardConfig},
    "embedder": {"embedder": EmbedderConfig},
    "dataset": {"dataset": DatasetConfig},
    "algorithm": {"algorithm": AlgorithmConfig},
    "rollout": {"hf": HFRollout, "vllm": VLLMRollout},
    "trainer": {"trainer": TrainerConfig},
    "logger": {"mlflow": MLflowLoggerConfig},
    "benchmark": {"benchmark": BenchmarkConfig},
}


def register_configs() -> None:
    """Store every schema: group schemas as `<group>/_schema_<kind>`, the roots as `_train_schema`, `_score_schema`
    and `_eval_schema`."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, schemas in GROUP_SCHEMAS.items():
        for kind, node in schemas.items():
            cs.store(group=group, name=f"_schema_{kind}", node=node)
    cs.store(name="_train_schema", node=TrainConfig)
    cs.store(name="_score_schema", node=ScoreConfig)
    cs.store(name="_eval_schema", node=EvalConfig)
    try:  # TODO(integration): required once medix/judges/config.py lands
        from medix.judges.config import register as register_judges
    except ModuleNotFoundError:
        return
    register_judges(cs)
