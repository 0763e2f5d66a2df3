"""Probe generation throughput, measured side by side in one run.

CPU (default): the transformers backend on SmolLM2-135M-Instruct, the same prompts at batch 1 and batch 8
(target: batching pays, ratio > 1), and n = 8 samples with the prompt prefilled once and its cache copied
vs prefilled 8 times.
GPU (`--vllm`): the probe's vLLM backend vs a plain `LLM.generate` with `SamplingParams(n)` on the same
prompts (target >= 0.9).

    python benchmarks/bench_probe.py [--prompts 16] [--max-tokens 32]
    python benchmarks/bench_probe.py --vllm --model Qwen/Qwen3-VL-8B-Instruct --prompts 256 --n 8
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from curate.generation import Prompt, SamplingParams
from curate.sample import Message, TextPart

QUESTIONS = ["What is {a} + {b}?", "Name an animal that starts with the letter {c}.",
             "Repeat the word: lemon{a}. Answer with the word only.", "Write a short sentence about the number {b}."]


def prompts(count: int) -> list[Prompt]:
    return [Prompt((Message("user", [TextPart(QUESTIONS[i % 4].format(a=i, b=i * 7, c="ABCDEFG"[i % 7]))]),))
            for i in range(count)]


def timed(run: Callable[[], list[list[str]]]) -> tuple[float, list[list[str]]]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def bench_transformers(args: argparse.Namespace) -> None:
    from curate.generation.hf import TransformersGenerator

    generator = TransformersGenerator(args.model)
    batch = prompts(args.prompts)
    generator.generate(batch[:2], 1, SamplingParams(temperature=0, max_tokens=4))  # warm up
    tokens = generator.tokenizer

    def count(completions: list[list[str]]) -> int:
        return sum(len(tokens(text).input_ids) for texts in completions for text in texts)

    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    results = {}
    for size in (1, 8):
        generator.batch_size = size
        seconds, out = timed(lambda: generator.generate(batch, 1, greedy))
        results[size] = count(out) / seconds
        print(f"batch {size}: {count(out)} tokens in {seconds:.2f} s = {results[size]:.1f} tokens/s")
    print(f"batch 8 vs batch 1 throughput: {results[8] / results[1]:.2f}x (target > 1)")

    sampled = SamplingParams(temperature=1.0, max_tokens=args.max_tokens)
    generator.batch_size = 8
    rates = {}
    for shared in (False, True):
        generator.share_prefill = shared
        seconds, out = timed(lambda: generator.generate(batch[:8], args.n, sampled))
        rates[shared] = count(out) / seconds
        print(f"n={args.n}, prefill {'once, cache copied' if shared else 'per sample'}: {rates[shared]:.1f} tokens/s")
    print(f"shared prefill vs per-sample prefill: {rates[True] / rates[False]:.2f}x")


def bench_vllm(args: argparse.Namespace) -> None:
    from vllm import SamplingParams as VLLMSamplingParams

    from curate.generation.vllm import VLLMGenerator, build_requests

    generator = VLLMGenerator(args.model)
    batch = prompts(args.prompts)
    params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens)
    plain_params = VLLMSamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=0)
    requests = build_requests(batch, generator.render)
    generator.llm.generate(requests[:4], plain_params, use_tqdm=False)  # warm up

    def plain() -> list[list[str]]:
        return [[c.text for c in o.outputs] for o in generator.llm.generate(requests, plain_params, use_tqdm=False)]

    plain_seconds, plain_out = timed(plain)
    probe_seconds, probe_out = timed(lambda: generator.generate(batch, args.n, params))
    tokens = generator.llm.get_tokenizer()

    def rate(out: list[list[str]], seconds: float) -> float:
        return sum(len(tokens(t).input_ids) for texts in out for t in texts) / seconds

    plain_rate, probe_rate = rate(plain_out, plain_seconds), rate(probe_out, probe_seconds)
    print(f"plain LLM.generate: {plain_rate:.0f} tokens/s; probe backend: {probe_rate:.0f} tokens/s")
    print(f"probe vs plain vLLM throughput: {probe_rate / plain_rate:.2f}x (target >= 0.9)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm", action="store_true", help="benchmark the vLLM backend (GPU)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    (bench_vllm if args.vllm else bench_transformers)(args)


if __name__ == "__main__":
    main()
