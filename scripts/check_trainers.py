"""curate's shards read by the trainers' own code (scripts/check_trainers.sh runs this in a venv holding verl and TRL).

1. `curate run` writes SFT and RL shards from the bundled sample (image_integrity only: the shards have the layout
   of any run; several shards each, as a large run writes them).
2. verl: `RLHFDataset` loads every RL shard with a tiny Qwen2-VL processor; its `__getitem__` asserts that every
   `<image>` placeholder meets an image and that no image is left over. Each prompt then goes through the
   processor as verl's rollout does (chat template, images), and every image must become image tokens.
3. TRL: the SFT shards, rewritten by curate's `trl` writer (TRL fills no image part of a tool turn from the
   `images` column), load with `datasets`; `SFTTrainer` collates every row and runs one optimiser step on a tiny
   random-weight Qwen2-VL, with a chat template that renders content parts and tool calls; each rendered row must
   show all its tool calls and all its images.

Any mismatch raises: the script exits non-zero with the row that broke. Usage: check_trainers.py WORK_DIR
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
import torch
from curate_testkit.tiny_vlm import build_tiny_qwen2_vl  # the tiny Qwen2-VL of the tests, built from a config
from omegaconf import OmegaConf
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration
from trl import SFTConfig, SFTTrainer
from trl.data_utils import prepare_multimodal_messages
from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

from curate.formats import get_format, records

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
SFT_INPUTS = [("sft_messages.jsonl", "messages"), ("sft_metis.parquet", "metis_coldstart"),
              ("sft_deepeyes.json", "deepeyes"), ("sft_thyme.jsonl", "thyme")]
RL_INPUTS = [("rl_verl.parquet", "verl")]
IMAGE_PART = "<|vision_start|><|image_pad|><|vision_end|>"
# ChatML turns (Qwen2-VL style): text parts, image parts, and the assistant's OpenAI tool calls as Qwen's
# `<tool_call>` JSON (arguments are JSON text in the shards; an object is dumped).
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}" + IMAGE_PART + "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% for c in m['tool_calls'] or [] %}<tool_call>{\"name\": \"{{ c['function']['name'] }}\", \"arguments\": "
    "{% if c['function']['arguments'] is string %}{{ c['function']['arguments'] }}"
    "{% else %}{{ c['function']['arguments'] | tojson }}{% endif %}}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def curate_shards(work: Path, kind: str, inputs: list[tuple[str, str]], shard_rows: int) -> list[Path]:
    """Shards as `curate run` writes them (a recipe of one CPU stage over the bundled sample)."""
    recipe = {"name": f"trainers_{kind}",
              "input": {"paths": [{"path": str(SAMPLE / name), "format": fmt} for name, fmt in inputs]},
              "stages": [{"image_integrity": {}}],
              "output": {"kind": kind, "shard_rows": shard_rows}}
    recipe_path = work / f"{kind}.yaml"
    recipe_path.write_text(json.dumps(recipe), encoding="utf-8")  # JSON is YAML
    run_dir = work / f"{kind}_run"
    subprocess.run([sys.executable, "-m", "curate", "run", str(recipe_path), "-o", str(run_dir), "--no-progress"],
                   check=True)
    shards = sorted((run_dir / "kept").glob("shard-*.parquet"))
    if len(shards) < 2:
        raise AssertionError(f"{run_dir}: expected several {kind} shards, found {len(shards)}")
    return shards


def check_verl(shards: list[Path], processor: Any, work: Path) -> int:
    rows = pq.read_table(shards).to_pylist()
    config = OmegaConf.create({
        "prompt_key": "prompt", "image_key": "images", "cache_dir": str(work / "verl_cache"),
        # verl's length filter measures image prompts with qwen_vl_utils, which needs torchvision (no CPU build
        # installs beside torch here); the same prompts go through the processor below instead.
        "filter_overlong_prompts": False,
    })
    dataset = RLHFDataset(data_files=[str(p) for p in shards], tokenizer=processor.tokenizer, config=config,
                          processor=processor)
    if len(dataset) != len(rows):
        raise AssertionError(f"verl loaded {len(dataset)} RL rows, the shards hold {len(rows)}")
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = processor.image_processor.merge_size ** 2
    images_seen = 0
    for index, row in enumerate(rows):
        where = f"RL row {index} ({row['extra_info']['id']})"
        placeholders = sum(turn["content"].count("<image>") for turn in row["prompt"])
        if placeholders != len(row["images"]):
            raise AssertionError(f"{where}: {placeholders} <image> placeholders, {len(row['images'])} images")
        item = dataset[index]  # verl asserts each placeholder meets an image and none is left over
        parts = [part for turn in item["raw_prompt"] if isinstance(turn["content"], list) for part in turn["content"]]
        images = [part["image"] for part in parts if part["type"] == "image"]
        if len(images) != placeholders or any(not hasattr(image, "size") for image in images):
            raise AssertionError(f"{where}: verl built {len(images)} images for {placeholders} placeholders")
        if item["reward_model"] != row["reward_model"] or item["data_source"] != row["data_source"]:
            raise AssertionError(f"{where}: verl lost the ground truth or the data source")
        # What verl's rollout does with the prompt: the processor's chat template, then text and images together.
        text = processor.apply_chat_template(item["raw_prompt"], add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=images or None, return_tensors="pt")
        expected_tokens = int(inputs["image_grid_thw"].prod(dim=1).sum()) // merge if images else 0
        if int((inputs["input_ids"] == image_pad).sum()) != expected_tokens or text.count(IMAGE_PART) != len(images):
            raise AssertionError(f"{where}: the processor did not give each image its tokens")
        images_seen += len(images)
    batch = collate_fn([dataset[i] for i in range(min(4, len(dataset)))])  # verl's own collate, as its loader
    if len(batch["raw_prompt"]) != min(4, len(dataset)):
        raise AssertionError("verl's collate_fn lost rows")
    print(f"verl RLHFDataset: {len(rows)} RL rows from {len(shards)} shards, {images_seen} images, "
          "every <image> met its image")
    return len(rows)


def trl_shards(sft_shards: list[Path], work: Path) -> list[Path]:
    """The run's SFT shards rewritten in TRL's layout by curate's `trl` writer, one file per shard."""
    folder = work / "trl_shards"
    folder.mkdir(exist_ok=True)
    messages, trl = get_format("messages"), get_format("trl")
    written = []
    for shard in sft_shards:
        written.append(folder / shard.name)
        trl.write((messages.parse(record, shard.parent) for record in records(shard)), written[-1])
    return written


