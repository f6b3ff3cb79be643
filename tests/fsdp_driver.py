"""One rank of tests/test_fsdp.py: GRPO-shaped training of a tiny random Llama through Lightning's ModelParallelStrategy
(FSDP2, `medix.models.sharding`) on CPU over gloo. The test starts both ranks itself (LOCAL_RANK, WORLD_SIZE and
MASTER_PORT set), so Lightning launches nothing and one process can run several Trainers one after another.

`python tests/fsdp_driver.py fit OUT`: run "full" (STEPS steps uninterrupted, then the full HF folder and the logits
of the sharded model), then run "half" (STEPS // 2 steps, then `trainer.save_checkpoint`).
`python tests/fsdp_driver.py resume OUT`: `trainer.fit(ckpt_path=OUT/half.ckpt)` to STEPS steps; then a LoRA run
(its merged HF folder) and `helpers` (sharding.py's helpers outside Lightning). Every run writes
OUT/<run>_rank<R>.pt. The update math (`token_logprobs`, `chunk_loss`) is shared with the
single-process replay in the test.
"""

from __future__ import annotations

import copy
import faulthandler
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))

PROMPT_LEN, NEW_TOKENS, GROUP, MINI_BATCH = 4, 6, 4, 2   # per rank and step: one prompt, 4 completions, 2 updates
STEPS, BETA, LR, WEIGHT_DECAY, MAX_GRAD_NORM, CLIP = 4, 0.05, 1e-2, 0.01, 0.5, 0.2
EOS_STEP = 2     # rank 0 ends every completion with EOS as its 3rd token; rank 1 never emits EOS (stops at NEW_TOKENS)
TARGETS = (3, 4, 5, 6)
EOS, PAD = 1, 2


# ---- the update math, shared with the single-process replay ----------------------------------------------------
def token_logprobs(model, input_ids, attention_mask, prompt_length: int) -> torch.Tensor:
    """log p(completion token) under `model`, [rows, completion length]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, prompt_length - 1:-1].float()
    targets = input_ids[:, prompt_length:]
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def chunk_loss(logp, old_logp, ref_logp, advantages, mask, total_tokens, ranks: int) -> torch.Tensor:
    """Clipped surrogate + beta·k3 KL, summed over this rank's tokens and divided by the token count of the whole
    mini-batch over all ranks; × ranks because FSDP averages gradients over ranks (so the gradient is the one of
    sum(all tokens) / total_tokens, as one process computes it)."""
    ratio = torch.exp(logp - old_logp)
    a = advantages.unsqueeze(1)
    surrogate = -torch.minimum(ratio * a, ratio.clamp(1 - CLIP, 1 + CLIP) * a)
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    return ((surrogate + BETA * kl) * mask).sum() * ranks / total_tokens


def make_optimizer(params):
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))  # warmup: state matters
    return optimizer, schedule


def completion_mask(completion: torch.Tensor) -> torch.Tensor:
    """1 up to and including the first EOS."""
    eos = (completion == EOS).long()
    return ((eos.cumsum(1) - eos) == 0).float()


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    groups = rewards.view(-1, GROUP)
    return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)


def chunks(rows: int) -> list[list[int]]:
    return [list(range(i, min(i + MINI_BATCH, rows))) for i in range(0, rows, MINI_BATCH)]


def full_weights(model) -> dict[str, torch.Tensor]:
    """Every parameter unsharded, on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu().clone() for k, v in state.items()}


