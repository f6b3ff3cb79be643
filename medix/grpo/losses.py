"""GRPO-family math as pure tensor functions: group advantages, the clipped policy loss (GRPO, DAPO,
Dr.GRPO, GSPO), DAPO's group filter. Shapes: N = B = number of completions, T = completion tokens."""

import math

import torch

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("sequence_mean", "token_mean", "constant")
IMPORTANCE_LEVELS = ("token", "sequence")


def valid_mask(rewards: torch.Tensor) -> torch.Tensor:
    """True where a reward was scored; NaN marks an excluded judge failure (the caller turns None into NaN)."""
    return ~torch.isnan(rewards)


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a 1-D float tensor [N], got {_describe(rewards)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size} "
            "(expected consecutive groups of group_size completions per prompt)"
        )
    return rewards.view(-1, group_size)


def _group_stats(rewards: torch.Tensor, group_size: int):
    """Per group [num_groups, 1]: valid mask [G_n, G], count, NaN-free mean and unbiased std of valid rewards."""
    r = _grouped(rewards, group_size)
    valid = valid_mask(r)
    count = valid.sum(dim=1, keepdim=True)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    mean = r0.sum(dim=1, keepdim=True) / count.clamp(min=1)
    centered = torch.where(valid, r - mean, torch.zeros_like(r))
    std = ((centered**2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()  # Bessel-corrected
    return valid, count, mean, centered, std


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-6):
    """A_i = (r_i - mean of its group) / s, with s = group std ("group", GRPO), std of the whole batch ("batch"),
    or 1 ("none", Dr.GRPO). NaN rewards are left out of the statistics and get A = 0; so does every member of a
    group with fewer than two valid rewards (no baseline to compare against)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    valid, count, _, centered, group_std = _group_stats(rewards, group_size)
    if scale == "group":
        adv = centered / (group_std + eps)
    elif scale == "batch":
        scored = rewards[valid_mask(rewards)]
        batch_std = scored.std() if scored.numel() > 1 else rewards.new_zeros(())
        adv = centered / (batch_std + eps)
    else:
        adv = centered
    adv = torch.where(valid & (count > 1), adv, torch.zeros_like(adv))
    return adv.reshape(-1)


def dapo_group_filter(rewards: torch.Tensor, group_size: int, *, min_mean: float = 0.01, max_mean: float = 0.99):
    """DAPO dynamic sampling: keep groups with min_mean < mean valid reward < max_mean (all-NaN groups dropped).
    Returns a BoolTensor [num_groups]."""
    if not min_mean < max_mean:
        raise ValueError(f"min_mean ({min_mean}) must be below max_mean ({max_mean})")
    _, count, mean, _, _ = _group_stats(rewards, group_size)
    keep = (count > 0) & (mean > min_mean) & (mean < max_mean)
    return keep.reshape(-1)


def frac_reward_zero_std(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose valid rewards are all equal (or fewer than two): they carry no gradient."""
    _, count, _, _, std = _group_stats(rewards, group_size)
    flat = (count < 2) | torch.isclose(std, torch.zeros_like(std))
    return flat.float().mean().item()


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    aggregation: str = "token_mean",
    importance: str = "token",
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    denominator: float | None = None,
    is_weights: torch.Tensor | None = None,
):
    """Clipped surrogate loss of the GRPO family, returns (scalar loss, metrics of detached tensors).

    logp, old_logp, ref_logp, mask: [B, T] (log-probs of the sampled tokens; mask 1 on completion tokens);
    advantages: [B]. Per token:  -min(r*A, clip(r, 1-clip_low, 1+clip_high)*A) + beta*k3,
    k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's unbiased, non-negative KL estimator).

    is_weights ([B, 1] or [B, T], no gradient): the engine/trainer mismatch correction (`mismatch_weights`), which
    multiplies each token's clipped surrogate term (not the KL term).

    The loss is a sum over this mini-batch divided by `denominator`, by default `loss_denominator(mask, aggregation)`
    (its tokens or its rows). Data-parallel callers pass the denominator of the whole mini-batch over every rank
    divided by the number of ranks, so the gradient average equals the single-process gradient and a rank's empty
    padding mini-batch adds nothing.
    """
    _check_policy_args(logp, old_logp, advantages, mask, clip_low, clip_high, aggregation, importance, beta,
                       ref_logp, max_completion_length)
    mask = mask.to(logp.dtype)
    tokens_per_seq = mask.sum(dim=1).clamp(min=1)
    log_ratio = logp - old_logp

    if importance == "token":
        ratio = torch.exp(log_ratio)  # r_t = pi(y_t) / pi_old(y_t)
    else:
        # GSPO (arXiv 2507.18071, eq. "GSPO-token"): s_i = exp(mean_t log(pi/pi_old)) is the length-normalised
        # sequence ratio; s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)] equals s_i in value and sends gradient
        # s_i * grad log pi(y_t) to every token. For a per-sequence-uniform A this gives the same gradient as
        # TRL's importance_sampling_level="sequence" (grad of exp(masked mean)), for all three aggregations.
        seq_log_ratio = (log_ratio * mask).sum(dim=1) / tokens_per_seq
        ratio = torch.exp(seq_log_ratio.detach().unsqueeze(1) + logp - logp.detach())

    adv = advantages.unsqueeze(1)
    clipped_ratio = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = -torch.minimum(ratio * adv, clipped_ratio * adv)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()

    if ref_logp is not None:
        ref_minus_logp = ref_logp - logp
        k3 = torch.exp(ref_minus_logp) - ref_minus_logp - 1
        if beta > 0:
            per_token = per_token + beta * k3

    if aggregation == "sequence_mean":  # GRPO: mean over each sequence's tokens, then over sequences
        total = ((per_token * mask).sum(dim=1) / tokens_per_seq).sum()
    elif aggregation == "token_mean":  # DAPO: every token in the batch weighs the same
        total = (per_token * mask).sum()
    else:  # Dr.GRPO: a constant normaliser (rows x max length), so length does not rescale a sequence's gradient
        total = (per_token * mask).sum() / max_completion_length
    if denominator is None:
        denominator = loss_denominator(mask, aggregation)
    loss = total / (denominator if denominator > 0 else 1.0)

    with torch.no_grad():
        n_tokens = mask.sum().clamp(min=1)

        def token_mean(x):
            return (x.to(mask.dtype) * mask).sum() / n_tokens

        # As TRL: clipping changed the objective where r fell below 1-clip_low with A<0 or above 1+clip_high with A>0.
        low = (ratio < 1 - clip_low) & (adv < 0)
        high = (ratio > 1 + clip_high) & (adv > 0)
        metrics = {
            "clip_ratio/low": token_mean(low),
            "clip_ratio/high": token_mean(high),
            "clip_ratio": token_mean(low | high),
            "kl": token_mean(k3) if ref_logp is not None else logp.new_zeros(()),
            "ratio/mean": token_mean(ratio),
        }
    return loss, metrics


