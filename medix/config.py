"""Typed schemas of the config groups under conf/, registered in Hydra's ConfigStore.

Each `conf/<group>/<choice>.yaml` starts its defaults list with one of these (`_schema_<kind>`), so a misspelt or
unknown key fails when the config is composed, naming the key, and values are type-checked. `_target_` names what
`hydra.utils.instantiate` builds; every other field is an argument of it. Entry points call `register_configs()`
before `@hydra.main` composes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- backbone: the policy ---------------------------------------------------------------------------------------
@dataclass
class GGUFSpec:
    package: str = MISSING  # an installed Python package holding the file
    file: str = MISSING


@dataclass
class LoraSpec:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


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
    lora: LoraSpec = field(default_factory=LoraSpec)
    cache_dir: str = "${paths.cache_dir}"


@dataclass
class QwenVLBackbone(CausalLMBackbone):
    _target_: str = "medix.models.qwen_vl.load_qwen_vl"
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
class RewardConfig:
    _target_: str = "medix.rewards.composite.CompositeReward"
    _recursive_: bool = False  # only the components with a positive weight are built (no judge for embed_only)
    weights: dict[str, float] = field(default_factory=dict)
    components: dict[str, Any] = field(default_factory=dict)


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
    """Truncated importance sampling for the engine/trainer mismatch (TRL's vllm_importance_sampling_*): each
    completion's policy-gradient term is weighted by pi_trainer / pi_engine of its tokens, and weights outside
    [clip_min, clip_max] are masked to 0 (`*_mask`) or clipped (`*_truncate`). Needs an engine that reports its
    sampling log-probs (rollout=vllm)."""

    enabled: bool = False
    mode: str = "sequence_mask"  # sequence_mask | sequence_truncate | token_mask | token_truncate
    clip_max: Optional[float] = 3.0
    clip_min: Optional[float] = None


@dataclass
class AlgorithmConfig:
    name: str = MISSING
    group_size: int = 4
    prompts_per_step: int = 2
    clip_low: float = 0.2
    clip_high: float = 0.2
    aggregation: str = "token_mean"  # sequence_mean | token_mean | constant
    importance: str = "token"  # token | sequence (GSPO)
    beta: float = 0.0
    advantage_scale: str = "group"  # group | batch | none
    eps: float = 1.0e-6
    num_iterations: int = 1
    mini_batch_size: int = 8
    micro_batch_size: Optional[int] = 4
    dynamic_sampling: DynamicSampling = field(default_factory=DynamicSampling)
    mask_truncated: bool = False
    lr: float = 1.0e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    mismatch_correction: MismatchCorrection = field(default_factory=MismatchCorrection)


@dataclass
class HFRollout:
    _target_: str = "medix.rollout.hf.HFEngine"
    share_prompt_cache: bool = True  # prefill each distinct prompt once and copy its KV cache to the group
    cache_implementation: Optional[str] = None  # transformers' generate(cache_implementation=...), e.g. static


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
    images_per_prompt: int = 1  # a vision-language policy's most images in one prompt (vLLM's limit_mm_per_prompt)
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
    steps: int = 0  # supervised steps on the training answers in the required form before GRPO; 0 = off
    lr: float = 1.0e-4
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


# ---- roots ------------------------------------------------------------------------------------------------------
@dataclass
class Paths:
    cache_dir: str = MISSING  # converted models, rebuilt GGUFs, the judge cache, server logs
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
    paths: Paths = field(default_factory=Paths)
    # Validation with another reward than training's (e.g. every mix of an ablation judged by the composite):
    # `+reward@val_reward=composite`; null = the training reward.
    val_reward: Any = None
    reasoning_tag: str = "thinking"
    seed: int = 0
    optimize_metric: Optional[str] = None
    resume: Optional[str] = None
    verbose: bool = False


@dataclass
class ScoreConfig:
    reward: Any = MISSING
    judge: Any = MISSING
    embedder: Any = MISSING
    paths: Paths = field(default_factory=Paths)
    input: Optional[str] = None
    output: Optional[str] = None
    reasoning_tag: str = "thinking"


GROUP_SCHEMAS = {
    "backbone": {"causal_lm": CausalLMBackbone, "qwen_vl": QwenVLBackbone, "tiny_vlm": TinyVLMBackbone},
    "reward": {"reward": RewardConfig},
    "embedder": {"embedder": EmbedderConfig},
    "dataset": {"dataset": DatasetConfig},
    "algorithm": {"algorithm": AlgorithmConfig},
    "rollout": {"hf": HFRollout, "vllm": VLLMRollout},
    "trainer": {"trainer": TrainerConfig},
    "logger": {"mlflow": MLflowLoggerConfig},
}


def register_configs() -> None:
    """Store every schema: group schemas as `<group>/_schema_<kind>`, the roots as `_train_schema`/`_score_schema`."""
    cs = ConfigStore.instance()
    for group, schemas in GROUP_SCHEMAS.items():
        for kind, node in schemas.items():
            cs.store(group=group, name=f"_schema_{kind}", node=node)
    cs.store(name="_train_schema", node=TrainConfig)
    cs.store(name="_score_schema", node=ScoreConfig)
    try:  # TODO(integration): required once medix/judges/config.py lands
        from medix.judges.config import register as register_judges
    except ModuleNotFoundError:
        return
    register_judges(cs)


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
