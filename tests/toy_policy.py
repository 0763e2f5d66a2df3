"""A tiny policy built in the test itself: a word-level tokenizer of our own with a ChatML template,
and a small Llama from a config (a few hundred thousand parameters), saved as a `save_pretrained` folder
that the trainer loads like any model. Plus a synthetic tool task for it.

The task: `copy 42` (the answer is in the question: the tool is not needed) and `hash 42` (the answer
is 42 * 37 % 97, which the model cannot compute: the tool is needed). Cold-start trajectories always
call the python tool, as Metis's cold-start data mostly does.

The tokenizer has whole-word tokens for the task's vocabulary (numbers, the call's JSON scaffolding,
the tags), so that a tool call is 4-5 tokens and a direct answer 3: whether to call the tool is then
one decision at the turn's first token, which sampling can explore. Any other text falls back to one
token per character, so every text encodes and decodes back exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from curate.sample import Message, Sample, TextPart, ToolCall

MODULUS, FACTOR = 97, 37
NUMBERS = range(1, MODULUS)  # not 0: its hash is itself, so copying it would answer `hash 0` right
KINDS = ("copy", "hash")
CALL_OPEN = '<tool_call>{"name": "python", "arguments": {"code": "print('
CALL_CLOSE = ')"}}'
HASH_CODE = f"*{FACTOR}%{MODULUS}"
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>"]
WORDS = [CALL_OPEN, CALL_CLOSE, "</tool_call>", HASH_CODE, "<answer>", "</answer>", "<tool_response>",
         "</tool_response>", "user", "assistant", "copy", "hash", *(str(n) for n in range(MODULUS))]
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_toy_policy(folder: Path, seed: int = 0, hidden: int = 128, layers: int = 2, heads: int = 2) -> Path:
    """Wide heads (64 dims): with four heads of 24 the model learnt to copy a number token (question to
    call, observation to answer) late or, for some seeds, not at all."""
    vocab = {token: index for index, token in enumerate(dict.fromkeys(SPECIAL + WORDS + CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # text between words: one token per character
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>",
                                        bos_token="<|im_start|>", chat_template=CHATML)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    tokenizer.add_tokens(WORDS)  # matched in text first (longest match), decoded as text
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def hashed(number: int) -> int:
    return number * FACTOR % MODULUS


def truth(kind: str, number: int) -> str:
    return str(number if kind == "copy" else hashed(number))


def question(kind: str, number: int) -> str:
    return f"{kind} {number}"


def toy_prompt(sample_id: str, kind: str, number: int) -> Sample:
    return Sample(sample_id, "toy", [Message("user", [TextPart(question(kind, number))])], [], truth(kind, number),
                  {"kind": kind})


def direct_answer(sample_id: str, kind: str, number: int) -> Sample:
    """A trajectory that answers at once, without the tool."""
    messages = [Message("user", [TextPart(question(kind, number))]),
                Message("assistant", [TextPart(f"<answer>{truth(kind, number)}</answer>")])]
    return Sample(sample_id, "toy", messages, [], truth(kind, number), {"kind": kind})


def toy_trajectory(sample_id: str, kind: str, number: int) -> Sample:
    """A cold-start trajectory: always one python call, then the answer it printed."""
    code = f"print({number})" if kind == "copy" else f"print({number}{HASH_CODE})"
    messages = [Message("user", [TextPart(question(kind, number))]),
                Message("assistant", [], [ToolCall("python", {"code": code}, "call_0")]),
                Message("tool", [TextPart(truth(kind, number))], tool_call_id="call_0"),
                Message("assistant", [TextPart(f"<answer>{truth(kind, number)}</answer>")])]
    return Sample(sample_id, "toy", messages, [], truth(kind, number), {"kind": kind})
