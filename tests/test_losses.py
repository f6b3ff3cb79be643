"""GRPO-family math checked against float64 loop references (values and gradients) and hand-worked cases."""

import itertools
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from medix.config import register_configs
from medix.grpo.losses import (
    AGGREGATIONS,
    dapo_group_filter,
    frac_reward_zero_std,
    group_advantages,
    loss_denominator,
    mismatch_weights,
    policy_loss,
    valid_mask,
)

CONF = Path(__file__).resolve().parents[1] / "conf"


def algorithm(name: str):
    """`algorithm=<name>` as composed for a run (typed by its schema)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[f"algorithm={name}", "paths.output_dir=/tmp/x"]).algorithm


# ---------------------------------------------------------------- loop references (written independently)
def reference_advantages(rewards, group_size, scale, eps):
    values = rewards.tolist()
    scored = [v for v in values if not math.isnan(v)]
    if len(scored) > 1:
        m = sum(scored) / len(scored)
        batch_std = math.sqrt(sum((v - m) ** 2 for v in scored) / (len(scored) - 1))
    else:
        batch_std = 0.0
    out = []
    for start in range(0, len(values), group_size):
        group = values[start : start + group_size]
        ok = [v for v in group if not math.isnan(v)]
        for v in group:
            if math.isnan(v) or len(ok) < 2:
                out.append(0.0)
                continue
            mean = sum(ok) / len(ok)
            std = math.sqrt(sum((u - mean) ** 2 for u in ok) / (len(ok) - 1))
            divisor = {"group": std + eps, "batch": batch_std + eps, "none": 1.0}[scale]
            out.append((v - mean) / divisor)
    return torch.tensor(out, dtype=torch.float64)


def reference_loss(logp, old, adv, mask, clip_low, clip_high, aggregation, importance, beta, ref, max_len):
    """Per-token Python loops; GSPO written in TRL's form (gradient through exp of the masked mean)."""
    B, T = logp.shape
    total, n_tokens, seq_means = 0.0, 0, []
    counts = {"low": 0, "high": 0, "ratio_sum": 0.0, "kl_sum": 0.0}
    for i in range(B):
        tokens = [t for t in range(T) if mask[i, t] > 0]
        if importance == "sequence":
            log_s = sum((logp[i, t] - old[i, t] for t in tokens), torch.zeros((), dtype=logp.dtype))
            seq_ratio = torch.exp(log_s / max(len(tokens), 1))
        seq_sum = torch.zeros((), dtype=logp.dtype)
        for t in tokens:
            r = seq_ratio if importance == "sequence" else torch.exp(logp[i, t] - old[i, t])
            a = adv[i]
            unclipped = r * a
            clipped = torch.clamp(r, 1 - clip_low, 1 + clip_high) * a
            term = -(unclipped if unclipped.item() < clipped.item() else clipped)
            if ref is not None:
                d = ref[i, t] - logp[i, t]
                k3 = torch.exp(d) - d - 1
                counts["kl_sum"] += k3.item()
                if beta > 0:
                    term = term + beta * k3
            counts["low"] += int(r.item() < 1 - clip_low and a.item() < 0)
            counts["high"] += int(r.item() > 1 + clip_high and a.item() > 0)
            counts["ratio_sum"] += r.item()
            seq_sum = seq_sum + term
        total = total + seq_sum
        n_tokens += len(tokens)
        seq_means.append(seq_sum / max(len(tokens), 1))
    if aggregation == "sequence_mean":
        loss = sum(seq_means) / B
    elif aggregation == "token_mean":
        loss = total / max(n_tokens, 1)
    else:
        loss = total / (B * max_len)
    n = max(n_tokens, 1)
    metrics = {
        "clip_ratio/low": counts["low"] / n,
        "clip_ratio/high": counts["high"] / n,
        "clip_ratio": (counts["low"] + counts["high"]) / n,
        "kl": counts["kl_sum"] / n if ref is not None else 0.0,
        "ratio/mean": counts["ratio_sum"] / n,
    }
    return loss, metrics


