"""The GRPO-family training step as a LightningModule: rollout → reward → advantages → clipped policy updates."""

from __future__ import annotations

import logging
import math
import random
import time
import zlib
from contextlib import nullcontext

import lightning as L
import torch

from medix.data.prompts import render_prompt
from medix.errors import ConfigError
from medix.grpo.checkpoint import load_trainable_state, restore_rng, rng_state, save_checkpoint, trainable_state
from medix.grpo.losses import dapo_group_filter, frac_reward_zero_std, group_advantages, policy_loss
from medix.rewards.composite import RewardBatch
from medix.grpo.rollout import Rollout, completion_logprobs, concat_rollouts, generate_completions, select_rows

log = logging.getLogger(__name__)

# Metrics summed over ranks (counts); every other metric is averaged over ranks.
SUMMED_METRICS = frozenset({"judge/calls", "judge/failures", "judge/http_requests", "dapo/kept_groups"})


class GRPOModule(L.LightningModule):
    """One training step = one rollout of `prompts_per_step` prompts × `group_size` completions and its updates."""

    def __init__(self, backbone, reward, algorithm, *, reasoning_tag: str, max_steps: int | None, refill_pool=None,
                 judge=None, sample_table_every: int = 0, reward_monitor=None, seed: int = 0, image_loader=None,
                 val_samples=None, val_every: int = 0, checkpoint_path=None, checkpoint_every: int = 0,
                 resume_state: dict | None = None, run_id_getter=None):
        super().__init__()
        self.automatic_optimization = False
        self.backbone = backbone
        self.model = backbone.model
        self.reward = reward
        self.judge = judge
        self.algo = algorithm
        self.reasoning_tag = reasoning_tag
        self.max_steps = max_steps  # None: until trainer.max_epochs ends (resolved in on_train_start)
        self.refill_pool = list(refill_pool or [])
        self.refill_rng = random.Random(seed)
        self.sample_table_every = sample_table_every
        self.reward_monitor = reward_monitor
        self.image_loader = image_loader
        self.val_samples = list(val_samples or [])
        self.val_every = val_every
        self.val_metrics: dict[str, float] = {}
        self.grpo_step = 0
        self.batches_seen = 0  # training batches consumed, skipped ones included: the data position
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every
        self.resume_state = resume_state
        self.run_id_getter = run_id_getter
        self.last_logged_step = 0  # steps up to here are already in the tracker (a resumed run does not log them twice)
        self.ref_model = None
        if algorithm.beta > 0 and not backbone_uses_lora(self.model):
            import copy

            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)

    # ---- optimisation -------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.algo.lr, weight_decay=self.algo.weight_decay)
        warmup = max(int(self.algo.warmup_steps), 0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        return [optimizer], [schedule]

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # a list of Samples (text and image paths); tensors are made on the device during rollout

    # ---- the step -----------------------------------------------------------------------------------------------
    def on_train_start(self):
        if self.max_steps is None:
            self.max_steps = self.steps_until_epochs_end()
        if self.resume_state is not None:
            state = self.resume_state
            load_trainable_state(self.model, state["weights"])
            self.optimizers().optimizer.load_state_dict(state["optimizer"])
            self.lr_schedulers().load_state_dict(state["scheduler"])
            self.grpo_step = state["grpo_step"]
            self.last_logged_step = max(state["grpo_step"], state.get("last_logged_step", 0))
            self.refill_rng.setstate(state["refill_rng"])
            log.info("resumed at step %d (data position %d)", self.grpo_step, state["batches_seen"])

    def steps_until_epochs_end(self) -> int:
        """trainer.max_steps=null: one GRPO step per batch of this rank's shard, for trainer.max_epochs epochs."""
        epochs, batches = self.trainer.max_epochs, self.trainer.num_training_batches
        if epochs is None or epochs < 0 or not math.isfinite(batches):
            raise ConfigError(f"trainer.max_steps=null runs until trainer.max_epochs ends, but trainer.max_epochs="
                              f"{epochs}; set trainer.max_steps or a finite trainer.max_epochs")
        return int(epochs * batches)

    def training_step(self, batch, batch_idx):
        if self.resume_state is not None and self.batches_seen < self.resume_state["batches_seen"]:
            self.batches_seen += 1  # replaying the data order up to where the checkpoint was taken
            return None
        if self.resume_state is not None:
            restore_rng(self.resume_state["rng"])
            self.resume_state = None
        if self.grpo_step >= self.max_steps:
            self.trainer.should_stop = True
            return None
        self.batches_seen += 1
        timings = {}
        samples, rollout, rewards, reward_batch, dapo_metrics = self.collect(batch, timings)
        metrics = self.update(rollout, rewards, reward_batch, timings)
        metrics.update(dapo_metrics)
        metrics["frac_reward_zero_std"] = float(frac_reward_zero_std(rewards, self.algo.group_size))
        metrics["completion/mean_length"] = float(rollout.completion_mask.sum(1).float().mean())
        metrics["completion/clipped_ratio"] = float(rollout.truncated.float().mean())
        metrics.update({f"time/{k}_s": v for k, v in timings.items()})
        metrics = self.reduce_across_ranks(metrics)
        metrics.update(self.reward_metrics(reward_batch))  # over the whole batch of every rank
        metrics["lr"] = self.optimizers().param_groups[0]["lr"]
        self.grpo_step += 1
        if self.val_samples and self.val_every and (self.grpo_step % self.val_every == 0
                                                    or self.grpo_step == self.max_steps):
            self.val_metrics = self.validation_rewards()
            metrics.update(self.val_metrics)
        if self.judge is not None:  # cumulative, validation calls included; counts summed over ranks
            metrics.update(self.reduce_across_ranks(self.judge.stats()))
        self.log_step(metrics, samples, rollout, reward_batch)
        if self.checkpoint_every and self.grpo_step % self.checkpoint_every == 0 or self.grpo_step == self.max_steps:
            self.save_checkpoint()
        return None

    def save_checkpoint(self) -> None:
        """Everything needed to continue this run exactly from the end of the current step."""
        if self.checkpoint_path is None or self.global_rank != 0:
            return
        save_checkpoint(self.checkpoint_path, {
            "weights": trainable_state(self.model),
            "optimizer": self.optimizers().optimizer.state_dict(),
            "scheduler": self.lr_schedulers().state_dict(),
            "rng": rng_state(),
            "refill_rng": self.refill_rng.getstate(),
            "grpo_step": self.grpo_step,
            "batches_seen": self.batches_seen,
            "last_logged_step": self.last_logged_step,
            "mlflow_run_id": self.run_id_getter() if self.run_id_getter else None,
        })

    @torch.no_grad()
    def validation_rewards(self) -> dict[str, float]:
        """The reward of one sampled completion per held-out prompt, as `val/reward/<c>/mean|std`; under DDP each
        rank scores its own slice of the held-out prompts and the statistics are over all of them."""
        t0 = time.perf_counter()
        size = max(int(self.algo.prompts_per_step) * int(self.algo.group_size), 1)
        shard = self.val_samples[self.global_rank::self.world_size]
        texts, solutions, questions = [], [], []
        for start in range(0, len(shard), size):
            chunk = shard[start:start + size]
            rollout = self.rollout(chunk, group_size=1)
            texts += rollout.texts
            solutions += [s.solution for s in chunk]
            questions += [s.problem for s in chunk]
        reward_batch = self.reward(texts, solutions, questions)
        metrics = {f"val/{k}": v for k, v in self.reward_metrics(reward_batch).items()}
        metrics.update(self.reduce_across_ranks({"time/validation_s": time.perf_counter() - t0}))
        return metrics

    def collect(self, batch, timings):
        """Roll out and score; with dynamic sampling (DAPO) keep informative groups and refill up to max_tries."""
        G = self.algo.group_size
        wanted = len(batch)
        kept_samples, kept_rollouts, kept_rewards, kept_batches = [], [], [], []
        tries, prompts = 0, list(batch)
        dyn = self.algo.dynamic_sampling
        timings.update(rollout=0.0, reward=0.0)
        while True:
            tries += 1
            t0 = time.perf_counter()
            rollout = self.rollout(prompts)
            t1 = time.perf_counter()
            solutions = [s.solution for s in prompts for _ in range(G)]
            questions = [s.problem for s in prompts for _ in range(G)]
            reward_batch = self.reward(rollout.texts, solutions, questions)
            t2 = time.perf_counter()
            timings["rollout"] += t1 - t0
            timings["reward"] += t2 - t1
            rewards = to_tensor(reward_batch.overall)
            if not dyn.enabled:
                return prompts, rollout, rewards, reward_batch, {}
            keep = dapo_group_filter(rewards, G, min_mean=dyn.min_mean, max_mean=dyn.max_mean)
            groups = [i for i, k in enumerate(keep.tolist()) if k]
            rows = [g * G + j for g in groups for j in range(G)]
            if groups:
                kept_samples += [prompts[g] for g in groups]
                kept_rollouts.append(select_rows(rollout, rows))
                kept_rewards.append(rewards[rows])
                kept_batches.append(select_rewards(reward_batch, rows))
            pool = self.refill_pool[self.global_rank::self.world_size]  # DDP: each rank refills from its slice
            if len(kept_samples) >= wanted or tries >= dyn.max_tries or not pool:
                break
            prompts = self.refill_rng.sample(pool, min(wanted - len(kept_samples), len(pool)))
        metrics = {"dapo/tries": float(tries), "dapo/kept_groups": float(len(kept_samples))}
        if not kept_samples:  # nothing informative: train on the last rollout (its advantages are all zero)
            return prompts, rollout, rewards, reward_batch, metrics
        kept_samples = kept_samples[:wanted]
        n = len(kept_samples) * G
        merged = concat_rollouts(kept_rollouts, pad_token_id=self.backbone.tokenizer.pad_token_id)
        return (kept_samples, select_rows(merged, list(range(n))), torch.cat(kept_rewards)[:n],
                select_rewards(concat_rewards(kept_batches), list(range(n))), metrics)

    def rollout(self, samples, group_size: int | None = None) -> Rollout:
        processor = self.backbone.processor
        prompts = [render_prompt(s, processor or self.backbone.tokenizer, self.reasoning_tag) for s in samples]
        images = None
        if self.backbone.is_vlm and any(s.images for s in samples):
            images = [[self.image_loader(p) for p in s.images] for s in samples]
        return generate_completions(
            self.model, self.backbone.tokenizer, prompts, group_size=group_size or self.algo.group_size,
            max_new_tokens=self.algo.max_new_tokens, temperature=self.algo.temperature, top_p=self.algo.top_p,
            processor=processor, images=images, cache_implementation=self.algo.get("cache_implementation"),
            min_new_tokens=self.algo.get("min_new_tokens", 0),
        )

    def update(self, rollout: Rollout, rewards: torch.Tensor, reward_batch, timings) -> dict:
        t0 = time.perf_counter()
        algo = self.algo
        device = rollout.input_ids.device
        advantages = group_advantages(rewards, algo.group_size, scale=algo.advantage_scale, eps=algo.eps).to(device)
        mask = rollout.completion_mask.clone().float()
        mask[torch.isnan(rewards).to(device)] = 0.0  # judge failures excluded: no gradient from them
        if algo.mask_truncated:
            mask[rollout.truncated] = 0.0
        n = rollout.input_ids.shape[0]
        mini = min(int(algo.mini_batch_size), n)
        chunks = [list(range(i, min(i + mini, n))) for i in range(0, n, mini)]
        # DDP: every rank must take as many backward passes (gradient all-reduces) and optimizer steps as the others.
        # A rank with fewer rows (DAPO kept fewer groups) pads with no-op chunks: row 0, all tokens masked out.
        n_real = len(chunks)
        chunks += [[0]] * (self.chunk_count_across_ranks(n_real) - n_real)
        reuse_logp = algo.num_iterations == 1 and len(chunks) == 1  # on-policy single update: old = current, detached
        old_logp = None if reuse_logp else self.score_rows(rollout, chunks[:n_real], self.model)
        ref_logp = self.reference_logprobs(rollout, chunks[:n_real]) if algo.beta > 0 else None
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        totals: dict[str, list[float]] = {}
        for _ in range(int(algo.num_iterations)):
            for chunk_index, rows in enumerate(chunks):
                padding = chunk_index >= n_real
                part = select_rows(rollout, rows)
                logp, entropy = completion_logprobs(self.model, part.input_ids, part.attention_mask,
                                                    part.prompt_length, part.extra_inputs, with_entropy=True)
                chunk_mask = mask[rows] * 0.0 if padding else mask[rows]
                loss, m = policy_loss(
                    logp, logp.detach() if reuse_logp else old_logp[rows], advantages[rows], chunk_mask,
                    clip_low=algo.clip_low, clip_high=algo.clip_high, aggregation=algo.aggregation,
                    importance=algo.importance, beta=algo.beta,
                    ref_logp=None if ref_logp is None else ref_logp[rows], max_completion_length=algo.max_new_tokens,
                )
                optimizer.zero_grad()
                self.manual_backward(loss)
                if algo.max_grad_norm:
                    self.clip_gradients(optimizer, gradient_clip_val=algo.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                scheduler.step()
                if padding:
                    continue
                m = {k: float(v) for k, v in m.items()}
                m["loss"] = float(loss.detach())
                m["entropy"] = float(masked_mean(entropy.detach(), mask[rows]))
                for k, v in m.items():
                    totals.setdefault(k, []).append(v)
        timings["update"] = time.perf_counter() - t0
        return {k: sum(v) / len(v) for k, v in totals.items()}

    @torch.no_grad()
    def score_rows(self, rollout: Rollout, chunks, model) -> torch.Tensor:
        parts = []
        for rows in chunks:
            part = select_rows(rollout, rows)
            logp, _ = completion_logprobs(model, part.input_ids, part.attention_mask, part.prompt_length,
                                          part.extra_inputs)
            parts.append(logp)
        return torch.cat(parts)

    def reference_logprobs(self, rollout, chunks) -> torch.Tensor:
        if self.ref_model is not None:
            return self.score_rows(rollout, chunks, self.ref_model)
        with self.model.disable_adapter():  # LoRA: the base model is the reference, no second copy
            return self.score_rows(rollout, chunks, self.model)

    # ---- ranks and logging --------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        """Number of data-parallel processes (1 when no Trainer is attached)."""
        return self._trainer.world_size if self._trainer is not None else 1

    def chunk_count_across_ranks(self, count: int) -> int:
        if self.world_size <= 1:
            return count
        return int(self.all_gather(torch.tensor(count, device=self.device)).max())

    def reduce_across_ranks(self, metrics: dict, summed=SUMMED_METRICS) -> dict:
        """Under DDP: the mean over ranks (NaN left out), or the sum for the names in `summed`. Every rank must give
        the same names; a mismatch raises instead of pairing one rank's value with another's name."""
        if self.world_size <= 1:
            return metrics
        keys = sorted(metrics)
        names = float(zlib.crc32("\n".join(keys).encode()))
        local = torch.tensor([names] + [float("nan") if metrics[k] is None else float(metrics[k]) for k in keys],
                             dtype=torch.float64, device=self.device)
        gathered = self.all_gather(local).reshape(self.world_size, -1)  # [ranks, 1 + keys]
        if not bool((gathered[:, 0] == names).all()):
            raise RuntimeError(f"rank {self.global_rank}: the ranks logged different metric names ({keys}); "
                               "every rank must compute the same metrics")
        reduced = {}
        for i, key in enumerate(keys, start=1):
            column = gathered[:, i]
            reduced[key] = float(column.nansum() if key in summed else column.nanmean())
        return reduced

    def reward_metrics(self, batch: RewardBatch) -> dict[str, float]:
        """`reward/<c>/mean|std` (population std, None left out) over the completions of every rank, exact whatever
        the number of completions each rank scored; one rank: `RewardBatch.metrics()`."""
        if self.world_size <= 1:
            return batch.metrics()
        names = ["overall", *batch.components]
        columns = [batch.overall, *batch.components.values()]
        scored = [[float(v) for v in values if v is not None] for values in columns]
        totals = {f"{i:03d}/{k}": float(x) for i, values in enumerate(scored)
                  for k, x in (("n", len(values)), ("sum", sum(values)))}
        totals = self.reduce_across_ranks(totals, summed=set(totals))
        means = [totals[f"{i:03d}/sum"] / totals[f"{i:03d}/n"] if totals[f"{i:03d}/n"] else 0.0
                 for i in range(len(names))]
        squares = {f"{i:03d}/sq": sum((v - means[i]) ** 2 for v in values) for i, values in enumerate(scored)}
        squares = self.reduce_across_ranks(squares, summed=set(squares))
        out = {}
        for i, name in enumerate(names):
            count = totals[f"{i:03d}/n"]
            if count:
                out[f"reward/{name}/mean"] = means[i]
                out[f"reward/{name}/std"] = math.sqrt(squares[f"{i:03d}/sq"] / count)
        return out

    def log_step(self, metrics, samples, rollout, reward_batch):
        clean = {k: v for k, v in metrics.items() if v is not None and not math.isnan(v)}
        if self.reward_monitor is not None:
            comps = {k.split("/")[1]: v for k, v in clean.items() if k.startswith("reward/") and k.endswith("/mean")
                     and k.split("/")[1] != "overall"}
            for alert in self.reward_monitor.update(self.grpo_step, comps):
                log.warning("reward hacking? %s", alert.message)
                clean["reward_hacking/alert"] = 1.0
                if self.logger is not None and self.global_rank == 0:
                    self.logger.experiment.set_tag(self.logger.run_id, "reward_hacking", alert.message[:5000])
        summary = " ".join(f"{k}={clean[k]:.4g}" for k in ("reward/overall/mean", "loss", "completion/mean_length")
                           if k in clean)
        if self.grpo_step <= self.last_logged_step:  # recomputed after a resume; the tracker already holds this step
            log.info("step %d recomputed after resume, already logged | %s", self.grpo_step, summary)
            return
        self.last_logged_step = self.grpo_step
        for logger in self.loggers:
            logger.log_metrics(clean, step=self.grpo_step)
        if self.sample_table_every and self.grpo_step % self.sample_table_every == 1 % self.sample_table_every:
            self.log_samples(samples, rollout, reward_batch)
        log.info("step %d | %s", self.grpo_step, summary)

    def log_samples(self, samples, rollout, reward_batch):
        if self.logger is None or self.global_rank != 0 or not hasattr(self.logger, "run_id"):
            return
        G = self.algo.group_size
        table = {
            "step": [self.grpo_step] * len(rollout.texts),
            "id": [s.id for s in samples for _ in range(G)],
            "solution": [s.solution for s in samples for _ in range(G)],
            "completion": rollout.texts,
            "overall": list(reward_batch.overall),
        }
        for name, values in reward_batch.components.items():
            table[name] = list(values)
        self.logger.experiment.log_table(self.logger.run_id, data=table,
                                         artifact_file=f"samples/step_{self.grpo_step:05d}.json")


def select_rewards(batch: RewardBatch, rows: list[int]) -> RewardBatch:
    return RewardBatch({k: [v[i] for i in rows] for k, v in batch.components.items()}, [batch.overall[i] for i in rows])


def concat_rewards(batches: list[RewardBatch]) -> RewardBatch:
    return RewardBatch({k: [x for b in batches for x in b.components[k]] for k in batches[0].components},
                       [x for b in batches for x in b.overall])


def backbone_uses_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def to_tensor(values) -> torch.Tensor:
    return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)