# ---- the LightningModule ------------------------------------------------------------------------------------------
def build_module(build, *, lora: bool = False):
    import lightning as L
    from transformers import LogitsProcessor, LogitsProcessorList

    from medix.models.sharding import gathered_for_generation, is_sharded, shard_model

    class EndAt(LogitsProcessor):
        def __init__(self, length):
            self.length = length

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - PROMPT_LEN >= self.length:
                scores = torch.full_like(scores, float("-inf"))
                scores[:, EOS] = 0.0
            return scores

    class TinyGRPO(L.LightningModule):
        """Per step: generate GROUP completions of one prompt, reward = share of TARGETS tokens, group advantages,
        then one optimizer step per mini-batch (manual optimisation), with a KL term to the reference."""

        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.policy = build()
            # deep-copy before configure_model: a module that fully_shard has touched refuses deepcopy
            self.ref = None if lora else copy.deepcopy(self.policy).eval().requires_grad_(False)
            self.grpo_step = 0
            self.record: dict = {"steps": [], "generate_s": []}

        def configure_model(self):
            if is_sharded(self.policy):  # Lightning calls this hook again for each trainer.fit/validate
                return
            shard_model(self.policy, self.device_mesh)
            if self.ref is not None:
                shard_model(self.ref, self.device_mesh)

        def configure_optimizers(self):  # runs after configure_model: the optimizer holds the DTensor shards
            optimizer, schedule = make_optimizer([p for p in self.policy.parameters() if p.requires_grad])
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

        def train_dataloader(self):
            # 2 items: DistributedSampler over the data-parallel mesh gives each rank its own one per epoch
            return torch.utils.data.DataLoader(list(range(2)), batch_size=1, collate_fn=lambda items: items[0])

        def on_save_checkpoint(self, checkpoint):
            checkpoint["grpo_step"] = self.grpo_step

        def on_load_checkpoint(self, checkpoint):
            self.grpo_step = checkpoint["grpo_step"]

        def reference_logprobs(self, ids, mask):
            if self.ref is not None:
                return token_logprobs(self.ref, ids, mask, PROMPT_LEN)
            with self.policy.disable_adapter():
                return token_logprobs(self.policy, ids, mask, PROMPT_LEN)

        def rollout(self, item: int):
            g = torch.Generator().manual_seed(1000 * self.grpo_step + item)
            prompt = torch.randint(3, 32, (1, PROMPT_LEN), generator=g).repeat(GROUP, 1)
            torch.manual_seed(1000 * self.grpo_step + 10 * item + 7)  # sampling: a function of (step, data item)
            if self.global_rank == 0:
                stop = dict(logits_processor=LogitsProcessorList([EndAt(EOS_STEP)]))
            else:
                stop = dict(suppress_tokens=[EOS])
            t0 = time.perf_counter()
            # every other step keeps the shards gathered for the whole generate (one all-gather per unit)
            gather = gathered_for_generation(self.policy) if self.grpo_step % 2 else nullcontext()
            with torch.no_grad(), gather:
                out = self.policy.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                           top_k=0, max_new_tokens=NEW_TOKENS, pad_token_id=PAD, eos_token_id=EOS,
                                           **stop)
            self.record["generate_s"].append(time.perf_counter() - t0)
            completion = out[:, PROMPT_LEN:]
            cmask = completion_mask(completion)
            completion = completion.masked_fill(cmask == 0, PAD)
            ids = torch.cat([prompt, completion], 1)
            return ids, torch.cat([torch.ones_like(prompt), cmask.long()], 1), cmask

        def training_step(self, item, batch_idx):
            assert self.ref is None or not self.ref.training
            ids, attn, cmask = self.rollout(int(item))
            hits = sum((ids[:, PROMPT_LEN:] == t) for t in TARGETS).float() * cmask
            advantages = group_advantages(hits.sum(1) / NEW_TOKENS)
            with torch.no_grad():
                old = token_logprobs(self.policy, ids, attn, PROMPT_LEN)
                ref = self.reference_logprobs(ids, attn)
            optimizer, schedule = self.optimizers(), self.lr_schedulers()
            norms, losses = [], []
            for rows in chunks(ids.shape[0]):
                total = self.trainer.strategy.reduce(cmask[rows].sum(), reduce_op="sum")
                logp = token_logprobs(self.policy, ids[rows], attn[rows], PROMPT_LEN)
                loss = chunk_loss(logp, old[rows], ref[rows], advantages[rows], cmask[rows], total,
                                  self.trainer.world_size)
                optimizer.zero_grad()
                self.manual_backward(loss)
                norms.append(grad_norm(optimizer))
                self.clip_gradients(optimizer, gradient_clip_val=MAX_GRAD_NORM, gradient_clip_algorithm="norm")
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
            self.record["steps"].append(dict(step=self.grpo_step, item=int(item), input_ids=ids, attention_mask=attn,
                                             completion_mask=cmask, advantages=advantages, norms=norms,
                                             losses=losses, lr=optimizer.param_groups[0]["lr"]))
            self.grpo_step += 1

    return TinyGRPO()