def random_batch(seed, B=6, T=7, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [T, 0, 1, 3, T - 1, 5][:B]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=torch.float64)
    # garbage in the padding must not leak into loss or gradients
    logp = torch.where(mask > 0, logp, logp + 4.0)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logp, old, adv, mask, ref


SETTINGS = list(
    itertools.product(
        ["sequence_mean", "token_mean", "constant"],
        ["token", "sequence"],
        [0.0, 0.04],
        [(0.2, 0.28), (3e-4, 4e-4), (0.5, 50.0)],
    )
)


@pytest.mark.parametrize("aggregation,importance,beta,clip", SETTINGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_policy_loss_matches_loop_reference(aggregation, importance, beta, clip, seed):
    clip_low, clip_high = clip
    spread = 0.4 if importance == "token" else 0.15
    logp, old, adv, mask, ref = random_batch(seed, spread=spread)
    T = logp.shape[1]
    kwargs = dict(clip_low=clip_low, clip_high=clip_high, aggregation=aggregation, importance=importance,
                  beta=beta, ref_logp=ref, max_completion_length=T + 3)

    x = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(x, old, adv, mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, x)

    y = logp.clone().requires_grad_(True)
    ref_loss, ref_metrics = reference_loss(y, old, adv, mask, clip_low, clip_high, aggregation, importance,
                                           beta, ref, T + 3)
    (ref_grad,) = torch.autograd.grad(ref_loss, y)

    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert (grad[mask == 0] == 0).all()
    for name, value in ref_metrics.items():
        assert not metrics[name].requires_grad
        assert metrics[name].item() == pytest.approx(value, rel=1e-10, abs=1e-12), name


def test_random_settings_exercise_both_clip_sides():
    logp, old, adv, mask, ref = random_batch(0)
    _, m = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert m["clip_ratio/low"] > 0 and m["clip_ratio/high"] > 0
    _, m = policy_loss(logp, old, adv, mask, clip_low=0.5, clip_high=50.0)
    assert m["clip_ratio"] == 0


def test_kl_metric_reported_without_penalty_and_zero_without_ref():
    logp, old, adv, mask, ref = random_batch(3)
    plain, m_no_ref = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    with_ref, m_ref = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, ref_logp=ref, beta=0.0)
    assert m_no_ref["kl"].item() == 0.0
    assert m_ref["kl"].item() > 0
    torch.testing.assert_close(plain, with_ref)  # beta=0: the reference only feeds the metric


# ---------------------------------------------------------------- hand-worked cases
def hand_batch():
    # B=2, T=2; row 0 has ratios 1.5 and 0.5 with A=+1, row 1 has ratio 1.1 with A=-1 and one padding token.
    old = torch.zeros(2, 2, dtype=torch.float64)
    logp = torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(1.1), 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    return logp, old, adv, mask


@pytest.mark.parametrize(
    "aggregation,expected_loss,expected_grad",
    [
        # per-token losses: r=1.5,A=1 -> -min(1.5, 1.28) = -1.28 (clipped high, no gradient);
        # r=0.5,A=1 -> -min(0.5, 0.8) = -0.5 (gradient -A*r = -0.5); r=1.1,A=-1 -> -min(-1.1,-1.1) = 1.1 (grad +1.1)
        # token_mean: (-1.28 - 0.5 + 1.1) / 3 = -0.68 / 3
        ("token_mean", -0.68 / 3, [[0.0, -0.5 / 3], [1.1 / 3, 0.0]]),
        # sequence_mean: ((-1.28 - 0.5) / 2 + 1.1 / 1) / 2 = (-0.89 + 1.1) / 2 = 0.105
        ("sequence_mean", 0.105, [[0.0, -0.5 / 4], [1.1 / 2, 0.0]]),
        # constant, max_completion_length=4: -0.68 / (2 * 4) = -0.085
        ("constant", -0.085, [[0.0, -0.5 / 8], [1.1 / 8, 0.0]]),
    ],
)
def test_hand_token_level(aggregation, expected_loss, expected_grad):
    logp, old, adv, mask = hand_batch()
    x = logp.clone().requires_grad_(True)
    loss, m = policy_loss(x, old, adv, mask, clip_low=0.2, clip_high=0.28, aggregation=aggregation,
                          max_completion_length=4)
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    torch.testing.assert_close(x.grad, torch.tensor(expected_grad, dtype=torch.float64))
    # only the r=1.5, A>0 token was clipped; r=0.5 with A>0 is below 1-0.2 but min() keeps it unclipped
    assert m["clip_ratio/high"].item() == pytest.approx(1 / 3)
    assert m["clip_ratio/low"].item() == 0.0
    assert m["clip_ratio"].item() == pytest.approx(1 / 3)
    assert m["ratio/mean"].item() == pytest.approx((1.5 + 0.5 + 1.1) / 3)


