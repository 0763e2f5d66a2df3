"""A tiny policy built in the test itself: a character-level tokenizer of our own with a ChatML template,
and a small Llama from a config (a few hundred thousand parameters), saved as a `save_pretrained` folder
that the trainer loads like any model. Plus a synthetic tool task for it.

The task: `copy 42` (the answer is in the question: the tool is not needed) and `hash 42` (the answer
is 42 * 37 % 97, which the model cannot compute: the tool is needed). SFT trajectories always call
the python tool, as Metis's cold-start data mostly does.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from curate.sample import Message, Sample, TextPart, ToolCall

SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>"]
MARKUP = ["<tool_call>", "</tool_call>", "<answer>", "</answer>", "<tool_response>", "</tool_response>"]
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_toy_policy(folder: Path, seed: int = 0, hidden: int = 96, layers: int = 3) -> Path:
    vocab = {token: index for index, token in enumerate(SPECIAL + MARKUP + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>",
                                        bos_token="<|im_start|>", chat_template=CHATML)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    tokenizer.add_tokens(MARKUP)  # whole-word tokens, decoded as text
    import torch

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def hashed(number: int) -> int:
    return number * 37 % 97


def question(kind: str, number: int) -> str:
    return f"{kind} {number}"


def toy_prompt(sample_id: str, kind: str, number: int) -> Sample:
    truth = str(number if kind == "copy" else hashed(number))
    return Sample(sample_id, "toy", [Message("user", [TextPart(question(kind, number))])], [], truth,
                  {"kind": kind})


def toy_trajectory(sample_id: str, kind: str, number: int) -> Sample:
    """A cold-start trajectory: always one python call, then the answer it printed."""
    code = f"print({number})" if kind == "copy" else f"print({number}*37%97)"
    truth = str(number if kind == "copy" else hashed(number))
    messages = [Message("user", [TextPart(question(kind, number))]),
                Message("assistant", [], [ToolCall("python", {"code": code}, "call_0")]),
                Message("tool", [TextPart(truth)], tool_call_id="call_0"),
                Message("assistant", [TextPart(f"<answer>{truth}</answer>")])]
    return Sample(sample_id, "toy", messages, [], truth, {"kind": kind})

