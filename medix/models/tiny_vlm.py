"""An offline vision-language policy for plumbing tests: a small RANDOM-initialised (seeded) vision tower joined,
Llava-style, to the real SmolLM2-135M text model. The images mean nothing to it until trained; use it to exercise
the VLM code paths (processor, pixel values, rollout, LoRA, saving) on a CPU, never to judge answer quality."""

from __future__ import annotations

import copy
import json
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from medix.errors import ConfigError, MedixError
from medix.models.base import Backbone, Encoded, load_trained_weights
from medix.models.loading import apply_lora, model_folder, torch_dtype

IMAGE_TOKEN = "<|image|>"  # one marker per image in the chat text; the processor repeats it tokens_per_image times
VISION_FILE = "vision_tower.safetensors"
VISION_CONFIG_FILE = "tiny_vlm.json"
VISION_KEYS = ("image_size", "patch_size", "width", "layers", "heads")


class TinyVisionTower(nn.Module):
    """Square image -> conv patch embedding -> transformer encoder -> projection to the LM hidden size."""

    def __init__(self, *, image_size: int, patch_size: int, width: int, layers: int, heads: int, out_dim: int,
                 out_std: float):
        super().__init__()
        grid = image_size // patch_size
        self.shape = {"image_size": image_size, "patch_size": patch_size, "width": width, "layers": layers, "heads": heads}
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.randn(1, grid * grid, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.projector = nn.Linear(width, out_dim)
        # Projected features start at the scale of the LM's token embeddings, so the LM is not swamped.
        nn.init.normal_(self.projector.weight, std=out_std / math.sqrt(width))
        nn.init.zeros_(self.projector.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, (S/patch)^2, out_dim]."""
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2) + self.position
        return self.projector(self.norm(self.encoder(x)))


class TinyImageProcessor:
    """PIL images -> [n, 3, S, S] floats: RGB, bicubic resize to a fixed square, scaled to [-1, 1]."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        arrays = [np.asarray(img.convert("RGB").resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
                  for img in images]
        if not arrays:
            return torch.zeros(0, 3, *size)
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
        return (pixels - 0.5) / 0.5


def flatten_content(content) -> str:
    """A chat message's content as text: each {'type': 'image'} item becomes one image marker."""
    if isinstance(content, str):
        return content
    parts = []
    for item in content:
        kind = item.get("type")
        if kind == "image":
            parts.append(IMAGE_TOKEN)
        elif kind == "text":
            parts.append(item["text"])
        else:
            raise ValueError(f"chat content item of type {kind!r}; tiny_vlm understands 'image' and 'text'")
    return "".join(parts)


class TinyVLMProcessor:
    """Chat template + tokenizer + image processor; expands each image marker to `tokens_per_image` image tokens."""

    def __init__(self, tokenizer, image_processor: TinyImageProcessor, tokens_per_image: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.tokens_per_image = tokens_per_image
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kwargs):
        flat = [{**m, "content": flatten_content(m["content"])} for m in messages]
        return self.tokenizer.apply_chat_template(flat, add_generation_prompt=add_generation_prompt,
                                                  tokenize=tokenize, **kwargs)

    def __call__(self, text, images=None, return_tensors: str = "pt", padding=True, **kwargs) -> dict:
        """input_ids/attention_mask (markers expanded) and, when any row has images, pixel_values [B, M, 3, S, S]
        (M = most images in a row; rows with fewer are zero-padded; the model reads each row's count off its tokens)."""
        texts = [text] if isinstance(text, str) else list(text)
        rows = [[] for _ in texts] if images is None else [[r] if isinstance(r, Image.Image) else list(r) for r in images]
        if len(rows) != len(texts):
            raise MedixError(f"tiny_vlm processor got {len(texts)} texts but {len(rows)} image lists; need one per text")
        for i, (t, imgs) in enumerate(zip(texts, rows)):
            if t.count(IMAGE_TOKEN) != len(imgs):
                raise MedixError(f"tiny_vlm processor row {i}: {t.count(IMAGE_TOKEN)} {IMAGE_TOKEN} marker(s) in the "
                                 f"text but {len(imgs)} image(s); render prompts with processor.apply_chat_template")
        expanded = [t.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.tokens_per_image) for t in texts]
        enc = dict(self.tokenizer(expanded, return_tensors=return_tensors, padding=padding, **kwargs))
        most = max((len(r) for r in rows), default=0)
        if most:
            size = self.image_processor.image_size
            pixels = torch.zeros(len(rows), most, 3, size, size)
            for i, imgs in enumerate(rows):
                if imgs:
                    pixels[i, :len(imgs)] = self.image_processor(imgs)
            enc["pixel_values"] = pixels
        return enc

    @property
    def chat_template(self):
        return self.tokenizer.chat_template

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