def test_hand_low_clip():
    # r=0.5, A=-1: -min(-0.5, -0.8) = 0.8, clipped low, no gradient
    logp = torch.tensor([[math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    loss, m = policy_loss(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64),
                          torch.ones(1, 1), clip_low=0.2, clip_high=0.28)
    loss.backward()
    assert loss.item() == pytest.approx(0.8)
    assert logp.grad.item() == 0.0
    assert m["clip_ratio/low"].item() == 1.0 and m["clip_ratio/high"].item() == 0.0


def test_hand_gspo_sequence_ratio():
    # log-ratios 0.1 and 0.3: s = exp(0.2) = 1.2214027581601699 shared by both tokens.
    logp = torch.tensor([[0.1, 0.3]], dtype=torch.float64)
    old = torch.zeros(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2)
    s = math.exp(0.2)
    # A=+1 with clip 3e-4/4e-4: -min(s, 1.0004) = -1.0004 per token, clipped high, zero gradient
    x = logp.clone().requires_grad_(True)
    loss, m = policy_loss(x, old, torch.tensor([1.0], dtype=torch.float64), mask, clip_low=3e-4, clip_high=4e-4,
                          importance="sequence", aggregation="sequence_mean")
    loss.backward()
    assert loss.item() == pytest.approx(-1.0004)
    assert (x.grad == 0).all() and m["clip_ratio/high"].item() == 1.0
    # A=-1: -min(-s, -1.0004) = s per token; d loss / d logp_t = s / 2 (mean over 2 tokens)
    x = logp.clone().requires_grad_(True)
    loss, m = policy_loss(x, old, torch.tensor([-1.0], dtype=torch.float64), mask, clip_low=3e-4, clip_high=4e-4,
                          importance="sequence", aggregation="sequence_mean")
    loss.backward()
    assert loss.item() == pytest.approx(s)
    torch.testing.assert_close(x.grad, torch.tensor([[s / 2, s / 2]], dtype=torch.float64))
    assert m["clip_ratio"].item() == 0.0 and m["ratio/mean"].item() == pytest.approx(s)
    # token-level importance gives (e^0.1 + e^0.3) / 2 = 1.2275...: the two levels really differ
    loss_tok, _ = policy_loss(logp, old, torch.tensor([-1.0], dtype=torch.float64), mask, clip_low=3e-4,
                              clip_high=4e-4, importance="token", aggregation="sequence_mean")
    assert loss_tok.item() == pytest.approx((math.exp(0.1) + math.exp(0.3)) / 2)


def test_hand_kl_penalty():
    # A=0 leaves only the penalty. ref - logp = ln 2: k3 = 2 - ln 2 - 1 = 0.30685...; beta=0.1 -> loss 0.030685...
    # d k3 / d logp = -exp(ref - logp) + 1 = -1, so the gradient is beta * -1 = -0.1
    logp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.0 + math.log(2)]], dtype=torch.float64)
    loss, m = policy_loss(logp, logp.detach().clone(), torch.zeros(1, dtype=torch.float64), torch.ones(1, 1),
                          clip_low=0.2, clip_high=0.2, beta=0.1, ref_logp=ref)
    loss.backward()
    assert loss.item() == pytest.approx(0.1 * (1 - math.log(2)))
    assert logp.grad.item() == pytest.approx(-0.1)
    assert m["kl"].item() == pytest.approx(1 - math.log(2))


