"""LoRA linear layers as one operation in the GRPO update. peft's forward makes three output-sized temporaries per
layer (lora_B's output, its product with the scaling, the sum), and its backward as many again. Here the adapter's
product is added into the base layer's output in place, and the backward is written out, so each layer allocates one
output in the forward and one input gradient in the backward. Same values up to float summation order (tested)."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch import nn


class LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ with W and b frozen: gradients for x, A and B only."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        rows = x.reshape(-1, x.shape[-1])
        down = rows @ lora_a.t()  # [n, r]
        out = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
        out.addmm_(down, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(rows, down, weight, lora_a, lora_b)
        ctx.scaling, ctx.input_shape = scaling, x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        rows, down, weight, lora_a, lora_b = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        up = grad @ lora_b  # [n, r]
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight).addmm_(up, lora_a, alpha=ctx.scaling).view(ctx.input_shape)
        if ctx.needs_input_grad[3]:
            grad_a = (up.t() @ rows).mul_(ctx.scaling)
        if ctx.needs_input_grad[4]:
            grad_b = (grad.t() @ down).mul_(ctx.scaling)
        return grad_x, None, None, grad_a, grad_b, None


def fused_forward(layer, peft_forward, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`layer`'s output through LoraLinearFunction when it is plain LoRA on a frozen nn.Linear: one active adapter,
    no dropout, no autocast, one dtype. Anything else (adapters off, merged, mixed batches, DoRA) goes to peft."""
    base = layer.get_base_layer()
    adapters = [name for name in layer.active_adapters if name in layer.lora_A]
    if (args or kwargs or layer.disable_adapters or layer.merged or len(adapters) != 1 or type(base) is not nn.Linear
            or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)
            or torch.is_autocast_enabled(x.device.type)):
        return peft_forward(x, *args, **kwargs)
    name = adapters[0]
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if not isinstance(layer.lora_dropout[name], nn.Identity) or not x.dtype == base.weight.dtype == lora_a.dtype:
        return peft_forward(x, *args, **kwargs)
    return LoraLinearFunction.apply(x, base.weight, base.bias, lora_a, lora_b, layer.scaling[name])


@contextmanager
def fused_lora(model):
    """Inside: every plain LoRA linear layer of a peft `model` (no DoRA or other variant, no fan_in_fan_out, no LoRA
    bias) runs `fused_forward`; after, peft's forward again. Other models: unchanged."""
    from peft.tuners.lora import Linear as LoraLinear

    layers = [m for m in model.modules()
              if type(m) is LoraLinear and not m.lora_variant and not m.fan_in_fan_out and not any(m.lora_bias.values())]
    for layer in layers:
        layer.forward = partial(fused_forward, layer, layer.forward)  # an instance attribute shadows the class's
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
