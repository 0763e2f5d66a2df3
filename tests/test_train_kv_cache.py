"""The CPU vLLM sampler's KV cache, sized from the step's rollouts and the machine's available memory."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from curate.train.vllm_turns import MIN_KV_CACHE_BYTES, cpu_kv_cache_bytes, kv_bytes_per_token


def test_kv_bytes_per_token_count_keys_and_values_of_every_layer() -> None:
    net = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2))
    assert kv_bytes_per_token(net, "float32") == 2 * 3 * 2 * 16 * 4
    assert kv_bytes_per_token(net, "bfloat16") == 2 * 3 * 2 * 16 * 2


def test_the_cache_holds_the_rollouts_within_the_share_of_memory_and_one_sequence_at_least() -> None:
    per_token, length = 100_000, 1000  # a sequence: 8 blocks of 128 tokens, plus one: 115.2 MB
    one = 9 * 128 * per_token
    assert cpu_kv_cache_bytes(per_token, 16, length, 0.3, 100 << 30) == 16 * one  # what 16 rollouts hold
    assert cpu_kv_cache_bytes(per_token, 16, length, 0.3, 4 << 30) == int(0.3 * (4 << 30))  # capped by the share
    assert cpu_kv_cache_bytes(per_token * 4, 16, length, 0.3, 1 << 30) == 4 * one  # one whole sequence at least
    assert cpu_kv_cache_bytes(1000, 2, length, 0.3, 100 << 30) == MIN_KV_CACHE_BYTES  # and the engine's floor
