"""Where do NaNs come from on the CUDA preset? One forward/backward of the random 0.4B Qwen2 over random tokens, in
fp32 and under bf16 autocast, with the loss the GRPO update uses (token log-probs of the sequence itself).

    python experiments/perf/gpu_probe.py                     # needs a GPU; prints one line per mode
    python experiments/perf/gpu_probe.py --device cpu --tiny # the script itself, on a tiny model

For each batch size, head (plain logits or medix's chunked head) and precision it prints the loss, whether every gradient is finite, the gradient norm, the first module (in forward
order) whose output is non-finite, and, if the backward made a NaN, the op anomaly detection names.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from experiments.perf.grpo_vs_trl import QWEN2_04B, QWEN2_TINY  # noqa: E402
from medix.grpo.lm_head import head_token_logprobs, split_lm_head  # noqa: E402
from medix.grpo.logprobs import token_logprobs  # noqa: E402


def probe(mode: str, *, device: str = "cuda", rows: int = 16, length: int = 320, attention: str = "sdpa",
          arch: dict = QWEN2_04B, head: str = "plain", mask: bool = False) -> dict:
    """head: "plain" = the model's full logits then token_logprobs; "chunked" = body hidden states then
    medix.grpo.lm_head.head_token_logprobs (no [rows, length, vocab] tensor)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**arch, bos_token_id=None, eos_token_id=1, pad_token_id=2)
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device)
    init_finite = all(torch.isfinite(p).all().item() for p in model.parameters())
    first_bad: list[str] = []

    def hook(name):
        def check(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else getattr(output, "logits", output)
            if torch.is_tensor(out) and not first_bad and not torch.isfinite(out).all():
                first_bad.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    ids = torch.randint(3, config.vocab_size, (rows, length), device=device)
    # mask: pass an explicit all-ones attention mask, as a GRPO step does (the CUDA preset has no padding)
    attention_mask = torch.ones_like(ids) if mask else None
    anomaly, loss, logits = "", torch.tensor(float("nan")), None
    try:
        with torch.autograd.detect_anomaly(check_nan=True):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=mode == "bf16-autocast"):
                if head == "plain":
                    logits = model(input_ids=ids, attention_mask=attention_mask).logits
                    logp, _ = token_logprobs(logits[:, :-1], ids[:, 1:])
                else:
                    body, lm_head = split_lm_head(model)
                    logits = body(input_ids=ids, attention_mask=attention_mask).last_hidden_state
                    logp, _ = head_token_logprobs(logits[:, :-1], lm_head, ids[:, 1:])
            loss = -logp.mean()
            loss.backward()
    except RuntimeError as err:
        anomaly = str(err).splitlines()[0][:200]
    for h in handles:
        h.remove()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_finite = bool(grads) and all(torch.isfinite(g).all().item() for g in grads)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item() if grads else float("nan")
    return dict(mode=mode, head=head, mask=mask, cudnn_sdp=torch.backends.cuda.cudnn_sdp_enabled(), rows=rows, length=length, attention=attention, init_finite=init_finite, loss=round(loss.item(), 4),
                logits_dtype=str(getattr(logits, "dtype", None)), grad_finite=grad_finite, grad_norm=round(norm, 4),
                first_nonfinite_forward=first_bad[0] if first_bad else None, anomaly=anomaly or None)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer Qwen2 on short rows (checks the script on a CPU)")
    p.add_argument("--rows", type=int, nargs="+", default=[16, 128], help="batch rows to try (128 = 16 prompts x 8)")
    p.add_argument("--length", type=int, default=320, help="tokens per row (64 prompt + 256 completion)")
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16-autocast"])
    p.add_argument("--heads", nargs="+", default=["plain", "chunked"])
    p.add_argument("--mask", action="store_true", help="pass an explicit all-ones attention mask (as a GRPO step does)")
    p.add_argument("--no-cudnn-sdp", action="store_true", help="also repeat each case with cuDNN attention disabled")
    args = p.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}", flush=True)
    for rows in args.rows:
        shape = dict(rows=min(rows, 2), length=16, arch=QWEN2_TINY) if args.tiny else dict(rows=rows, length=args.length)
        for cudnn in ([True, False] if args.no_cudnn_sdp else [True]):
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
            for head in args.heads:
                for mode in args.modes:
                    print(probe(mode, device=args.device, head=head, mask=args.mask, **shape), flush=True)
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
