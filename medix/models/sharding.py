"""FSDP2 for medix policies: `fully_shard` per decoder layer (and vision block), then the root; gathering the shards
back into one Hugging Face folder; the Lightning strategy that drives it (ModelParallelStrategy, data-parallel only).
"""

from __future__ import annotations

import copy
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

# Blocks of models that carry no `_no_split_modules` (medix's tiny_vlm vision tower is an nn.TransformerEncoder).
GENERIC_BLOCKS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def fsdp_strategy(devices: int, num_nodes: int = 1, save_distributed_checkpoint: bool = True,
                  param_dtype: str = "auto", **kwargs):
    """Lightning's ModelParallelStrategy as pure FSDP: every process in the data-parallel dimension. Its "auto" sizes
    put all devices of a node in the tensor-parallel dimension instead, so ranks would get the same data and no
    sharding. save_distributed_checkpoint: a folder of per-rank DCP shards (True) or one full file from rank 0.
    param_dtype: the dtype units compute in (`bfloat16`: `bf16_mixed_precision()`; `float32`; `auto`: bf16 on a GPU,
    fp32 on the CPU); the GRPO module reads it as `strategy.mp_policy` when it shards the policy."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if param_dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"trainer.strategy.param_dtype={param_dtype!r}; expected auto, bfloat16 or float32")
    strategy = ModelParallelStrategy(data_parallel_size=int(devices) * int(num_nodes), tensor_parallel_size=1,
                                     save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
    bf16 = param_dtype == "bfloat16" or (param_dtype == "auto" and torch.cuda.is_available())
    strategy.mp_policy = bf16_mixed_precision() if bf16 else None
    return strategy


def bf16_mixed_precision():
    """The GPU policy: bf16 parameters for compute (all-gathered in bf16), gradients reduced in fp32; the sharded
    parameters the optimizer steps stay fp32. Use it with Lightning precision "32-true" (not "bf16-true", which would
    cast the sharded fp32 master weights, nor "bf16-mixed", whose autocast only adds casts on top)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def data_parallel_mesh(mesh):
    """The 1-D mesh to shard over: `mesh` itself, or the "data_parallel" dimension of Lightning's 2-D mesh (whose
    "tensor_parallel" dimension must then have size 1)."""
    names = mesh.mesh_dim_names or ()
    if mesh.ndim == 1:
        return mesh
    if "data_parallel" not in names:
        raise ValueError(f"shard_model: a {mesh.ndim}-D mesh needs a 'data_parallel' dimension, got {names}")
    others = {n: mesh[n].size() for n in names if n != "data_parallel"}
    if any(size != 1 for size in others.values()):
        raise ValueError(f"shard_model shards over 'data_parallel' only, but the mesh also has {others}; build the "
                         "strategy with medix.models.sharding.fsdp_strategy (tensor_parallel_size=1)")
    return mesh["data_parallel"]


def layer_class_names(model: nn.Module) -> set[str]:
    """Class names of the blocks to shard one by one: the `_no_split_modules` of every Hugging Face model inside
    `model` (a PEFT wrapper's base model, a VLM's language model and vision tower)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def decoder_layers(model: nn.Module, layer_classes: Iterable[str | type] | None = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of each block `shard_model` makes its own FSDP unit, children before their parents. Blocks
    are matched by class name (default: `layer_class_names(model)`) or type (default: GENERIC_BLOCKS)."""
    wanted = list(layer_classes) if layer_classes is not None else [*layer_class_names(model), *GENERIC_BLOCKS]
    names = {c for c in wanted if isinstance(c, str)}
    kinds = tuple(c for c in wanted if isinstance(c, type))
    found = [(name, m) for name, m in model.named_modules()
             if m is not model and (type(m).__name__ in names or _original_class(m).__name__ in names
                                    or (kinds and isinstance(m, kinds)))]
    return found[::-1]  # named_modules is pre-order: reversed, every block comes before any block that holds it


