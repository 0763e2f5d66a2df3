"""A tiny randomly initialised Qwen2-VL built from a config, for the trainer's and the probe's vision paths under
transformers and vLLM (test support: nothing here is part of curate).

The model has a character-level tokenizer of our own (Qwen's special tokens and a Qwen2-VL-style chat template)
and the real Qwen2-VL processor, saved with `save_pretrained` and loaded by `load_model` (transformers) or by
vLLM like any checkpoint. An image goes through the processor (its `<|image_pad|>` expansion and
`pixel_values` / `image_grid_thw`) into the vision tower.

The processor without torchvision: transformers 5 builds `Qwen2VLProcessor` with a video processor, and every
video processor is backed by torchvision, which this CPU set-up cannot install beside torch 2.13 (transformers
issues #43986, #48556: no processor with a video slot loads without it). Where torchvision is missing,
`ImageOnlyQwen2VLProcessor` is used: `Qwen2VLProcessor` itself (chat template, image token expansion,
`mm_token_type_ids`, the PIL image processor) minus the video slot, registered with `AutoProcessor` for
Qwen2-VL configs so that `load_model` -> `AutoProcessor.from_pretrained` finds it, and with vLLM's Qwen2-VL
(`image_only_vllm_qwen2_vl`), whose processing info asks for `Qwen2VLProcessor` by class. Only tests register
them, and only where the stock processor cannot load at all; with torchvision the stock `Qwen2VLProcessor` is
saved and loaded, and nothing is registered.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image as PILImage
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.utils import is_torchvision_available

from curate.sample import Image, ImagePart, Message, Sample, TextPart

SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
MARKUP = ["<tool_call>", "</tool_call>", "<answer>", "</answer>", "<tool_response>", "</tool_response>"]
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n"]
# Qwen2-VL's template, trimmed: ChatML turns, each image part as `<|vision_start|><|image_pad|><|vision_end|>`.
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<|vision_start|><|image_pad|>"
            "<|vision_end|>{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MERGE = 2  # the vision tower merges 2x2 patches into one token: 4 patches per image token
CROP_CALL = ('<tool_call>{"name": "python", "arguments": {"code": "image_1.crop((0, 0, 32, 32)).show()\\n'
             'print(image_1.size)"}}</tool_call>')


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without its video slot, for set-ups without torchvision (see the module docstring).
    `ProcessorMixin` takes its sub-processors from the `__init__` signature: leaving `video_processor` out of it
    is all it takes; the video processor the parent passes on is then None and dropped."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def qwen2_vl_processor(tokenizer: PreTrainedTokenizerFast) -> Qwen2VLProcessor:
    # 56x56 to 112x112 pixels: a 64x64 picture becomes 4x4 patches of 14 pixels, 4 image tokens.
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    if is_torchvision_available():
        from transformers import Qwen2VLVideoProcessor

        return Qwen2VLProcessor(images, tokenizer, Qwen2VLVideoProcessor(), chat_template=TEMPLATE)
    AutoProcessor.register(Qwen2VLConfig, ImageOnlyQwen2VLProcessor, exist_ok=True)
    return ImageOnlyQwen2VLProcessor(images, tokenizer, chat_template=TEMPLATE)


def build_tiny_qwen2_vl(folder: Path, seed: int = 0, head_dim: int = 16) -> Path:
    """A Qwen2-VL of 2 text layers with 4 attention heads of `head_dim` (16: about 150k parameters; vLLM's CPU
    attention needs 64) and 1 vision block of width 32, saved with its processor as a folder `load_model` and
    vLLM read."""
    vocab = {token: index for index, token in enumerate(SPECIAL + MARKUP + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>",
                                        chat_template=TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    tokenizer.add_tokens(MARKUP)
    torch.manual_seed(seed)
    pairs = head_dim // 2  # M-RoPE splits a head's rotary pairs into temporal, height and width sections
    sections = [pairs - 2 * (3 * pairs // 8), 3 * pairs // 8, 3 * pairs // 8]  # 16 wide: [2, 3, 3]
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 4 * head_dim, "intermediate_size": 8 * head_dim,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": head_dim,
                     "max_position_embeddings": 1024,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections},
                     "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 4 * head_dim, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": MERGE, "temporal_patch_size": 2},
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
        tie_word_embeddings=True)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    qwen2_vl_processor(tokenizer).save_pretrained(folder)
    return folder


def png(color: str, size: tuple[int, int] = (64, 64)) -> Image:
    buffer = io.BytesIO()
    PILImage.new("RGB", size, color).save(buffer, format="PNG")
    return Image(buffer.getvalue())


def picture_prompt() -> Sample:
    return Sample("p0", "toy", [Message("user", [ImagePart(0), TextPart("What color is it?")])], [png("red")], "red")


def image_only_vllm_qwen2_vl() -> None:
    """Where torchvision is missing, vLLM's Qwen2-VL loads its processor as `ImageOnlyQwen2VLProcessor` and
    accepts images only (it would otherwise call `Qwen2VLProcessor.from_pretrained`, which builds the video
    processor). vLLM's own Qwen2-VL processing, dummy inputs and model are kept; only the processing info's
    processor and modalities change. Call it before an engine starts (the engine runs in this process)."""
    if is_torchvision_available():
        return
    # vLLM's Qwen2-VL imports `smart_resize` from the torchvision image processor's module, which imports
    # torchvision first thing; the PIL image processor's module holds the same function (transformers copies it).
    import transformers.models.qwen2_vl.image_processing_pil_qwen2_vl as pil_module

    sys.modules.setdefault("transformers.models.qwen2_vl.image_processing_qwen2_vl", pil_module)
    from vllm.model_executor.models.qwen2_vl import (
        Qwen2VLDummyInputsBuilder,
        Qwen2VLMultiModalProcessor,
        Qwen2VLProcessingInfo,
    )
    from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration as VLLMQwen2VL
    from vllm import ModelRegistry
    from vllm.multimodal import MULTIMODAL_REGISTRY

    class ImageOnlyQwen2VLProcessingInfo(Qwen2VLProcessingInfo):
        def get_hf_processor(self, **kwargs: object) -> ImageOnlyQwen2VLProcessor:
            return self.ctx.get_hf_processor(ImageOnlyQwen2VLProcessor, **kwargs)

        def get_supported_mm_limits(self) -> dict[str, int | None]:
            return {"image": None}

    if getattr(VLLMQwen2VL._processor_factory.info, "__name__", "") != ImageOnlyQwen2VLProcessingInfo.__name__:
        MULTIMODAL_REGISTRY.register_processor(Qwen2VLMultiModalProcessor, info=ImageOnlyQwen2VLProcessingInfo,
                                               dummy_inputs=Qwen2VLDummyInputsBuilder)(VLLMQwen2VL)
    # The class itself, imported here: vLLM inspects an architecture it knows by module name in a fresh
    # subprocess, where the module alias above is missing.
    ModelRegistry.register_model("Qwen2VLForConditionalGeneration", VLLMQwen2VL)