def grad_norm(optimizer) -> float:
    """The global gradient norm before clipping (the shards' norms combined: a collective)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def trainer(steps: int):
    import lightning as L

    from medix.models.sharding import fsdp_strategy

    return L.Trainer(accelerator="cpu", devices=2, strategy=fsdp_strategy(devices=2), precision="32-true",
                     max_epochs=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0)


def probe_logits(model) -> torch.Tensor:
    ids = torch.tensor([[5, 9, 11, 3, 7, 20]])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def dump(out: Path, run: str, module, **extra) -> None:
    rank = module.global_rank
    torch.save(dict(record=module.record, weights=full_weights(module.policy), rank=rank,
                    sharded=[n for n, m in module.policy.named_modules() if type(m).__name__.startswith("FSDP")],
                    ref_sharded=None if module.ref is None else
                    [n for n, m in module.ref.named_modules() if type(m).__name__.startswith("FSDP")], **extra),
               out / f"{run}_rank{rank}.pt")


def helpers(out: Path) -> None:
    """sharding.py's helpers on a tiny Llama sharded outside Lightning: the chunked LM head through run_as_forward
    (values and gradients against the model's own forward), generate inside gathered_for_generation (same tokens,
    shards again afterwards), and the bf16 policy (one step, fp32 shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from tiny_lm import tiny_model

    from medix.grpo.lm_head import head_token_logprobs
    from medix.models.sharding import bf16_mixed_precision, gathered_for_generation, run_as_forward, shard_model

    mesh = init_device_mesh("cpu", (2,))
    rank = torch.distributed.get_rank()
    model = shard_model(tiny_model(seed=3), mesh)
    ids = torch.randint(3, 32, (3, 9), generator=torch.Generator().manual_seed(rank))
    mask = torch.ones_like(ids)
    result = {}

    def grads():
        return {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}

    own = token_logprobs(model, ids, mask, PROMPT_LEN)
    own.sum().backward()
    result["own"], result["own_grads"] = own.detach(), grads()
    model.zero_grad()

    def chunked(input_ids, attention_mask):
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return head_token_logprobs(hidden[:, PROMPT_LEN - 1:-1], model.lm_head, input_ids[:, PROMPT_LEN:],
                                   chunk_rows=5)[0]

    split = run_as_forward(model, chunked, ids, mask)
    split.sum().backward()
    result["split"], result["split_grads"] = split.detach(), grads()
    model.zero_grad()

    prompt = ids[:, :PROMPT_LEN]
    generated = []
    for gather in (nullcontext(), gathered_for_generation(model)):
        torch.manual_seed(11 + rank)
        with torch.no_grad(), gather:
            generated.append(model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                            top_k=0, max_new_tokens=5 + 3 * rank, pad_token_id=PAD, eos_token_id=EOS))
    result["generated"] = generated
    result["sharded_after_generation"] = all(isinstance(p, DTensor) for p in model.parameters())

    low = shard_model(tiny_model(seed=3), mesh, mp_policy=bf16_mixed_precision())
    optimizer, _ = make_optimizer(low.parameters())
    logits = low(input_ids=ids).logits
    result["bf16_logits_dtype"] = logits.dtype
    logits.float().logsumexp(-1).mean().backward()
    optimizer.step()
    result["bf16_shard_dtypes"] = {p.dtype for p in low.parameters()}
    result["bf16_finite"] = all(bool(p.full_tensor().isfinite().all()) for p in low.parameters())
    torch.save(result, out / f"helpers_rank{rank}.pt")


def main(scenario: str, out: Path) -> None:
    from tiny_lm import tiny_model, tiny_qwen2, word_tokenizer

    from medix.models.sharding import save_full_pretrained

    torch.set_num_threads(1)
    times = {}
    if scenario == "fit":
        t0 = time.perf_counter()
        module = build_module(lambda: tiny_model(seed=0))
        trainer(STEPS).fit(module)
        folder = save_full_pretrained(module.policy, word_tokenizer(), out / "full_hf")
        times["full"] = time.perf_counter() - t0
        dump(out, "full", module, probe=probe_logits(module.policy), folder=str(folder), times=times)

        t0 = time.perf_counter()
        module = build_module(lambda: tiny_model(seed=0))
        fit = trainer(STEPS // 2)
        fit.fit(module)
        fit.save_checkpoint(out / "half.ckpt")
        times["half"] = time.perf_counter() - t0
        dump(out, "half", module, times=times)
    elif scenario == "resume":
        t0 = time.perf_counter()
        module = build_module(lambda: tiny_model(seed=0))
        trainer(STEPS).fit(module, ckpt_path=out / "half.ckpt")
        times["resume"] = time.perf_counter() - t0
        dump(out, "resume", module, times=times)

        t0 = time.perf_counter()
        module = build_module(lambda: tiny_qwen2(seed=0, lora=True), lora=True)
        fit = trainer(2)
        fit.fit(module)
        with module.policy.disable_adapter():
            base_probe = probe_logits(module.policy)
        folder = save_full_pretrained(module.policy, None, out / "lora_hf")
        times["lora"] = time.perf_counter() - t0
        dump(out, "lora", module, probe=probe_logits(module.policy), base_probe=base_probe, folder=str(folder),
             times=times)
        helpers(out)
    else:
        raise SystemExit(f"fsdp_driver: unknown scenario {scenario!r}; expected fit or resume")


if __name__ == "__main__":
    faulthandler.enable()  # a crash (SIGABRT, SIGSEGV) prints every thread's Python stack into the rank's log
    main(sys.argv[1], Path(sys.argv[2]))
    torch.distributed.destroy_process_group()
    # Leave without finalizing the interpreter: process groups that something still references keep their gloo
    # worker threads, and a worker that frees a finished all-gather's tensors during finalization needs the GIL, is
    # ended by Python and std::terminate aborts the rank (SIGABRT after every output was written; seen here in about
    # 1 run in 10 and in CI; the upstream report is pytorch/pytorch#179291). Every dump above is closed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