def test_on_policy_loss_is_minus_mean_advantage_per_token():
    # ratio 1 everywhere: token_mean loss = -(sum_i A_i * len_i) / total tokens = -(2*3 + (-1)*1) / 4 = -1.25
    logp = torch.full((2, 3), -0.7)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, m = policy_loss(logp, logp.clone(), torch.tensor([2.0, -1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-1.25)
    assert m["ratio/mean"].item() == pytest.approx(1.0)


# ---------------------------------------------------------------- advantages
def test_group_advantages_hand():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / 0.57735 = +-0.866025
    adv = group_advantages(r, 4, scale="group", eps=0.0)
    assert adv[:4].tolist() == pytest.approx([0.8660254, -0.8660254, 0.8660254, -0.8660254])
    # group 2: mean 0.75, std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5 -> 0.25/0.5 = 0.5, -0.75/0.5 = -1.5
    assert adv[4:].tolist() == pytest.approx([0.5, 0.5, 0.5, -1.5])
    # none: r - group mean
    assert group_advantages(r, 4, scale="none").tolist() == pytest.approx([0.5, -0.5, 0.5, -0.5, 0.25, 0.25, 0.25,
                                                                            -0.75])
    # batch: batch mean 5/8, sum sq dev 5 * 0.375^2 + 3 * 0.625^2 = 1.875, std sqrt(1.875 / 7) = 0.5175492
    adv = group_advantages(r, 4, scale="batch", eps=0.0)
    assert adv[0].item() == pytest.approx(0.5 / 0.5175492, rel=1e-6)
    assert adv[4].item() == pytest.approx(0.25 / 0.5175492, rel=1e-6)


def test_group_advantages_nan_exclusion():
    r = torch.tensor([1.0, float("nan"), 0.0, 0.5, float("nan"), float("nan"), 0.7, float("nan")])
    # group 1 valid {1, 0, 0.5}: mean 0.5, std sqrt((0.25 + 0.25 + 0) / 2) = 0.5 -> [1, 0, -1, 0]
    adv = group_advantages(r, 4, eps=0.0)
    assert adv.tolist() == pytest.approx([1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert not torch.isnan(adv).any()
    assert valid_mask(r).tolist() == [True, False, True, True, False, False, True, False]
    # batch std over the four valid rewards only
    adv = group_advantages(r, 4, scale="batch", eps=0.0)
    assert adv[0].item() == pytest.approx(0.5 / torch.tensor([1.0, 0.0, 0.5, 0.7]).std().item(), rel=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_loop_reference(scale):
    g = torch.Generator().manual_seed(7)
    r = torch.rand(24, generator=g, dtype=torch.float64)
    r[[1, 5, 6, 7, 13]] = float("nan")  # group 1 (4..7) keeps a single valid reward
    r[16:20] = 0.25  # a flat group: zero std, advantage 0 even with eps small
    torch.testing.assert_close(group_advantages(r, 4, scale=scale, eps=1e-6),
                               reference_advantages(r, 4, scale, 1e-6))


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="rewards must be a 1-D float tensor"):
        group_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(torch.zeros(4), 4, scale="std")
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        group_advantages(torch.zeros(4), 0)


# ---------------------------------------------------------------- DAPO filter
def test_dapo_group_filter_and_zero_std():
    nan = float("nan")
    r = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, nan, 0.5, nan, nan, 0.005, 0.005])
    # group means: 0 (drop), 1 (drop), 0.5 (keep), 0.5 over the valid one (keep), none valid (drop), 0.005 (drop)
    keep = dapo_group_filter(r, 2, min_mean=0.01, max_mean=0.99)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, False, True, True, False, False]
    assert dapo_group_filter(r, 2, min_mean=0.001, max_mean=0.99).tolist() == [False, False, True, True, False, True]
    # flat groups: [0,0], [1,1], [nan,0.5] (one valid), [nan,nan], [0.005,0.005] -> 5 of 6
    assert frac_reward_zero_std(r, 2) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="min_mean"):
        dapo_group_filter(r, 2, min_mean=0.9, max_mean=0.1)


