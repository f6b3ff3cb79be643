"""The GRPO-family training step as a LightningModule: rollout → reward → advantages → clipped policy updates."""

from __future__ import annotations

import copy
import logging
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import ParallelStrategy

from medix.data.datamodule import PromptBatch
from medix.errors import ConfigError, MedixError
from medix.grpo.logprobs import completion_logprobs
from medix.grpo.plan import MicroBatch, padded_plan, passes_per_step, update_plan
from medix.grpo.producer import Produced, RolloutProducer, position_seed
from medix.memory import UPDATE_HEAP_BYTES, freed_memory_returned
from medix.grpo.losses import (dapo_group_filter, frac_reward_zero_std, group_advantages, loss_denominator,
                               mismatch_weights, policy_loss)
from medix.models.base import can_share_prompt, native_gqa_attention
from medix.models.lora import fused_lora
from medix.models.prefix import SharedPrefix, common_prefix, shared_prefix
from medix.models.sharding import is_sharded, run_as_forward, save_full_pretrained, shard_model
from medix.rewards.composite import RewardBatch
from medix.rewards.statistics import RewardStatistics
from medix.rollout.base import Rollout, Sampling, concat_rollouts, select_rows


log = logging.getLogger(__name__)


@dataclass
class Scored:
    """Prompts, their G completions each (consecutive rows), and every reward of every completion (`rewards`, which
    waits for them when they are still being computed in the background); `timings`: the seconds its rollout and
    reward took where they ran in the producer's thread (max_staleness >= 1)."""

    prompts: PromptBatch
    rollout: Rollout
    scores: RewardBatch | Future
    group_size: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def rewards(self) -> RewardBatch:
        if isinstance(self.scores, Future):
            self.scores = self.scores.result()
        return self.scores

    @property
    def overall(self) -> torch.Tensor:
        """The overall reward per completion; NaN where it was not scored (a judge failure, left out)."""
        return scores_of(self.rewards, "overall")

    def groups(self, groups: list[int]) -> "Scored":
        rows = [g * self.group_size + j for g in groups for j in range(self.group_size)]
        return Scored(self.prompts.select(groups), select_rows(self.rollout, rows), self.rewards.select(rows),
                      self.group_size)

    @staticmethod
    def concat(parts: list["Scored"], pad_token_id: int) -> "Scored":
        return Scored(PromptBatch.concat([p.prompts for p in parts]),
                      concat_rollouts([p.rollout for p in parts], pad_token_id),
                      RewardBatch.concat([p.rewards for p in parts]), parts[0].group_size)


