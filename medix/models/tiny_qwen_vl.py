"""`backbone=tiny_qwen_vl`: an offline Qwen2.5-VL built once into `<cache_dir>/models/tiny_qwen_vl`, a folder that
transformers and vLLM both load. Its language model is SmolLM2-135M-Instruct's weights in the Qwen2.5-VL text
architecture (Llama and Qwen2 compute the same function once Qwen2's q/k/v biases are zero, and M-RoPE equals 1-D
RoPE on text tokens), so it writes readable text; its vision tower is small and RANDOM-initialised (seeded), so it
has never seen an image. Head size 64, which vLLM's CPU attention accepts. Use it to run the paper's recipe (images,
Qwen-VL inputs, FSDP2, the vLLM engine) on a CPU, never to judge answer quality."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from medix.errors import MedixError
from medix.models.loading import build_folder_once

log = logging.getLogger(__name__)

NAME = "tiny_qwen_vl"
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
SEED = 0
# 28-pixel merge units: every image is resized to 4..64 image tokens (at most 224 x 224 pixels).
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 64
VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=576, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
# sha256 of the built model.safetensors: the same bytes on every machine (a seeded tower, SmolLM2's converted weights).
WEIGHTS_SHA256 = "86b656cb767a4177f57e47ce0e8113f6d0660572fbe47e964f3ef927524d0d40"

# SmolLM2's chat template, with image parts of a message's content rendered as Qwen's vision markers.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_qwen_vl_folder(cache_dir: str | Path) -> Path:
    """The built folder (built now if missing), its weights checked against the pinned sha256."""
    from medix.models.gguf import smollm2_folder

    folder = Path(cache_dir) / "models" / NAME
    if not (folder / "config.json").is_file():
        build(smollm2_folder(cache_dir), folder)
    check(folder)
    return folder


def check(folder: Path) -> None:
    """MedixError unless the folder's weights are the ones this code builds (a stamp skips re-hashing)."""
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise MedixError(f"{folder} has no model.safetensors; delete the folder to rebuild it")
    stamp_path = folder / "medix_build.json"
    stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
    st = weights.stat()
    if stamp.get("size") == st.st_size and stamp.get("mtime_ns") == st.st_mtime_ns and stamp.get("sha256"):
        actual = stamp["sha256"]
    else:
        actual = sha256_of(weights)
    if WEIGHTS_SHA256 is not None and actual != WEIGHTS_SHA256:
        raise MedixError(f"{weights}: sha256 {actual} is not the pinned {WEIGHTS_SHA256} of backbone={NAME}; "
                         "delete the folder to rebuild it")
    stamp_path.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": actual}))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def build(text_folder: Path, folder: Path) -> Path:
    """Write the model folder (config, weights, tokenizer with Qwen's vision tokens, chat template, image processor
    config) from SmolLM2's converted folder, atomically."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    log.info("building %s from %s (one time)", folder, text_folder)
    text = json.loads((text_folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(text_folder)
    tokenizer.add_tokens(list(VISION_TOKENS), special_tokens=True)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    unit = head_dim // 16  # M-RoPE sections (temporal, height, width) over head_dim / 2, in Qwen's 16:24:24 ratio
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"], num_attention_heads=text["num_attention_heads"],
            num_key_value_heads=text["num_key_value_heads"], hidden_act=text["hidden_act"],
            max_position_embeddings=text["max_position_embeddings"], rms_norm_eps=text["rms_norm_eps"],
            rope_parameters={"rope_type": "default", "rope_theta": text["rope_parameters"]["rope_theta"],
                             "mrope_section": [2 * unit, 3 * unit, 3 * unit]},
            bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"], pad_token_id=text["pad_token_id"],
            tie_word_embeddings=False),
        vision_config=dict(VISION, out_hidden_size=text["hidden_size"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)  # vLLM reloads every weight of an untied model in place (see save_for_reload)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]  # what vLLM serves it as
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (text["bos_token_id"], text["eos_token_id"],
                                                                   text["pad_token_id"])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen2_5_VLForConditionalGeneration(config).state_dict().items()}
    state = weights(shapes, text_folder)

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(tmp)
        image_processor().save_pretrained(tmp)
        generation = {"bos_token_id": text["bos_token_id"], "eos_token_id": text["eos_token_id"],
                      "pad_token_id": text["pad_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    return build_folder_once(folder, write)


def weights(shapes: dict[str, torch.Size], text_folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the Qwen2.5-VL: SmolLM2's weights for the language model (q/k/v biases zero; the LM head a
    copy of the tied embedding; the vision tokens' rows zero), the vision tower drawn from a seeded generator in
    name order (normal(0, 0.02) matrices, unit norms, zero biases)."""
    from safetensors.torch import load_file

    smol = load_file(str(text_folder / "model.safetensors"))
    generator = torch.Generator().manual_seed(SEED)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name == "lm_head.weight":
            source = smol.get("lm_head.weight", smol["model.embed_tokens.weight"])
            state[name] = grown(source, shape)
        elif name.startswith("model.language_model."):
            key = "model." + name.removeprefix("model.language_model.")
            if key in smol:
                state[name] = grown(smol[key], shape)
            elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                state[name] = torch.zeros(shape)
            else:
                raise MedixError(f"building {NAME}: no SmolLM2 weight for {name} ({key})")
        elif name.startswith("model.visual."):
            if name.endswith("bias"):
                state[name] = torch.zeros(shape)
            elif "norm" in name and len(shape) == 1:
                state[name] = torch.ones(shape)
            else:
                state[name] = torch.randn(shape, generator=generator) * 0.02
        else:
            raise MedixError(f"building {NAME}: unexpected weight {name}")
    return {k: v.to(torch.float32).contiguous() for k, v in state.items()}


def grown(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`tensor` with zero rows appended up to `shape` (the vocabulary grown by the vision tokens)."""
    if tensor.shape == shape:
        return tensor.clone()
    out = torch.zeros(shape, dtype=tensor.dtype)
    out[:tensor.shape[0]] = tensor
    return out


def image_processor():
    """Qwen2-VL's PIL image processor (no torchvision: the same resize on every machine, in the trainer and in the
    vLLM server), bounded to MIN_PIXELS..MAX_PIXELS."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=VISION["patch_size"],
                                    merge_size=VISION["spatial_merge_size"],
                                    temporal_patch_size=VISION["temporal_patch_size"])