# ---------------------------------------------------------------- errors of policy_loss
def test_policy_loss_errors_name_the_argument():
    logp, old, adv, mask, ref = random_batch(0)
    ok = dict(clip_low=0.2, clip_high=0.28)
    cases = [
        (dict(logp=logp[0]), "logp must be a 2-D"),
        (dict(old_logp=old[:, :3]), "old_logp must have the shape"),
        (dict(mask=mask[:3]), "mask must have the shape"),
        (dict(mask=mask * 2), "mask must hold only 0/1"),
        (dict(advantages=adv[:2]), "advantages must have shape"),
        (dict(advantages=torch.full_like(adv, float("nan"))), "advantages must be finite"),
        (dict(clip_low=1.5), "clip_low"),
        (dict(clip_high=-0.1), "clip_high"),
        (dict(aggregation="seq-mean"), "aggregation must be one of"),
        (dict(importance="seq"), "importance must be one of"),
        (dict(beta=-1.0), "beta must be >= 0"),
        (dict(beta=0.1), "needs ref_logp"),
        (dict(ref_logp=ref[:, :2], beta=0.1), "ref_logp must have the shape"),
        (dict(aggregation="constant"), "needs max_completion_length"),
        (dict(aggregation="constant", max_completion_length=3), "shorter than the completions"),
    ]
    for override, message in cases:
        args = dict(logp=logp, old_logp=old, advantages=adv, mask=mask, **ok)
        args.update(override)
        with pytest.raises(ValueError, match=message):
            policy_loss(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"), args.pop("mask"), **args)


def test_bool_mask_accepted():
    logp, old, adv, mask, _ = random_batch(2)
    a, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    b, _ = policy_loss(logp, old, adv, mask.bool(), clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- conf/algorithm presets
@pytest.mark.parametrize("name", ["grpo", "dapo", "dr_grpo", "gspo"])
def test_algorithm_yaml_drives_the_math(name):
    cfg = algorithm(name)
    assert cfg.name == name
    G, P, T = cfg.group_size, cfg.prompts_per_step, cfg.sampling.max_new_tokens
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(G * P, generator=g)
    adv = group_advantages(rewards, G, scale=cfg.advantage_scale, eps=cfg.eps)
    keep = dapo_group_filter(rewards, G, min_mean=cfg.dynamic_sampling.min_mean,
                             max_mean=cfg.dynamic_sampling.max_mean)
    assert keep.shape == (P,)
    logp = (-torch.rand(G * P, T, generator=g)).requires_grad_(True)
    loss, metrics = policy_loss(
        logp, logp.detach() + 0.01, adv, torch.ones(G * P, T), clip_low=cfg.clip_low, clip_high=cfg.clip_high,
        aggregation=cfg.aggregation, importance=cfg.importance, beta=cfg.beta,
        ref_logp=logp.detach() - 0.01 if cfg.beta > 0 else None, max_completion_length=cfg.sampling.max_new_tokens,
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad.abs().sum() > 0
    assert set(metrics) == {"clip_ratio/low", "clip_ratio/high", "clip_ratio", "kl", "ratio/mean"}


def test_algorithm_presets_follow_the_papers():
    grpo, dapo, dr, gspo = algorithm("grpo"), algorithm("dapo"), algorithm("dr_grpo"), algorithm("gspo")
    assert (grpo.clip_low, grpo.clip_high, grpo.beta, grpo.aggregation) == (0.2, 0.3, 0.01, "token_mean")
    assert (dapo.clip_low, dapo.clip_high, dapo.beta, dapo.aggregation) == (0.2, 0.28, 0.0, "token_mean")
    assert dapo.dynamic_sampling.enabled and not grpo.dynamic_sampling.enabled
    assert (dapo.dynamic_sampling.min_mean, dapo.dynamic_sampling.max_mean) == (0.01, 0.99)
    assert (gspo.importance, gspo.aggregation, gspo.clip_low, gspo.clip_high, gspo.beta) == (
        "sequence", "sequence_mean", 3e-4, 4e-4, 0.0)
    assert (dr.aggregation, dr.advantage_scale) == ("constant", "none")


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_a_global_denominator_makes_data_parallel_gradients_those_of_one_process(aggregation):
    """Two ranks hold 3 and 2 rows of a mini-batch, and rank 1 also an empty padding mini-batch. With each rank's
    loss divided by the denominator over both ranks / 2, the rank average (what DDP's all-reduce computes) has the
    value and gradient of one process's loss on all 5 rows, and the padding adds exactly nothing."""
    g = torch.Generator().manual_seed(3)
    B, T = 5, 6
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = logp.detach() + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    kw = dict(clip_low=0.2, clip_high=0.28, aggregation=aggregation, max_completion_length=T)
    single, _ = policy_loss(logp, old, adv, mask, **kw)
    (expected,) = torch.autograd.grad(single, logp)
    ranks = [slice(0, 3), slice(3, 5)]
    denominator = sum(loss_denominator(mask[r], aggregation) for r in ranks) / len(ranks)
    losses = [policy_loss(logp[r], old[r], adv[r], mask[r], denominator=denominator, **kw)[0] for r in ranks]
    padding, _ = policy_loss(logp[:1], old[:1], adv[:1], torch.zeros(1, T, dtype=torch.float64),
                             denominator=denominator, **kw)
    averaged = sum(losses) / len(ranks)
    (grad,) = torch.autograd.grad(averaged + padding / len(ranks), logp)
    assert float(averaged) == pytest.approx(float(single), rel=1e-12)
    assert torch.allclose(grad, expected, rtol=1e-12, atol=1e-15)
    assert float(padding) == 0.0


def test_mismatch_weights_follow_trls_modes_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, -1.0]])
    engine = torch.tensor([[-1.5, -2.0, -9.0], [-1.0, -3.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # row 0's last token is padding: its gap is ignored
    w, m = mismatch_weights(trainer, engine, mask, mode="sequence_mask", clip_max=3.0)
    assert w.shape == (2, 1)
    assert float(w[0]) == pytest.approx(math.exp(0.5)) and float(w[1]) == 0.0  # exp(2) > 3: masked
    assert float(m["mismatch/masked_seqs"]) == 0.5 and float(m["mismatch/masked_tokens"]) == pytest.approx(3 / 5)
    w, _ = mismatch_weights(trainer, engine, mask, mode="sequence_truncate", clip_max=3.0)
    assert [float(x) for x in w] == pytest.approx([math.exp(0.5), 3.0])
    w, m = mismatch_weights(trainer, engine, mask, mode="token_mask", clip_max=3.0, clip_min=0.5)
    assert w.shape == (2, 3) and float(w[0, 0]) == pytest.approx(math.exp(0.5)) and float(w[1, 1]) == 0.0
    assert float(m["mismatch/masked_tokens"]) == pytest.approx(1 / 5) and float(m["mismatch/masked_seqs"]) == 0.5
    assert float(w[0, 2]) == 1.0  # padding: ratio 1
    with pytest.raises(ValueError, match="mismatch_correction.mode"):
        mismatch_weights(trainer, engine, mask, mode="sequence")


def test_unit_is_weights_leave_the_loss_unchanged_and_weights_scale_the_surrogate_only():
    g = torch.Generator().manual_seed(5)
    logp = (-torch.rand(3, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = logp.detach() + 0.02
    adv, mask = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64)
    kw = dict(clip_low=0.2, clip_high=0.28, aggregation="token_mean", beta=0.0)
    plain, _ = policy_loss(logp, old, adv, mask, **kw)
    unit, _ = policy_loss(logp, old, adv, mask, is_weights=torch.ones(3, 1, dtype=torch.float64), **kw)
    zero, _ = policy_loss(logp, old, adv, mask, is_weights=torch.zeros(3, 1, dtype=torch.float64), **kw)
    assert float(unit) == pytest.approx(float(plain)) and float(zero) == 0.0
    ref = logp.detach() - 0.1
    with_kl, _ = policy_loss(logp, old, adv, mask, is_weights=torch.zeros(3, 1, dtype=torch.float64),
                             **{**kw, "beta": 0.1}, ref_logp=ref)
    assert float(with_kl) > 0  # a masked sequence still pays its KL term
