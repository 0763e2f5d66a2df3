"""The transformers backend: batched sampling on CPU or GPU, text-only or vision-language models.

Prompts are left-padded into batches of `batch_size`. For text-only models the prompt is prefilled once
and its key/value cache copied n times (as vLLM's prefix caching does), instead of prefilling n copies;
vision-language models (whose position ids depend on the image grid) use `num_return_sequences`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from curate.errors import UserError
from curate.generation import Prompt, SamplingParams, pil_images, render_chat
from curate.models import resolve_model


@dataclass
class LoadedModel:
    net: Any  # a transformers PreTrainedModel
    processor: Any  # the processor of a vision-language model, else the tokenizer
    tokenizer: Any
    vision: bool
    device: str


def load_model(model: str, device: str = "auto", dtype: str = "auto", weights: bool = True) -> LoadedModel:
    """Any causal LM, or a vision-language model with its processor, as transformers loads it (GGUF files
    and `smollm2-135m` through `curate.models`), or a checkpoint of `curate train` (`curate.train.checkpoint`).
    The tokenizer pads on the left, as generation needs. Without `weights`, the model's parameters are on the meta
    device (no memory) and its buffers real: the caller shards it, then `materialise`s what each process keeps."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from curate.train.checkpoint import is_sharded_checkpoint, read_weights  # curate.train loads models with this

    path = resolve_model(model)
    trained = is_sharded_checkpoint(Path(path))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    torch_dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32,
                   "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    processor = load_processor(model, path)
    vision = hasattr(processor, "image_processor")
    tokenizer = processor.tokenizer if vision else processor
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    vision_config = getattr(AutoConfig.from_pretrained(path), "vision_config", None)
    model_class = AutoModelForImageTextToText if vision and vision_config else AutoModelForCausalLM
    if weights and not trained:
        net = model_class.from_pretrained(path, dtype=torch_dtype).to(device)
        return LoadedModel(net, processor, tokenizer, vision, device)
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # buffers are computed at construction (rotary frequencies)
        net = model_class.from_config(AutoConfig.from_pretrained(path), dtype=torch_dtype)
    net.tie_weights()  # as from_pretrained does: a head sharing the embedding's weight is one parameter
    loaded = LoadedModel(net, processor, tokenizer, vision, device)
    if weights:  # a checkpoint of `curate train`, read whole in this process
        materialise(net, device)
        read_weights(Path(path), net, whole=True)
    return loaded


def materialise(net: torch.nn.Module, device: str) -> None:
    """Allocate the meta parameters of a model loaded without weights on `device`, uninitialised (each process only
    its shards once sharded), keeping its buffers' values and its tied parameters tied."""
    buffers = {name: buffer.to(device) for name, buffer in net.named_buffers()}
    first: dict[int, tuple[torch.nn.Module, str]] = {}  # where each parameter object is first met
    tied = []
    for module in net.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in first:
                tied.append((module, name, first[id(parameter)]))
            else:
                first[id(parameter)] = (module, name)
    net.to_empty(device=device)  # allocates each module's parameters apart, shared or not
    for module, name, (owner, owner_name) in tied:
        setattr(module, name, getattr(owner, owner_name))
    for name, value in buffers.items():
        net.get_buffer(name).copy_(value)


def cache_keyword(net: Any) -> str:
    """The name a model's forward (and its output) gives the key/value cache: `cache` in recent transformers,
    `past_key_values` before (as in the release the vLLM of the `gpu` extra pins)."""
    return "cache" if "cache" in inspect.signature(net.forward).parameters else "past_key_values"


def load_processor(model: str, path: str) -> Any:
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    try:
        return AutoProcessor.from_pretrained(path)
    except OSError as error:
        # transformers 5 builds every video processor with torchvision, and Qwen-VL processors have one.
        if "video processor" in str(error) and not is_torchvision_available():
            raise UserError(f"model {model}: its processor has a video part, which transformers builds with "
                            "torchvision: install torchvision matching your torch (e.g. torch==2.14.1 "
                            "torchvision==0.29.1)") from None
        raise


class TransformersGenerator:
    backend = "transformers"

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", batch_size: int = 8,
                 share_prefill: bool = True, progress: bool = False) -> None:
        self.model = model
        self.batch_size = batch_size
        self.share_prefill = share_prefill
        self.progress = progress
        loaded = load_model(model, device, dtype)
        self.net = loaded.net.eval()
        self.processor, self.tokenizer, self.vision, self.device = (loaded.processor, loaded.tokenizer, loaded.vision,
                                                                    loaded.device)

    def generate(self, prompts: Sequence[Prompt], n: int, params: SamplingParams) -> list[list[str]]:
        torch.manual_seed(params.seed)
        completions: list[list[str]] = []
        starts = range(0, len(prompts), self.batch_size)
        for start in tqdm(starts, desc=f"generate ({self.model})", unit="batch", disable=not self.progress):
            completions += self._generate_batch(prompts[start:start + self.batch_size], n, params)
        return completions

    def _generate_batch(self, prompts: Sequence[Prompt], n: int, params: SamplingParams) -> list[list[str]]:
        inputs = self.encode(prompts)
        greedy = params.temperature == 0
        # Greedy decoding gives n equal answers: compute one.
        copies = 1 if greedy else n
        sampling: dict[str, Any] = {"do_sample": False} if greedy else {
            "do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        with torch.inference_mode():
            if copies > 1 and self.share_prefill and not self.vision:
                output = self._generate_shared_prefill(inputs, copies, params.max_tokens, sampling)
            else:
                output = self.net.generate(**inputs, num_return_sequences=copies, max_new_tokens=params.max_tokens,
                                           pad_token_id=self.tokenizer.pad_token_id, **sampling)
        texts = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [texts[i * copies:(i + 1) * copies] * (n // copies) for i in range(len(prompts))]

    def encode(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        """Chat-templated, left-padded model inputs (with pixel values for vision-language models)."""
        texts = [render_chat(self.processor, p, self.vision) for p in prompts]
        if not self.vision:
            return self.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
        images = [pil_images(p) for p in prompts]
        return self.processor(text=texts, images=images if any(images) else None, return_tensors="pt",
                              padding=True).to(self.device)

    def _generate_shared_prefill(self, inputs: dict[str, torch.Tensor], n: int, max_tokens: int,
                                 sampling: dict[str, Any]) -> torch.Tensor:
        """Prefill each prompt (all but its last token) once, copy the cache n times, then sample n answers."""
        input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate derives from a left-padded mask
        keyword = cache_keyword(self.net)
        cache = getattr(self.net(input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1],
                                 position_ids=positions[:, :-1], use_cache=True, logits_to_keep=1), keyword)
        cache.batch_repeat_interleave(n)
        return self.net.generate(input_ids=input_ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                                 **{keyword: cache}, max_new_tokens=max_tokens,
                                 pad_token_id=self.tokenizer.pad_token_id, **sampling)

    def close(self) -> None:
        del self.net
