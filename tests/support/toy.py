"""A toy tool-use task suite and a tiny policy for it: what the "it learns" test and the HDPO ablation
benchmark (`benchmarks/bench_ablation.py`) train on CPU in minutes.

The policy is a small Llama built from a config (a few hundred thousand parameters) with a word-level
tokenizer of our own and a ChatML template, saved as a `save_pretrained` folder the trainer loads like any
model. The tokenizer has whole-word tokens for the task's vocabulary (numbers, the call's JSON scaffolding,
the tags), so that a tool call is 4-6 tokens and a direct answer 3: whether to call the tool is one decision
at a turn's first token, which sampling can explore. Any other text falls back to one token per character,
so every text encodes and decodes back exactly.

The kinds, by how many python calls a correct answer needs:
- `copy 42`: the answer is in the question (0 calls);
- `hash 42`: 42 * 37 % 97, which the model cannot compute (1 call);
- `chain 42`: the hash of the hash, a chained lookup: the second call needs the number the first printed (2 calls);
- `lookup 42`: 42 * 53 % 97, which the base model memorised for small numbers only (`KNOWN`): the tool
  helps only some of the time (0 calls for known numbers, 1 for the rest).

The dilemma suite (`DILEMMA_KINDS`) puts groups where HDPO's dilemma lives (issue: "HDPO where it should win"):
- `recall 42`: 42 * 61 % 97, which the base model half-remembers for every number (its data answers right once
  in two, `RECALL_RIGHT`) and the tool cannot compute: its trajectories make a needless `print(42)` call and answer
  from the same memory. So its groups are mixed whether or not the tool is called (0 calls needed);
- `triple 42`: the hash applied three times (3 calls), where the base model also guesses at once (it echoes the
  number: always wrong), so the policy sometimes samples a direct guess;
- with `copy` (all-correct groups, 0 calls) and `hash` (1 call).
The new kinds are spelled in characters (no new vocabulary): the original suite's policy is the same as before.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from curate.sample import Message, Sample, TextPart, ToolCall

MODULUS = 97
FACTORS = {"hash": 37, "lookup": 53, "recall": 61}  # chain applies hash twice, triple three times
NUMBERS = range(1, MODULUS)  # not 0: every function maps it to itself, so copying it would answer any kind
KNOWN = range(1, 25)  # the lookups the base model answers from memory
KINDS = ("copy", "hash", "chain", "lookup")
DILEMMA_KINDS = ("copy", "recall", "hash", "triple")
RECALL_RIGHT, RECALL_SAMPLES = 1, 2  # the base data gives the right recall answer once in two
HASHES = {"hash": 1, "chain": 2, "triple": 3}
CALL_OPEN = '<tool_call>{"name": "python", "arguments": {"code": "print('
CALL_CLOSE = ')"}}'
CODES = {kind: f"*{factor}%{MODULUS}" for kind, factor in FACTORS.items()}
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>"]
WORDS = [CALL_OPEN, CALL_CLOSE, "</tool_call>", *CODES.values(), "<answer>", "</answer>", "<tool_response>",
         "</tool_response>", "user", "assistant", *KINDS, *(str(n) for n in range(MODULUS))]
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


def hashed(number: int, kind: str = "hash") -> int:
    return number * FACTORS[kind] % MODULUS


def call_chain(kind: str, number: int) -> list[tuple[str, int]]:
    """The (code, printed number) of each call a tool trajectory makes."""
    if kind in ("copy", "recall"):  # recall's call is needless: the tool cannot compute it
        return [(f"print({number})", number)]
    if kind in HASHES:
        calls, value = [], number
        for _ in range(HASHES[kind]):
            calls.append((f"print({value}{CODES['hash']})", hashed(value)))
            value = hashed(value)
        return calls
    return [(f"print({number}{CODES[kind]})", hashed(number, kind))]


def truth(kind: str, number: int) -> str:
    return str(hashed(number, kind) if kind == "recall" else call_chain(kind, number)[-1][1])


def recalled(number: int) -> list[str]:
    """The answers the base data gives to `recall number`: right `RECALL_RIGHT` times in `RECALL_SAMPLES`, then
    neighbours of the truth."""
    right = hashed(number, "recall")
    wrong = [(right + offset - 1) % (MODULUS - 1) + 1 for offset in range(1, RECALL_SAMPLES - RECALL_RIGHT + 1)]
    return [str(right)] * RECALL_RIGHT + [str(value) for value in wrong]


def calls_needed(kind: str, number: int) -> int:
    """The fewest calls a correct answer takes for the base model: what the tool is needed for."""
    if kind in ("copy", "recall") or (kind == "lookup" and number in KNOWN):
        return 0
    return len(call_chain(kind, number))


def question(kind: str, number: int) -> str:
    return f"{kind} {number}"


def _sample(sample_id: str, kind: str, number: int, messages: list[Message]) -> Sample:
    meta = {"kind": kind, "calls_needed": calls_needed(kind, number)}
    return Sample(sample_id, "toy", [Message("user", [TextPart(question(kind, number))]), *messages], [],
                  truth(kind, number), meta)


def toy_prompt(sample_id: str, kind: str, number: int) -> Sample:
    return _sample(sample_id, kind, number, [])


def direct_answer(sample_id: str, kind: str, number: int, answer: str | None = None) -> Sample:
    """A trajectory that answers at once, without the tool (with `answer`, not necessarily the truth)."""
    text = truth(kind, number) if answer is None else answer
    return _sample(sample_id, kind, number, [Message("assistant", [TextPart(f"<answer>{text}</answer>")])])


def toy_trajectory(sample_id: str, kind: str, number: int, answer: str | None = None) -> Sample:
    """A cold-start trajectory: the python calls the kind takes (one, two for `chain`), then the answer printed
    (or `answer`)."""
    messages = []
    for index, (code, printed) in enumerate(call_chain(kind, number)):
        messages += [Message("assistant", [], [ToolCall("python", {"code": code}, f"call_{index}")]),
                     Message("tool", [TextPart(str(printed))], tool_call_id=f"call_{index}")]
    text = truth(kind, number) if answer is None else answer
    messages.append(Message("assistant", [TextPart(f"<answer>{text}</answer>")]))
    return _sample(sample_id, kind, number, messages)


def base_data(kinds: tuple[str, ...] = KINDS, numbers: range = NUMBERS) -> list[Sample]:
    """What stands for pretraining: direct answers where the model knows them (copy, known lookups), half-known
    (recall) or guesses (triple: the number echoed), and tool trajectories of every kind (copy included, so that
    what follows a number depends on whether the turn opened a call or an answer, not on the prompt's kind)."""
    direct = [direct_answer(f"{kind}-direct-{n}", kind, n) for kind in kinds for n in numbers
              if calls_needed(kind, n) == 0 and kind != "recall"]
    if "recall" in kinds:
        direct += [direct_answer(f"recall-direct-{n}-{i}", "recall", n, answer) for n in numbers
                   for i, answer in enumerate(recalled(n))]
    if "triple" in kinds:
        direct += [direct_answer(f"triple-guess-{n}", "triple", n, str(n)) for n in numbers]
    return direct + cold_start_data(kinds, numbers)


def cold_start_data(kinds: tuple[str, ...] = KINDS, numbers: range = NUMBERS) -> list[Sample]:
    """Trajectories that always call the tool, as Metis's cold-start data mostly does (recall's answer from the
    same half-memory as its direct answers: the tool does not help it)."""
    return [toy_trajectory(f"{kind}-tool-{n}-{i}" if kind == "recall" else f"{kind}-tool-{n}", kind, n, answer)
            for kind in kinds for n in numbers
            for i, answer in enumerate(recalled(n) if kind == "recall" else [None])]


def toy_prompts(kinds: tuple[str, ...] = KINDS, numbers: range = NUMBERS) -> list[Sample]:
    return [toy_prompt(f"{kind}-{n}", kind, n) for kind in kinds for n in numbers]