class TinyVLM(nn.Module):
    """SmolLM2 (optionally LoRA-wrapped) whose image-token embeddings are replaced by vision-tower features."""

    def __init__(self, language_model, vision_tower: TinyVisionTower, image_token_id: int, tokens_per_image: int):
        super().__init__()
        self.language_model = language_model
        self.vision_tower = vision_tower
        self.reference_vision = None  # frozen initial tower; used inside disable_adapter() (the GRPO reference)
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.use_reference_vision = False

    @property
    def config(self):
        return self.language_model.config

    @property
    def generation_config(self):
        return self.language_model.generation_config

    @property
    def device(self) -> torch.device:
        return self.vision_tower.projector.weight.device

    # ---- inputs ---------------------------------------------------------------------------------------------------
    def image_features(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features of each row's real images, in order: [n_image_tokens_in_batch, hidden]."""
        if pixel_values.dim() == 4:
            pixel_values = pixel_values.unsqueeze(1)
        n_tokens = (input_ids == self.image_token_id).sum(dim=1)
        if bool((n_tokens % self.tokens_per_image).any()):
            raise MedixError(f"tiny_vlm: image token counts {n_tokens.tolist()} per row are not multiples of "
                             f"{self.tokens_per_image}; build inputs with the tiny_vlm processor")
        counts = n_tokens // self.tokens_per_image
        if pixel_values.shape[0] != input_ids.shape[0] or int(counts.max()) > pixel_values.shape[1]:
            raise MedixError(f"tiny_vlm: rows need {counts.tolist()} image(s) but pixel_values has shape "
                             f"{list(pixel_values.shape)}; expected [rows, images, 3, S, S]")
        valid = torch.arange(pixel_values.shape[1], device=counts.device)[None, :] < counts[:, None]
        tower = self.reference_vision if self.use_reference_vision else self.vision_tower
        return tower(pixel_values[valid].to(tower.projector.weight.dtype)).flatten(0, 1)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        embeds = self.language_model.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        if pixel_values is None:
            if bool(is_image.any()):
                raise MedixError("tiny_vlm: input_ids hold image tokens but no pixel_values were given")
            return embeds
        features = self.image_features(input_ids, pixel_values).to(embeds.dtype)
        return embeds.masked_scatter(is_image.unsqueeze(-1), features)

    # ---- forward / generate ------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask=None, position_ids=None, pixel_values=None,
                logits_to_keep: int = 0, use_cache=None, **kwargs):
        outputs = self.language_model(inputs_embeds=self.embed(input_ids, pixel_values), attention_mask=attention_mask,
                                      position_ids=position_ids, logits_to_keep=logits_to_keep, use_cache=use_cache,
                                      **kwargs)
        # The image token is input-only: never predicted (generate suppresses it the same way).
        outputs.logits = outputs.logits.index_fill(-1, torch.tensor([self.image_token_id], device=input_ids.device),
                                                   torch.finfo(outputs.logits.dtype).min)
        return outputs

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask=None, pixel_values=None, **kwargs) -> torch.Tensor:
        """Prompt + completion ids, like a decoder-only HF model; the first step reads the merged embeddings."""
        suppress = list(kwargs.pop("suppress_tokens", None) or []) + [self.image_token_id]
        return self.language_model.generate(input_ids=input_ids, inputs_embeds=self.embed(input_ids, pixel_values),
                                            attention_mask=attention_mask, suppress_tokens=suppress, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
        """Checkpoint the LM's decoder layers (the vision tower is too small to matter)."""
        self.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs)
        self.language_model.config.use_cache = False

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    # ---- LoRA (present only when the language model is peft-wrapped) -----------------------------------------------
    @property
    def peft_config(self):
        if not hasattr(self.language_model, "peft_config"):
            raise AttributeError("tiny_vlm without LoRA has no peft_config")
        return self.language_model.peft_config

    @property
    def disable_adapter(self):
        """Context manager: the reference policy = base LM without LoRA + the initial (seeded) vision tower."""
        if not hasattr(self.language_model, "disable_adapter"):
            raise AttributeError("tiny_vlm without LoRA has no disable_adapter")
        return self._reference_policy

    @contextmanager
    def _reference_policy(self):
        with self.language_model.disable_adapter():
            self.use_reference_vision = self.reference_vision is not None
            try:
                yield
            finally:
                self.use_reference_vision = False

    # ---- saving ----------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, **kwargs) -> None:
        """LoRA adapter (or the full LM without LoRA) + vision tower/projector weights + the vision shape."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if hasattr(self.language_model, "peft_config"):
            # The new image-token row is never read (replaced by features) nor predicted, so embeddings are not saved.
            self.language_model.save_pretrained(str(directory), save_embedding_layers=False, **kwargs)
        else:
            self.language_model.save_pretrained(str(directory), **kwargs)
        state = {k: v.detach().contiguous().cpu() for k, v in self.vision_tower.state_dict().items()}
        save_file(state, str(directory / VISION_FILE))
        (directory / VISION_CONFIG_FILE).write_text(json.dumps(self.vision_tower.shape, indent=2) + "\n")

    def load_trained(self, directory: str | Path) -> "TinyVLM":
        """Load what save_pretrained wrote (LoRA adapter or full LM, and the vision tower) into this model."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / VISION_FILE).is_file():
            raise ConfigError(f"adapter {str(directory)!r} has no {VISION_FILE} (expected a tiny_vlm run's adapter/)")
        saved = json.loads((directory / VISION_CONFIG_FILE).read_text())
        if saved != self.vision_tower.shape:
            raise ConfigError(f"adapter {str(directory)!r} holds a vision tower shaped {saved} but backbone.vision "
                              f"asks for {self.vision_tower.shape}; set backbone.vision to match")
        if (directory / "adapter_config.json").is_file() or (directory / "config.json").is_file():
            self.language_model = load_trained_weights(self.language_model, directory)
        if hasattr(self.language_model, "peft_config") and self.reference_vision is None:
            self.reference_vision = copy.deepcopy(self.vision_tower).requires_grad_(False)
        trainable = any(p.requires_grad for p in self.vision_tower.parameters())
        self.vision_tower.load_state_dict(load_file(str(directory / VISION_FILE)))
        self.vision_tower.requires_grad_(trainable)
        return self