MISMATCH_MODES = ("sequence_mask", "sequence_truncate", "token_mask", "token_truncate")


def mismatch_weights(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, *,
                     mode: str = "sequence_mask", clip_max: float | None = 3.0, clip_min: float | None = None):
    """Truncated importance sampling for a rollout engine whose sampling distribution differs from the trainer's
    (TRL's vllm_importance_sampling_correction): w = pi_trainer / pi_engine of a completion's tokens (`sequence_*`:
    exp of the summed log-ratio, one weight per row [B, 1]; `token_*`: per token [B, T]); `*_mask` sets weights
    outside [clip_min, clip_max] to 0, `*_truncate` clips them into it. Returns (weights, metrics)."""
    if mode not in MISMATCH_MODES:
        raise ValueError(f"mismatch_correction.mode must be one of {MISMATCH_MODES}, got {mode!r}")
    mask = mask.to(trainer_logp.dtype)
    diff = torch.nan_to_num((trainer_logp.detach() - engine_logp) * mask, nan=0.0)
    log_ratio = diff.sum(dim=1, keepdim=True) if mode.startswith("sequence") else diff
    weights = torch.exp(log_ratio)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        weights = weights.clamp(min=clip_min, max=clip_max)
        outside = torch.zeros_like(weights, dtype=torch.bool)
    else:
        outside = (weights < low) | (weights > high)
        weights = weights.masked_fill(outside, 0.0)
    counted = mask.any(dim=1, keepdim=True) if mode.startswith("sequence") else mask.bool()
    values = weights[counted.expand_as(weights)] if counted.any() else weights.new_zeros(1)
    tokens, rows = mask.bool(), mask.bool().any(dim=1)
    masked_tokens = outside.expand_as(tokens) & tokens  # a masked sequence masks all its tokens
    masked_rows = masked_tokens.any(dim=1) & rows
    metrics = {"mismatch/is_weight/mean": values.mean(), "mismatch/is_weight/min": values.min(),
               "mismatch/is_weight/max": values.max(),
               # shares of the completion tokens, and of the completions (any token masked), whose weight is 0
               "mismatch/masked_tokens": masked_tokens.float().sum() / tokens.float().sum().clamp(min=1),
               "mismatch/masked_seqs": masked_rows.float().sum() / rows.float().sum().clamp(min=1)}
    return weights, metrics


def loss_denominator(mask: torch.Tensor, aggregation: str) -> float:
    """What `policy_loss` divides its sum by: the completion tokens (token_mean) or the rows (sequence_mean and
    constant, whose sum already holds each row's mean or its tokens / max length)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    return float(mask.sum()) if aggregation == "token_mean" else float(mask.shape[0])


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _check_policy_args(logp, old_logp, advantages, mask, clip_low, clip_high, aggregation, importance, beta,
                       ref_logp, max_completion_length):
    if not isinstance(logp, torch.Tensor) or logp.dim() != 2 or not logp.is_floating_point():
        raise ValueError(f"logp must be a 2-D float tensor [B, T], got {_describe(logp)}")
    shape = tuple(logp.shape)
    for name, x in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if x is None and name == "ref_logp":
            continue
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
            raise ValueError(f"{name} must have the shape of logp {shape}, got {_describe(x)}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold only 0/1 (or bool) values")
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) != shape[:1]:
        raise ValueError(f"advantages must have shape [B]=({shape[0]},), got {_describe(advantages)}")
    if not torch.isfinite(advantages).all():
        raise ValueError("advantages must be finite (NaN rewards should get advantage 0 from group_advantages)")
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low!r}")
    if not clip_high >= 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if importance not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance must be one of {IMPORTANCE_LEVELS}, got {importance!r}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logp (reference-model log-probs [B, T]); pass it or set beta=0")
    if aggregation == "constant":
        if not isinstance(max_completion_length, int) or max_completion_length < 1:
            raise ValueError(
                f"aggregation='constant' (Dr.GRPO) needs max_completion_length, a positive int; "
                f"got {max_completion_length!r}"
            )
        if max_completion_length < shape[1]:
            raise ValueError(
                f"max_completion_length={max_completion_length} is shorter than the completions (T={shape[1]})"
            )