def shard_model(model: nn.Module, mesh, *, mp_policy=None, reshard_after_forward: bool = True,
                layer_classes: Iterable[str | type] | None = None) -> nn.Module:
    """Apply FSDP2 in place: `fully_shard` on each block of `decoder_layers(model)`, then on `model` itself (which
    keeps the rest: embeddings, final norm, LM head, tied or not). Deep-copy a reference model before this (FSDP
    modules refuse deepcopy) and shard it the same way. reshard_after_forward applies to the root too, so after
    every forward each rank holds only its shards (`gathered_for_generation` lifts that for a rollout)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if isinstance(model, FSDPModule):
        raise ValueError(f"shard_model: {type(model).__name__} is already sharded")
    mesh = data_parallel_mesh(mesh)
    layers = decoder_layers(model, layer_classes)
    if not layers:
        raise ValueError(f"shard_model: no blocks to shard in {type(model).__name__} (looked for "
                         f"{sorted(layer_class_names(model)) or 'no _no_split_modules'} and {GENERIC_BLOCKS}); "
                         "pass layer_classes=[...]")
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                  mp_policy=mp_policy if mp_policy is not None else MixedPrecisionPolicy())
    for _, layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    model._medix_reshard_after_forward = reshard_after_forward
    if callable(getattr(model, "generate", None)):
        # A PEFT model's (or tiny_vlm's) generate runs the inner model's forward, never the root's: without this the
        # root's own shards (embeddings, head) would not be gathered.
        register_fsdp_forward_method(model, "generate")
    # transformers' generate turns on synced_gpus by itself only for modules flagged this way (torch sets the flag
    # today, as a private detail): set it on every module so a rank that finishes early keeps joining collectives.
    for module in model.modules():
        module._is_fsdp_managed_module = True
    return model


def is_sharded(model: nn.Module) -> bool:
    """Parameters sharded over ranks with FSDP2, so every forward is a collective (generate needs synced_gpus)."""
    from torch.distributed.fsdp import FSDPModule

    return torch.distributed.is_initialized() and any(isinstance(m, FSDPModule) for m in model.modules())


@contextmanager
def gathered_for_generation(model: nn.Module):
    """Inside: each FSDP unit stays gathered after its first forward, so decoding runs one all-gather per unit for
    the whole `generate` instead of one per unit per token (memory: the full model per rank, no gradients). On
    exit every unit is resharded, as training expects. Call it on every rank; use it with no_grad only."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for unit in units:
            unit.set_reshard_after_forward(getattr(model, "_medix_reshard_after_forward", True), recurse=False)
            unit.reshard()


def run_as_forward(model: nn.Module, fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) inside the root FSDP unit's forward hooks: what calls the body (`model.model`) and reads
    `lm_head.weight` directly (the chunked LM head) need, since outside the root's forward those are still shards.
    Gradients of what fn returns reduce like those of `model(...)`. Without FSDP: just fn(*args, **kwargs)."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if not isinstance(model, FSDPModule):
        return fn(*args, **kwargs)
    if "_medix_forward_call" not in model.__dict__:
        model._medix_forward_call = types.MethodType(lambda self, f, *a, **k: f(*a, **k), model)
        register_fsdp_forward_method(model, "_medix_forward_call")
    return model._medix_forward_call(fn, *args, **kwargs)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU, on rank 0 (every other rank gets {}). A collective: call it on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_parameters(model: nn.Module, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The full values of the parameters whose names `keep` selects (a LoRA adapter's), on CPU, on every rank. A
    collective: every rank gathers every selected parameter, in the same order, before any rank sends anything on
    (a rank-0 send between the gathers hangs the others, TRL#7103)."""
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for name, p in model.named_parameters() if keep(name)}


def save_full_pretrained(model: nn.Module, tokenizer, folder: str | Path, *,
                         twin: Callable[[], nn.Module] | None = None) -> Path:
    """One Hugging Face folder of the whole model, written by rank 0, that `from_pretrained` loads without peft: a
    PEFT-wrapped model is saved with its active LoRA adapter merged into the base weights. The shards are gathered
    into a meta-device twin of the model (no second initialisation), so rank 0 needs the full weights in CPU memory
    once. twin: builds that unsharded model for classes that are neither transformers nor peft models (its state-dict
    keys must match `model`'s, and it needs `save_pretrained`). A collective: call it on every rank."""
    folder = Path(folder)
    state = full_state_dict(model)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        clone = twin() if twin is not None else meta_twin(model)
        clone.load_state_dict(state, strict=True, assign=True)
        if hasattr(clone, "merge_and_unload"):
            clone = clone.merge_and_unload()
        if hasattr(clone, "tie_weights"):
            clone.tie_weights()
        folder.mkdir(parents=True, exist_ok=True)
        clone.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    if distributed:
        torch.distributed.barrier()
    return folder


def meta_twin(model: nn.Module) -> nn.Module:
    """An unsharded model of the same class and config (a PEFT model: same base class, same adapter), its weights
    on the meta device, to load a full state dict into with assign=True."""
    from transformers import PreTrainedModel

    peft_config = None
    base = model
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        peft_config = model.peft_config[model.active_adapter]
        base = model.get_base_model()
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"save_full_pretrained: cannot rebuild a {type(base).__name__} (not a transformers model); "
                        "pass twin=<a function returning the unsharded model>")
    with torch.device("meta"):
        clone = _original_class(base)._from_config(base.config)
        if peft_config is not None:
            from peft import get_peft_model

            clone = get_peft_model(clone, copy.deepcopy(peft_config))
    target = clone.get_base_model() if peft_config is not None else clone
    target.generation_config = copy.deepcopy(base.generation_config)
    return clone


def _original_class(module: nn.Module) -> type:
    """The class fully_shard replaced (`FSDPLlamaForCausalLM` -> `LlamaForCausalLM`)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if issubclass(cls, FSDPModule):
        return next(b for b in cls.__bases__ if not issubclass(b, FSDPModule))
    return cls