def build_vision_tower(vision_cfg, hidden_size: int, embedding_std: float) -> TinyVisionTower:
    """The seeded random tower; the global torch RNG is left untouched."""
    image_size, patch_size = int(vision_cfg.image_size), int(vision_cfg.patch_size)
    if patch_size <= 0 or image_size % patch_size:
        raise ConfigError(f"backbone.vision.image_size={image_size} must be a positive multiple of "
                          f"backbone.vision.patch_size={patch_size}")
    if int(vision_cfg.width) % int(vision_cfg.heads):
        raise ConfigError(f"backbone.vision.width={vision_cfg.width} must be divisible by "
                          f"backbone.vision.heads={vision_cfg.heads}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(vision_cfg.seed))
        return TinyVisionTower(image_size=image_size, patch_size=patch_size, width=int(vision_cfg.width),
                               layers=int(vision_cfg.layers), heads=int(vision_cfg.heads), out_dim=hidden_size,
                               out_std=embedding_std)


class TinyVLMBackbone(Backbone):
    """tiny_vlm's row layout: each row's images as a [n, 3, S, S] tensor; batches zero-pad to the most images."""

    is_vlm = True

    def encode(self, prompts: list[str], images: list[list] | None = None) -> Encoded:
        enc = self.processor(text=prompts, images=images, return_tensors="pt", padding=True)
        row_images = None
        if "pixel_values" in enc:
            counts = [len(row) for row in images]
            row_images = [enc["pixel_values"][i, :count] if count else None for i, count in enumerate(counts)]
        return Encoded(enc["input_ids"], enc["attention_mask"], {}, row_images)

    def image_inputs(self, row_images):
        present = [r for r in (row_images or []) if r is not None]
        if not present:
            return {}
        most = max(r.shape[0] for r in present)
        template = present[0]
        pixels = template.new_zeros(len(row_images), most, *template.shape[1:])
        for i, row in enumerate(row_images):
            if row is not None:
                pixels[i, :row.shape[0]] = row
        return {"pixel_values": pixels}

    def save_trained(self, folder, state_dict=None):
        folder = Path(folder)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(str(folder))
        return folder

    def load_trained(self, folder) -> None:
        self.model.load_trained(folder)


def load_tiny_vlm(*, name: str, source: str, model: str, gguf=None, language_model: str = "smollm2_135m",
                  dtype: str = "float32", gradient_checkpointing: bool = False, adapter: str | None = None,
                  lora=None, train_vision_tower: bool = True, vision, cache_dir: str) -> TinyVLMBackbone:
    """`backbone=tiny_vlm`: SmolLM2 + the seeded vision tower, the processor, LoRA and a saved adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The text model's own cache folder name, so its converted folder under cache/models is shared with that backbone.
    path = model_folder(name=language_model, source=source, model=model, gguf=gguf, cache_dir=cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    embedding_rows = lm.get_input_embeddings().weight.shape[0]
    embedding_std = float(lm.get_input_embeddings().weight.detach().float().std())
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # deterministic; the row is never used (replaced on input, masked on output)
        lm.get_input_embeddings().weight[embedding_rows:] = 0.0
    tower = build_vision_tower(vision, lm.config.hidden_size, embedding_std).to(torch_dtype(dtype))
    tower.requires_grad_(bool(train_vision_tower))
    tokens_per_image = (int(vision.image_size) // int(vision.patch_size)) ** 2
    lora_on = lora is not None
    if lora_on:
        lm = apply_lora(lm, lora)
    network = TinyVLM(lm, tower, image_token_id, tokens_per_image)
    if gradient_checkpointing:
        network.activation_checkpointing_enable()
    if lora_on:
        network.reference_vision = copy.deepcopy(tower).requires_grad_(False)
    processor = TinyVLMProcessor(tokenizer, TinyImageProcessor(int(vision.image_size)), tokens_per_image)
    backbone = TinyVLMBackbone(network, tokenizer, name, processor, path=str(path))
    if adapter:
        backbone.load_trained(adapter)
    return backbone
