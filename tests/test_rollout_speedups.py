"""The rollout speed-ups change no numbers: shared-prompt log-probs and their gradients equal one plain forward,
chunked logsumexp equals log_softmax, and the shared prompt cache samples what a plain prefill samples."""

import copy

import pytest
import torch
import torch.nn.functional as F

from medix.grpo.rollout import completion_logprobs, generate_completions, prompt_owners, token_logprobs
from tiny_lm import tiny_qwen2


def group_batch(prompts_per_step=3, group=4, prompt_len=7, completion_len=5, seed=1):
    """Left-padded prompts (row i has i pad tokens), each repeated `group` times, then random completions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (prompts_per_step, prompt_len), generator=gen)
    mask = torch.ones_like(ids)
    for i in range(prompts_per_step):
        ids[i, :i], mask[i, :i] = 2, 0
    ids, mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    comp = torch.randint(3, 97, (ids.shape[0], completion_len), generator=gen)
    comp_mask = torch.ones_like(comp)
    comp_mask[0, -2:] = 0  # a completion that ended early (right padding)
    return torch.cat([ids, comp], 1), torch.cat([mask, comp_mask], 1), prompt_len


def test_prompt_owners_marks_runs_of_identical_prompts():
    prompts = torch.tensor([[1, 2], [1, 2], [3, 4], [3, 4], [1, 2]])
    assert prompt_owners(prompts).tolist() == [0, 0, 1, 1, 2]


def test_token_logprobs_equal_log_softmax_and_entropy():
    logits = torch.randn(5, 6, 97, dtype=torch.float64) * 3
    targets = torch.randint(0, 97, (5, 6))
    logp, entropy = token_logprobs(logits, targets, with_entropy=True, chunk_rows=2)
    ref = F.log_softmax(logits, -1)
    torch.testing.assert_close(logp, ref.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(entropy, -(ref.exp() * ref).sum(-1))
    assert not entropy.requires_grad


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_logprobs_and_gradients_equal_a_plain_forward(lora):
    model = tiny_qwen2(lora=lora).train()
    input_ids, attention_mask, P = group_batch()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def logp_and_grads(share):
        model.zero_grad()
        logp, entropy = completion_logprobs(model, input_ids, attention_mask, P, with_entropy=True, share_prompt=share)
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        return logp.detach(), entropy, [p.grad.clone() for p in trainable]

    shared, shared_entropy, shared_grads = logp_and_grads(True)
    plain, plain_entropy, plain_grads = logp_and_grads(False)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared_entropy, plain_entropy, atol=1e-5, rtol=1e-5)
    for a, b in zip(shared_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


class WordTokenizer:
    """Just enough tokenizer for generate_completions: `w5 w9` <-> ids, left padding with id 2."""

    pad_token_id, eos_token_id = 2, 1

    def __call__(self, text, return_tensors="pt", padding=True):
        rows = [[int(w[1:]) for w in t.split()] for t in text]
        width = max(map(len, rows))
        ids = torch.tensor([[2] * (width - len(r)) + r for r in rows])
        return {"input_ids": ids, "attention_mask": (torch.arange(width) >= width - torch.tensor([len(r) for r in rows])
                                                     .unsqueeze(1)).long()}

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(f"w{i}" for i in row if i not in (1, 2)) for row in ids.tolist()]


def test_shared_prompt_cache_samples_what_a_plain_prefill_samples():
    model = tiny_qwen2()
    prompts = ["w5 w6 w7 w8", "w9 w10", "w11 w12 w13"]
    outs = []
    for share in (True, False):
        torch.manual_seed(123)
        outs.append(generate_completions(model, WordTokenizer(), prompts, group_size=3, max_new_tokens=6,
                                         temperature=1.0, top_p=1.0, share_prompt_cache=share))
    shared, plain = outs
    assert shared.input_ids.shape == (9, 4 + 6)
    assert torch.equal(shared.input_ids, plain.input_ids)
    assert shared.texts == plain.texts
    logp_shared, _ = completion_logprobs(model, shared.input_ids, shared.attention_mask, shared.prompt_length)
    logp_plain, _ = completion_logprobs(copy.deepcopy(model), plain.input_ids, plain.attention_mask,
                                        plain.prompt_length, share_prompt=False)
    torch.testing.assert_close(logp_shared, logp_plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_completion_logprobs_equal_log_softmax_of_the_model_logits(share, lora):
    """Through the split body + chunked head (lm_head.py): the same numbers as the model's own full logits."""
    from medix.grpo.rollout import left_padded_positions

    model = tiny_qwen2(lora=lora).eval()
    input_ids, attention_mask, P = group_batch()
    with torch.no_grad():
        logp, _ = completion_logprobs(model, input_ids, attention_mask, P, share_prompt=share)
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=left_padded_positions(attention_mask)).logits
    ref = F.log_softmax(logits[:, P - 1:-1].double(), -1).gather(-1, input_ids[:, P:].unsqueeze(-1)).squeeze(-1)
    real = attention_mask[:, P:].bool()
    torch.testing.assert_close(logp[real].double(), ref[real], atol=1e-5, rtol=1e-5)