class GRPOModule(L.LightningModule):
    """One training step = one GRPO step: `prompts_per_step` prompts × `group_size` completions, scored, and the
    policy updated in mini-batches. Logs `reward/<c>/mean|std`, `loss`, `kl`, `clip_ratio`, `entropy`, ..."""

    def __init__(self, backbone, engine, reward, *, algorithm, reasoning_tag: str, seed: int, val_reward=None):
        """`algorithm`: the built `algorithm` node (medix.config.AlgorithmConfig with `optimizer` a partial of the
        optimizer class and `sampling` a Sampling), as `hydra.utils.instantiate(cfg.module, ...)` gives it."""
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trainable weights (with LoRA: the adapter)
        self.backbone = backbone
        self.model = backbone.model
        self.engine = engine
        self.reward = reward
        self.val_reward = val_reward if val_reward is not None else reward
        self.algo = algorithm
        micro = getattr(algorithm, "micro_batch_size", None)
        if micro is not None and (not isinstance(micro, int) or isinstance(micro, bool) or micro < 1):
            raise ConfigError(f"algorithm.micro_batch_size={micro!r}; expected an integer >= 1 or null (the whole "
                              "mini-batch)")
        self.reasoning_tag = reasoning_tag
        self.sampling: Sampling = algorithm.sampling
        self.loss_settings = dict(clip_low=algorithm.clip_low, clip_high=algorithm.clip_high,
                                  aggregation=algorithm.aggregation, importance=algorithm.importance,
                                  beta=algorithm.beta, max_completion_length=self.sampling.max_new_tokens)
        self.grpo_step = 0
        self.seed = seed
        self.refill_rng = random.Random(seed)
        # rollout.max_staleness >= 1: a producer thread samples and scores ahead of the trainer (on_train_start)
        self.max_staleness = getattr(engine, "max_staleness", 0)
        self.producer: RolloutProducer | None = None
        # The KL reference: with LoRA the adapter switched off (no copy); a full fine-tune keeps a frozen copy, made
        # before any sharding and kept out of the registered modules (so out of every checkpoint).
        reference = None
        if algorithm.beta > 0 and not backbone.uses_lora:
            reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        object.__setattr__(self, "ref_model", reference)
        self.sampled_rewards = RewardStatistics(reward.names)
        self.kept_rewards = RewardStatistics(reward.names)
        self.val_rewards = RewardStatistics(self.val_reward.names)
        self.reward_thread = ThreadPoolExecutor(1, thread_name_prefix="medix-reward")
        self.timings: dict[str, float] = {}
        self._step_start_state = None  # the RNG states at the start of the running step (what a resume redoes)
        self._resumed_rng = None

    # ---- placement and optimisation -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """trainer=fsdp: FSDP2 shards the policy and the frozen reference per decoder layer (and vision block) over
        the data-parallel ranks; Lightning calls this before the optimizer is made."""
        if self.device_mesh is None or is_sharded(self.model):
            return
        policy = getattr(self.trainer.strategy, "mp_policy", None)
        shard_model(self.model, self.device_mesh, mp_policy=policy)
        if self.ref_model is not None:
            shard_model(self.ref_model, self.device_mesh, mp_policy=policy)

    def on_fit_start(self) -> None:
        native_gqa_attention(self.device)
        if self.ref_model is not None and not is_sharded(self.ref_model):
            dtype = next(self.model.parameters()).dtype
            self.ref_model.to(device=self.device, dtype=dtype)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.algo.optimizer(params)
        warmup = max(int(self.algo.warmup_steps), 0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        return [optimizer], [schedule]

    # ---- the step -----------------------------------------------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int):
        started = time.perf_counter()
        self._step_start_state = (rng_state(), self.refill_rng.getstate())
        self.timings = {"rollout": 0.0, "reward": 0.0}
        if self.producer is None:  # synchronous: sample, score, update, sync
            sampled, trained = self.collect(batch)  # rollout → reward; DAPO keeps informative groups and refills
            lag: dict[str, float] = {}
        else:  # the producer sampled and scored this step's batch while the trainer updated the last one
            sampled, trained = self.collect_ahead(batch)
            lag = self.lag_metrics(sampled)
        metrics = self.update(trained)  # advantages, then the clipped policy-gradient mini-batch updates
        metrics.update(self.engine.sync(self.backbone))  # the engine samples the next step from the new weights
        if self.producer is not None:  # waiting for the rollouts: in take/refills, and for the request a sync waits on
            self.timings["wait_for_rollout"] = self.producer.wait_s() + metrics.get("rollout/sync_wait_s", 0.0)
            self.timings["engine_idle"] = self.producer.engine_idle_s()
            lag.update({f"time/{k}_s": self.timings[k] for k in ("wait_for_rollout", "engine_idle")})
            metrics.update(lag)
        self.grpo_step += 1
        self._step_start_state = None
        reward_metrics = self.log_step(metrics, sampled, trained, time.perf_counter() - started)
        return {"scored": trained, "metrics": reward_metrics, "async": lag}

    def collect(self, batch: PromptBatch) -> tuple[list[Scored], Scored]:
        """Every scored rollout of this step, and what to train on (`filter_groups`)."""
        first = self.score(batch, background=not self.algo.dynamic_sampling.enabled)  # DAPO's filter needs rewards
        return self.filter_groups(first, lambda missing, tries: self.score(
            self.trainer.datamodule.refill(missing, self.refill_rng)))

    def filter_groups(self, first: Scored, refill) -> tuple[list[Scored], Scored]:
        """With dynamic sampling (DAPO), groups whose mean reward is ~0 or ~1 (no signal) are dropped and fresh
        prompts rolled out (`refill(missing prompts, rollouts so far)`), up to `max_tries` rollouts."""
        dyn, G = self.algo.dynamic_sampling, self.algo.group_size
        sampled = [first]
        if not dyn.enabled:
            return sampled, sampled[0]
        size = len(first.prompts)
        kept: list[Scored] = []
        while True:
            keep = dapo_group_filter(sampled[-1].overall, G, min_mean=dyn.min_mean, max_mean=dyn.max_mean)
            groups = [g for g, k in enumerate(keep.tolist()) if k]
            if groups:
                kept.append(sampled[-1].groups(groups))
            missing = size - sum(len(k.prompts) for k in kept)
            if missing <= 0 or len(sampled) >= dyn.max_tries:
                break
            sampled.append(refill(missing, len(sampled)))
        if not kept:  # nothing informative: train on the last rollout (its advantages are all zero)
            return sampled, sampled[-1]
        trained = Scored.concat(kept, self.backbone.tokenizer.pad_token_id)
        return sampled, trained.groups(list(range(min(size, len(trained.prompts)))))

    # ---- asynchronous rollouts (rollout.max_staleness >= 1) -------------------------------------------------------
    def collect_ahead(self, batch: PromptBatch) -> tuple[list[Scored], Scored]:
        """This step's batch as the producer sampled and scored it (at most max_staleness policy versions old); DAPO's
        refills are sampled by the producer too, from prompts drawn with this step's own RNG."""
        position = self.grpo_step
        taken: Produced = self.producer.take(position)
        first = taken.batch
        ids, expected = [s.id for s in first.prompts.samples], [s.id for s in batch.samples]
        if ids != expected:  # the producer's data position and the loader's disagree (a resume gone wrong)
            raise MedixError(f"GRPO step {position + 1}: the rollout producer sampled prompts {ids}, the data loader "
                             f"serves {expected}")

        def refill(missing: int, tries: int) -> Scored:
            prompts = self.trainer.datamodule.refill(missing, random.Random(position_seed(self.seed, position, tries)))
            return self.producer.run(lambda: self.produce(position, tries, prompts))

        sampled, trained = self.filter_groups(first, refill)
        for part in sampled:
            for key, value in part.timings.items():
                self.timings[key] = self.timings.get(key, 0.0) + value
        return sampled, trained

    def produce(self, position: int, attempt: int, batch: PromptBatch | None = None) -> Scored:
        """In the producer's thread: GRPO step `position`'s prompts (or `batch`, a DAPO refill) rolled out with the
        seed of (seed, position, attempt) and scored."""
        batch = batch if batch is not None else self.trainer.datamodule.train_batch(position)
        G = self.algo.group_size
        started = time.perf_counter()
        prompts = [self.backbone.render(s, self.reasoning_tag) for s in batch.samples]
        with self.engine_busy():
            rollout = self.engine.generate(self.backbone, prompts, batch.images, group_size=G, sampling=self.sampling,
                                           seed=position_seed(self.seed, position, attempt))
        sampled = time.perf_counter()
        each = [s for s in batch.samples for _ in range(G)]
        scores = self.reward(rollout.texts, [s.solution for s in each], questions=[s.problem for s in each],
                             ids=[s.id for s in each], truncated=rollout.truncated.tolist())
        return Scored(batch, rollout, scores, G, timings={"rollout": sampled - started,
                                                          "reward": time.perf_counter() - sampled})

    def lag_metrics(self, sampled: list[Scored]) -> dict[str, float]:
        """How many policy versions behind the trainer's the step's rollouts were (over rows), the batches waiting
        in the queue and the rows dropped for staleness this step."""
        version = int(self.engine.version)
        lags = [(version - part.rollout.policy_version, len(part.rollout)) for part in sampled]
        rows = sum(n for _, n in lags)
        return {"rollout/staleness/mean": sum(lag * n for lag, n in lags) / max(rows, 1),
                "rollout/staleness/max": float(max(lag for lag, _ in lags)),
                "rollout/queue_depth": float(self.producer.queue_depth()),
                "rollout/stale_dropped": float(self.producer.stale_dropped())}

    def close_producer(self) -> None:
        """Stop sampling ahead and join the producer's thread (the end of training, an exception, Ctrl-C)."""
        if self.producer is not None:
            self.producer.close()
            self.producer = None

    def configure_callbacks(self):
        return [ProducerShutdown()] if self.max_staleness else []

    def engine_busy(self):
        """Marks the engine busy for `time/engine_idle_s` (validation's rollouts, asynchronous mode)."""
        return self.producer.engine_clock.busy() if self.producer is not None else nullcontext()

    def score(self, batch: PromptBatch, group_size: int | None = None, background: bool = False,
              reward=None) -> Scored:
        """Roll out `group_size` completions per prompt and score each with the reward (in a background thread:
        the judge's requests then overlap the update's log-prob forwards, which do not need rewards)."""
        G = group_size or self.algo.group_size
        t0 = time.perf_counter()
        prompts = [self.backbone.render(s, self.reasoning_tag) for s in batch.samples]
        with self.engine_busy():
            rollout = self.engine.generate(self.backbone, prompts, batch.images, group_size=G, sampling=self.sampling)
        self.timings["rollout"] = self.timings.get("rollout", 0.0) + time.perf_counter() - t0
        each = [s for s in batch.samples for _ in range(G)]
        reward_fn = reward or self.reward

        def judged() -> RewardBatch:
            started = time.perf_counter()
            scores = reward_fn(rollout.texts, [s.solution for s in each], questions=[s.problem for s in each],
                               ids=[s.id for s in each], truncated=rollout.truncated.tolist())
            self.timings["reward"] = self.timings.get("reward", 0.0) + time.perf_counter() - started
            return scores

        return Scored(batch, rollout, self.reward_thread.submit(judged) if background else judged(), G)

    def update(self, trained: Scored) -> dict[str, float]:
        """`num_iterations` passes over the rollout, one optimizer step per mini-batch of the plan (`update_plan`),
        its gradient summed over the backwards of its micro-batches and all-reduced once, after the last of them.
        Data-parallel ranks run the same number of steps and backwards (padding passes where a rank has fewer rows)
        and normalise each loss by the mini-batch's token (or row) count over every rank."""
        t0 = time.perf_counter()
        algo = self.algo
        plan = self.plan(len(trained.rollout))
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        means = StepMeans()
        # the update's large blocks leave RSS when freed; LoRA layers run fused (models/lora.py)
        with freed_memory_returned(heap_below=UPDATE_HEAP_BYTES), fused_lora(self.model):
            batch = self.prepare(trained, plan)
            self.timings["reward_wait"] = batch.reward_wait_s
            self.model.train()  # HF models load in eval mode; activation checkpointing acts in train mode only
            self.run_plan(plan, batch, optimizer, scheduler, means)
        self.timings["update"] = time.perf_counter() - t0 - batch.reward_wait_s
        return means.compute()

    def run_plan(self, plan: list[list[MicroBatch]], batch: "UpdateBatch", optimizer, scheduler,
                 means: "StepMeans") -> None:
        """`num_iterations` passes over the plan: per optimizer step its micro-batches' backwards, then clip, step."""
        algo = self.algo
        for iteration in range(int(algo.num_iterations)):
            for step in plan:
                counted = [r for micro in step if micro.counted for r in micro.rows]
                local = loss_denominator(batch.mask[counted], algo.aggregation) if counted else 0.0
                denominator = self.across_ranks(local, "sum") / self.world_size  # of the whole mini-batch
                optimizer.zero_grad()
                step_loss = 0.0
                prefix = self.step_prefix(batch.rollout, [r for micro in step for r in micro.rows])
                for index, micro in enumerate(step):
                    with self.gradient_sync(enabled=index == len(step) - 1):
                        loss, metrics = self.micro_batch_loss(batch, micro, denominator, iteration, prefix)
                        self.manual_backward(loss)  # gradients add up over the micro-batches
                    step_loss += float(loss.detach())
                    means.add(metrics)
                if prefix is not None:
                    prefix.backward()  # the micro-batches' gradients at the shared prefix, through its forward once
                norm = gradient_norm(self.model)  # before clipping; the same on every rank (reduced, or gathered)
                if algo.max_grad_norm:
                    self.clip_gradients(optimizer, gradient_clip_val=algo.max_grad_norm, gradient_clip_algorithm="norm")
                if torch.isfinite(norm):
                    optimizer.step()
                else:  # clipping an infinite norm makes every gradient NaN, and the step would write NaN everywhere
                    optimizer.zero_grad()
                    means.skipped += 1
                    log.warning("GRPO step %d: the gradient norm is %s; this optimizer step is skipped, the weights "
                                "stay as they were (grad/nonfinite_steps)", self.grpo_step + 1, float(norm))
                scheduler.step()
                # every rank's loss, padding included: their mean over ranks is the loss
                means.add({"loss": step_loss, "grad/norm": float(norm)})

    def plan(self, n_rows: int) -> list[list[MicroBatch]]:
        """This rank's optimizer steps and their micro-batches, padded so that every rank runs as many of both."""
        algo = self.algo
        plan = update_plan(n_rows, int(algo.mini_batch_size), algo.micro_batch_size)
        if self.world_size == 1:
            return plan
        steps = int(self.across_ranks(len(plan), "max"))
        passes = self.across_ranks(torch.tensor(passes_per_step(plan, steps)), "max")
        return padded_plan(plan, [int(n) for n in passes])

    def prepare(self, trained: Scored, plan: list[list[MicroBatch]]) -> "UpdateBatch":
        """What every micro-batch's loss reads: the rollout, the loss mask, the advantages and the old and reference
        log-probs (scored before the rewards are awaited: the judge works meanwhile)."""
        algo, rollout = self.algo, trained.rollout
        steps = [[r for micro in step if micro.counted for r in micro.rows] for step in plan]
        steps = [rows for rows in steps if rows]
        reuse_logp = algo.num_iterations == 1 and len(plan) == 1  # on-policy single update: old = current, detached
        old_logp = None if reuse_logp else self.score_rows(rollout, steps, self.model)
        ref_logp = self.reference_logprobs(rollout, steps) if algo.beta > 0 else None
        waiting = time.perf_counter()
        rewards = trained.overall  # the first thing here that needs the rewards
        reward_wait_s = time.perf_counter() - waiting
        device = rollout.input_ids.device
        advantages = group_advantages(rewards, algo.group_size, scale=algo.advantage_scale, eps=algo.eps).to(device)
        mask = rollout.completion_mask.float()
        mask[torch.isnan(rewards).to(device)] = 0.0  # judge failures excluded: no gradient from them
        if algo.mask_truncated:
            mask[rollout.truncated] = 0.0
        return UpdateBatch(rollout, mask, advantages, old_logp, ref_logp, reward_wait_s)

    def step_prefix(self, rollout: Rollout, rows: list[int]) -> SharedPrefix | None:
        """The KV cache of the prompt tokens that all `rows` start with (the system prompt and the template), run
        once for the optimizer step with gradient, or None where it does not apply: several processes (their
        gradient sync follows each micro-batch's backward), images, activation checkpointing, no common prefix.
        Under dropout the prefix's masks are drawn once per step, not once per micro-batch."""
        if self.world_size > 1 or not can_share_prompt(self.model) or rollout.prompt_length == 0:
            return None
        part = select_rows(rollout, rows)
        if self.backbone.model_inputs(part):
            return None
        start = common_prefix(part.input_ids, part.attention_mask, part.prompt_length)
        return shared_prefix(self.model, start) if len(start) else None

    def micro_batch_loss(self, batch: "UpdateBatch", micro: MicroBatch, denominator: float, iteration: int,
                         prefix: SharedPrefix | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The policy loss of a micro-batch over `denominator` (its mini-batch's token or row count), and its metrics
        (none for a padding pass, whose zero mask gives no gradient); its prompts' common start read from `prefix`."""
        algo, rows = self.algo, micro.rows
        part = select_rows(batch.rollout, rows)
        mask = batch.mask[rows] if micro.counted else torch.zeros_like(batch.mask[rows])
        logp, entropy = run_as_forward(self.model, completion_logprobs, self.model, part.input_ids,
                                       part.attention_mask, part.prompt_length, self.backbone.model_inputs(part),
                                       with_entropy=True, prefix=prefix)
        old = logp.detach() if batch.old_logp is None else batch.old_logp[rows]  # the log-probs at sampling time
        metrics: dict[str, float] = {}
        is_weights = None
        engine_logp, correction = batch.rollout.engine_logprobs, algo.mismatch_correction
        if engine_logp is None and correction.enabled:
            raise ConfigError("algorithm.mismatch_correction.enabled needs an engine that reports its sampling "
                              "log-probs (rollout=vllm); rollout=hf samples with the trainer's own weights")
        if engine_logp is not None and micro.counted:
            if iteration == 0:  # |engine - trainer| log-prob of the sampled tokens: a stale or broken sync shows
                metrics.update(engine_gap(old, engine_logp[rows], part.completion_mask))
            if correction.enabled:
                is_weights, weight_metrics = mismatch_weights(old, engine_logp[rows], mask, mode=correction.mode,
                                                              clip_max=correction.clip_max,
                                                              clip_min=correction.clip_min)
                metrics.update({k: float(v) for k, v in weight_metrics.items()})
        loss, loss_metrics = policy_loss(
            logp, old, batch.advantages[rows], mask, ref_logp=None if batch.ref_logp is None else batch.ref_logp[rows],
            denominator=denominator, is_weights=is_weights, **self.loss_settings)
        if not micro.counted:
            return loss, {}
        metrics.update({k: float(v) for k, v in loss_metrics.items()})
        metrics["entropy"] = float((entropy * mask).sum() / mask.sum().clamp(min=1.0))
        return loss, metrics

    @contextmanager
    def gradient_sync(self, enabled: bool):
        """Within it, a backward reduces gradients across data-parallel ranks only when `enabled` (the last
        micro-batch of an optimizer step): DDP's no_sync through Lightning's `block_backward_sync`, FSDP2's
        `set_requires_gradient_sync`. One process: nothing to do."""
        strategy = self.trainer.strategy if self._trainer is not None else None
        if enabled or self.world_size == 1:
            yield
        elif is_sharded(self.model):
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        elif isinstance(strategy, ParallelStrategy):
            with strategy.block_backward_sync():
                yield
        else:
            yield

    @torch.no_grad()
    def score_rows(self, rollout: Rollout, chunks: list[list[int]], model) -> torch.Tensor:
        parts = []
        for rows in chunks:
            part = select_rows(rollout, rows)
            logp, _ = run_as_forward(model, completion_logprobs, model, part.input_ids, part.attention_mask,
                                     part.prompt_length, self.backbone.model_inputs(part))
            parts.append(logp)
        return torch.cat(parts)

    def reference_logprobs(self, rollout: Rollout, chunks: list[list[int]]) -> torch.Tensor:
        if self.ref_model is not None:
            return self.score_rows(rollout, chunks, self.ref_model)
        with self.model.disable_adapter():  # LoRA: the base model is the reference, no second copy
            return self.score_rows(rollout, chunks, self.model)

    # ---- validation ---------------------------------------------------------------------------------------------
    def validation_step(self, batch: PromptBatch, batch_idx: int):
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # validation never shifts the training run's sampling
            scored = self.score(batch, group_size=1, reward=self.val_reward)
        self.val_rewards.update(scored.rewards, rows=[i for i, counted in enumerate(batch.counted) if counted])
        return {"scored": scored}

    def on_validation_epoch_start(self):
        self.timings["validation_start"] = time.perf_counter()

    def on_validation_epoch_end(self):
        metrics = {f"val/{k}": v for k, v in self.val_rewards.compute().items()}  # over every rank's prompts
        self.val_rewards.reset()
        self.log_dict(metrics, sync_dist=False)
        self.log("time/validation_s", time.perf_counter() - self.timings.pop("validation_start"), sync_dist=True)
        self.log("step", float(self.grpo_step))  # MLflow step = GRPO step

    # ---- metrics ------------------------------------------------------------------------------------------------
    def log_step(self, metrics: dict, sampled: list[Scored], trained: Scored, step_s: float) -> dict[str, float]:
        """Log this step's metrics (means over ranks; counts summed; reward statistics over every completion of
        every rank) at MLflow step = GRPO step; returns the reward statistics."""
        G = self.algo.group_size
        for part in sampled:  # DAPO: every group it sampled, not only the ones it kept
            self.sampled_rewards.update(part.rewards)
        rewards = self.sampled_rewards.compute()
        self.sampled_rewards.reset()
        groups = self.across_ranks(sum(len(part.prompts) for part in sampled), "sum")
        weights = getattr(self.reward, "weights", dict.fromkeys(self.reward.names, 1.0))
        for name in ["overall", *[n for n, w in weights.items() if w > 0]]:  # groups whose rewards are all equal
            flat = sum(frac_reward_zero_std(scores_of(part.rewards, name), G) * len(part.prompts) for part in sampled)
            key = "frac_reward_zero_std" if name == "overall" else f"frac_reward_zero_std/{name}"
            rewards[key] = self.across_ranks(flat, "sum") / max(groups, 1.0)
        if self.algo.dynamic_sampling.enabled:
            self.kept_rewards.update(trained.rewards)
            rewards.update({f"kept/{k}": v for k, v in self.kept_rewards.compute().items()})
            self.kept_rewards.reset()
            metrics["dapo/tries"] = float(len(sampled))
            self.log("dapo/kept_groups", float(len(trained.prompts)), sync_dist=True, reduce_fx="sum")
        metrics["completion/mean_length"] = float(trained.rollout.completion_mask.sum(1).float().mean())
        metrics["completion/clipped_ratio"] = float(trained.rollout.truncated.float().mean())
        metrics.update({f"time/{k}_s": v for k, v in self.timings.items()})
        metrics["time/step_s"] = step_s
        largest = {k: metrics.pop(k) for k in list(metrics) if k.endswith("/max")}
        self.log_dict(metrics, sync_dist=True)
        self.log_dict(largest, sync_dist=True, reduce_fx="max")
        self.log_dict(rewards, sync_dist=False)  # already over every rank
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        self.log("reward", rewards.get("reward/overall/mean", float("nan")), prog_bar=True, logger=False)
        self.log("step_s", step_s, prog_bar=True, logger=False, sync_dist=True)
        self.log("step", float(self.grpo_step), prog_bar=True)  # MLflow step = GRPO step
        return rewards

    def judge_stats(self) -> dict[str, float]:
        """The judge counters of the training reward, plus those of the validation reward when it has its own
        (counts added, latency weighted by requests)."""
        parts = [self.reward.stats() if callable(getattr(self.reward, "stats", None)) else {}]
        if self.val_reward is not self.reward and callable(getattr(self.val_reward, "stats", None)):
            parts.append(self.val_reward.stats())
        out: dict[str, float] = {}
        for part in parts:
            for key, value in part.items():
                if key != "judge/latency_s":
                    out[key] = out.get(key, 0.0) + value
        requests = sum(p.get("judge/requests", 0.0) for p in parts)
        if any("judge/latency_s" in p for p in parts):
            out["judge/latency_s"] = sum(p.get("judge/latency_s", 0.0) * p.get("judge/requests", 0.0)
                                         for p in parts) / requests if requests else 0.0
        return out

    @property
    def world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def across_ranks(self, value, op: str):
        """`value` (a number or a tensor) reduced over the data-parallel ranks with Lightning's strategy (`op`: sum or
        max); as it is on one process."""
        if self.world_size <= 1:
            return value
        tensor = torch.as_tensor(value, dtype=torch.float64 if not torch.is_tensor(value) else None, device=self.device)
        reduced = self.trainer.strategy.reduce(tensor, reduce_op=op)
        return float(reduced) if not torch.is_tensor(value) else reduced

    # ---- checkpoints and the trained policy ----------------------------------------------------------------------
    def save_trained(self, root) -> Path:
        """The trained policy under `root`: adapter/ (LoRA) or model/ (full fine-tune), written by rank 0. A sharded
        policy (FSDP) is gathered into one Hugging Face folder (model/, a LoRA adapter merged), every rank taking part."""
        if is_sharded(self.model):
            saver = self.backbone.processor or self.backbone.tokenizer  # a VLM's processor holds its tokenizer
            return save_full_pretrained(self.model, saver, Path(root) / "model")
        folder = Path(root) / self.backbone.trained_folder_name()
        if self.global_rank == 0:
            self.backbone.save_trained(folder)
        return folder

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Only the trainable weights, and what a resumed run needs to continue exactly: the step, the RNG states
        (as at the start of a step that failed, which the resumed run redoes), the DAPO refill RNG, the MLflow run."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        rng, refill = self._step_start_state or (rng_state(), self.refill_rng.getstate())
        checkpoint["grpo"] = {"step": self.grpo_step, "rng": rng, "refill_rng": refill,
                              "mlflow_run_id": getattr(self.logger, "run_id", None)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["grpo"]
        self.grpo_step = state["step"]
        self.refill_rng.setstate(state["refill_rng"])
        self._resumed_rng = state["rng"]

    def on_train_start(self) -> None:
        if self._resumed_rng is not None:  # after the data loaders drew their seeds, as in the uninterrupted run
            restore_rng(self._resumed_rng)
            self._resumed_rng = None
        if self.max_staleness and self.producer is None:  # sample ahead from the checkpoint's step on
            if callable(getattr(self.engine, "start", None)):
                self.engine.start(self.backbone)  # every rank, here: starting may take collectives
            self.producer = RolloutProducer(self.produce, self.engine, self.max_staleness, start=self.grpo_step)


class ProducerShutdown(L.Callback):
    """The rollout producer's thread is joined when training ends, however it ends (Lightning calls a module no
    hook on an exception or Ctrl-C, only callbacks)."""

    def on_train_end(self, trainer, pl_module):
        pl_module.close_producer()

    def on_exception(self, trainer, pl_module, exception):
        pl_module.close_producer()


def scores_of(rewards: RewardBatch, name: str) -> torch.Tensor:
    """One component's scores (or `overall`) as a float tensor, NaN where not scored."""
    values = rewards.overall if name == "overall" else rewards.components[name]
    return torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float32)


def engine_gap(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean and max of |engine - trainer| over the completion tokens of a micro-batch."""
    gap = (engine_logp - trainer_logp).abs() * mask
    return {"rollout/logprob_diff/mean": float(gap.sum() / mask.sum().clamp(min=1.0)),
            "rollout/logprob_diff/max": float(gap.max()) if gap.numel() else 0.0}


@dataclass
class UpdateBatch:
    """What the losses of one update read (`GRPOModule.prepare`); old_logp None: on-policy, the current log-probs
    detached stand in for them."""

    rollout: Rollout
    mask: torch.Tensor  # [N, T] completion tokens that count (judge failures and, if asked, truncated rows: 0)
    advantages: torch.Tensor  # [N]
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    reward_wait_s: float


class StepMeans:
    """The metrics of an update's micro-batches, each averaged over them (a `/max` key: the largest), and the number
    of optimizer steps skipped for a non-finite gradient. Lightning's `log_dict(sync_dist=True)` then reduces them
    over the ranks."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}
        self.skipped = 0

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.values.setdefault(key, []).append(value)

    def compute(self) -> dict[str, float]:
        means = {k: max(v) if k.endswith("/max") else sum(v) / len(v) for k, v in self.values.items()}
        return {**means, "grad/nonfinite_steps": float(self.skipped)}


def gradient_norm(model) -> torch.Tensor:
    """The total 2-norm of the model's gradients (a sharded model's: over the full tensors)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
