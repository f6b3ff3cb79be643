"""The model under test: a local backbone (greedy, batched; through HF generate or the training run's rollout engine)
or an OpenAI-compatible endpoint (concurrent requests)."""

from __future__ import annotations

import asyncio
import base64
import io
import mimetypes
from pathlib import Path
from typing import Any

import openai

from medix.errors import MedixError
from medix.eval.items import BenchmarkItem


def image_data_url(image: Any) -> str:
    """A `data:` URL for an image file path or a PIL image (re-encoded as RGB JPEG)."""
    if isinstance(image, (str, Path)):
        mime = mimetypes.guess_type(str(image))[0] or "image/jpeg"
        data = Path(image).read_bytes()
    else:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG")
        mime, data = "image/jpeg", buffer.getvalue()
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def item_image(item: BenchmarkItem):
    """The item's image as an RGB PIL image."""
    from PIL import Image

    image = Image.open(item.image) if isinstance(item.image, (str, Path)) else item.image
    return image.convert("RGB")


def chat_messages(item: BenchmarkItem, with_image: bool) -> list[dict]:
    """The user turn sent to an endpoint: the raw question, the image first when there is one."""
    if with_image and item.image is not None:
        content = [{"type": "image_url", "image_url": {"url": image_data_url(item.image)}},
                   {"type": "text", "text": item.question}]
        return [{"role": "user", "content": content}]
    return [{"role": "user", "content": item.question}]


class EndpointGenerator:
    """Greedy chat completions from an OpenAI-compatible server, at most `max_concurrency` in flight."""

    def __init__(self, base_url: str, model: str, api_key: str, *, max_new_tokens: int, max_concurrency: int,
                 timeout_s: float, max_retries: int, send_images: bool = True):
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries)
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.send_images = send_images
        self._slots = asyncio.Semaphore(max_concurrency)

    async def _one(self, item: BenchmarkItem) -> str:
        async with self._slots:
            try:
                response = await self.client.chat.completions.create(
                    model=self.model, messages=chat_messages(item, self.send_images),
                    max_tokens=self.max_new_tokens, temperature=0.0, top_p=1.0)
            except openai.OpenAIError as exc:
                raise MedixError(f"model endpoint {self.client.base_url} failed on item {item.id}: "
                                 f"{exc.__class__.__name__}: {exc}. Finished items are saved; rerun to resume.") from exc
        return response.choices[0].message.content or ""

    async def generate(self, items: list[BenchmarkItem]) -> list[str]:
        return list(await asyncio.gather(*(self._one(item) for item in items)))


class BackboneGenerator:
    """Greedy generation with a loaded `medix.models.Backbone`; text items batched with left padding."""

    def __init__(self, backbone, *, max_new_tokens: int, reasoning_tag: str, use_training_prompt: bool):
        self.backbone = backbone
        self.max_new_tokens = max_new_tokens
        self.reasoning_tag = reasoning_tag
        self.use_training_prompt = use_training_prompt
        backbone.tokenizer.padding_side = "left"
        if backbone.tokenizer.pad_token is None:
            backbone.tokenizer.pad_token = backbone.tokenizer.eos_token
        backbone.model.eval()

    def prompt(self, item: BenchmarkItem, with_image: bool) -> str:
        """The text fed to the model: the chat-templated raw question, or the training prompt when asked."""
        templater = self.backbone.processor or self.backbone.tokenizer
        if self.use_training_prompt:
            from medix.data import Sample
            from medix.data.prompts import render_prompt

            sample = Sample(id=item.id, problem=item.question, solution="", tag="", answer=item.reference,
                            images=[str(item.image)] if with_image else [], source=item.task)
            return render_prompt(sample, templater, self.reasoning_tag)
        content: Any = item.question
        if with_image:
            content = [{"type": "image"}, {"type": "text", "text": item.question}]
        if getattr(templater, "chat_template", None) or getattr(self.backbone.tokenizer, "chat_template", None):
            return templater.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
        return item.question

    def generate(self, items: list[BenchmarkItem]) -> list[str]:
        import torch

        tokenizer = self.backbone.tokenizer
        outputs: dict[int, str] = {}
        text_only = [i for i, it in enumerate(items) if not (self.backbone.is_vlm and it.image is not None)]
        with torch.inference_mode():
            if text_only:
                prompts = [self.prompt(items[i], with_image=False) for i in text_only]
                encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
                for i, text in zip(text_only, self._decode(encoded)):
                    outputs[i] = text
            for i, item in enumerate(items):
                if i not in outputs:  # VLM with an image: one at a time (processors differ in batched image input)
                    encoded = self.backbone.processor(text=[self.prompt(item, with_image=True)],
                                                      images=[item_image(item)], return_tensors="pt")
                    outputs[i] = self._decode(encoded)[0]
        return [outputs[i] for i in range(len(items))]

    def _decode(self, encoded) -> list[str]:
        tokenizer = self.backbone.tokenizer
        model = self.backbone.model
        encoded = {k: v.to(model.device) for k, v in encoded.items()}
        generated = model.generate(**encoded, max_new_tokens=self.max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
        new_tokens = generated[:, encoded["input_ids"].shape[1]:]
        return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


class EngineGenerator(BackboneGenerator):
    """Greedy answers of a loaded backbone sampled through a rollout engine (`rollout=vllm`: the vLLM server training
    uses, started for the backbone with its adapter loaded), with the prompts and images BackboneGenerator uses."""

    def __init__(self, backbone, engine, *, max_new_tokens: int, reasoning_tag: str, use_training_prompt: bool):
        super().__init__(backbone, max_new_tokens=max_new_tokens, reasoning_tag=reasoning_tag,
                         use_training_prompt=use_training_prompt)
        self.engine = engine

    def generate(self, items: list[BenchmarkItem]) -> list[str]:
        from medix.rollout.base import Sampling

        with_image = [self.backbone.is_vlm and item.image is not None for item in items]
        prompts = [self.prompt(item, with_image=w) for item, w in zip(items, with_image)]
        images = [[item_image(item)] if w else [] for item, w in zip(items, with_image)]
        rollout = self.engine.generate(self.backbone, prompts, images if any(with_image) else None, group_size=1,
                                       sampling=Sampling(max_new_tokens=self.max_new_tokens, temperature=0.0))
        return [text.strip() for text in rollout.texts]

    def close(self) -> None:
        self.engine.close()