def check_trl(sft_shards: list[Path], model_dir: Path, processor: Any, work: Path) -> int:
    sft_rows = pq.read_table(sft_shards).to_pylist()
    shards = trl_shards(sft_shards, work)
    dataset = datasets.load_dataset("parquet", data_files=[str(p) for p in shards], split="train")
    if len(dataset) != len(sft_rows):
        raise AssertionError(f"datasets loaded {len(dataset)} TRL rows, the SFT shards hold {len(sft_rows)}")
    tool_images = 0
    for index, (example, sft_row) in enumerate(zip(dataset, sft_rows, strict=True)):
        where = f"SFT row {index} ({example['id']})"
        messages = prepare_multimodal_messages(example["messages"], images=example["images"])  # TRL's own filling
        text = processor.apply_chat_template(messages, tokenize=False)
        calls = [call for turn in sft_row["messages"] for call in turn["tool_calls"] or []]
        if text.count("<tool_call>") != len(calls) or any(c["function"]["name"] not in text for c in calls):
            raise AssertionError(f"{where}: the chat template rendered {text.count('<tool_call>')} of "
                                 f"{len(calls)} tool calls")
        images = [part["image"] for turn in messages for part in turn["content"] if part["type"] == "image"]
        if text.count(IMAGE_PART) != len(sft_row["images"]) or not all(hasattr(im, "size") for im in images):
            raise AssertionError(f"{where}: {text.count(IMAGE_PART)} image parts rendered, "
                                 f"{len(sft_row['images'])} images in the SFT shard")
        tool_images += sum(part["type"] == "image" for turn in messages if turn["role"] == "tool"
                           for part in turn["content"])
    if not tool_images:
        raise AssertionError("no SFT row shows an image in a tool turn: the case TRL's layout exists for is untested")
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
    args = SFTConfig(output_dir=str(work / "trl"), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-3,
                     max_length=None, report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
                     bf16=False, dataloader_num_workers=0, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    for index in range(len(trainer.train_dataset)):  # every row through TRL's own collator, not just one batch's
        trainer.data_collator([trainer.train_dataset[index]])
    before = [p.detach().clone() for p in model.parameters()]
    result = trainer.train()
    if not torch.isfinite(torch.tensor(result.training_loss)) or trainer.state.global_step != 1:
        raise AssertionError(f"TRL's step did not run: loss {result.training_loss}, steps {trainer.state.global_step}")
    if all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)):
        raise AssertionError("TRL's step left every weight unchanged")
    print(f"TRL SFTTrainer: {len(dataset)} rows from {len(shards)} shards ({tool_images} images in tool turns) "
          f"collated, one step, loss {result.training_loss:.3f}")
    return len(dataset)


def main() -> None:
    work = Path(sys.argv[1]).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sft_shards = curate_shards(work, "sft", SFT_INPUTS, shard_rows=64)
    rl_shards = curate_shards(work, "rl", RL_INPUTS, shard_rows=32)
    model_dir = build_tiny_qwen2_vl(work / "tiny-qwen2-vl")
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.chat_template = processor.tokenizer.chat_template = TEMPLATE
    check_verl(rl_shards, processor, work)
    check_trl(sft_shards, model_dir, processor, work)


if __name__ == "__main__":
    main()
