"""The `openai` backend against a real local chat-completions server (`tests/servers.py`)."""

from __future__ import annotations

import base64
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from curate_testkit.counting import count_prompts
from curate_testkit.pictures import png_bytes
from curate_testkit.servers import ChatServer, last_user_text

from curate.cache import Cache
from curate.generation import BackendSpec, Prompt, SamplingParams, generate_cached, make_generator
from curate.generation.openai import ChatRejected, OpenAIGenerator
from curate.retry import TransientFailure
from curate.sample import Image, ImagePart, Message, TextPart

PARAMS = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=64, seed=3)


def prompt(question: str, image: bytes | None = None) -> Prompt:
    if image is None:
        return Prompt((Message("user", [TextPart(question)]),))
    return Prompt((Message("user", [TextPart(question), ImagePart(0)]),), (Image(image, "png"),))


def generator(server: ChatServer, **options: Any) -> OpenAIGenerator:
    return OpenAIGenerator("test-model", base_url=server.base_url, **{"backoff": 0.01, **options})


def test_request_carries_model_sampling_and_images_as_data_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = count_prompts(monkeypatch, OpenAIGenerator)
    image = png_bytes(7)
    with ChatServer() as server:
        gen = generator(server)
        assert gen.generate([prompt("What is shown?", image)], 2, PARAMS) == [["What is shown?"] * 2]
    (body,) = server.requests
    assert {k: body[k] for k in ("model", "n", "temperature", "top_p", "max_tokens", "seed")} == {
        "model": "test-model", "n": 2, "temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "seed": 3}
    text, picture = body["messages"][0]["content"]
    assert text == {"type": "text", "text": "What is shown?"}
    url = picture["image_url"]["url"]
    assert picture["type"] == "image_url" and url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == image
    assert "authorization" not in server.headers[0]
    assert (sent.prompts, len(server.requests)) == (1, 1)


def test_send_images_false_sends_text_only() -> None:
    with ChatServer() as server:
        generator(server, send_images=False).generate([prompt("Describe.", png_bytes(1))], 1, PARAMS)
    assert server.requests[0]["messages"] == [{"role": "user", "content": "Describe."}]


def test_results_keep_prompt_order_under_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = count_prompts(monkeypatch, OpenAIGenerator)
    in_flight, peak, lock = [0], [0], threading.Lock()

    def answer(body: dict[str, Any], index: int) -> str:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(random.uniform(0, 0.01))
        with lock:
            in_flight[0] -= 1
        return f"{last_user_text(body)}/{index}"

    with ChatServer(answer=answer, reverse_choices=True) as server:
        gen = generator(server, concurrency=8)
        results = gen.generate([prompt(f"p{k}") for k in range(40)], 3, PARAMS)
    assert results == [[f"p{k}/{i}" for i in range(3)] for k in range(40)]
    assert 1 < peak[0] <= 8
    assert (sent.prompts, len(server.requests)) == (40, 40)


def test_server_ignoring_n_is_asked_again_with_new_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = count_prompts(monkeypatch, OpenAIGenerator)
    with ChatServer(answer=lambda body, index: f"seed {body['seed']}", max_n=1) as server:
        gen = generator(server)
        assert gen.generate([prompt("q")], 3, PARAMS) == [["seed 3", "seed 4", "seed 5"]]
    assert [body["n"] for body in server.requests] == [3, 2, 1]
    assert (sent.prompts, len(server.requests)) == (1, 3)


def test_429_is_retried_after_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = count_prompts(monkeypatch, OpenAIGenerator)
    with ChatServer(retry_after=0.1) as server:
        server.faults.append("429")
        gen = generator(server, backoff=0.001)
        start = time.monotonic()
        assert gen.generate([prompt("q")], 1, PARAMS) == [["q"]]
        assert time.monotonic() - start >= 0.1
    assert (sent.prompts, len(server.requests)) == (1, 2)


def test_server_errors_garbage_drops_and_timeouts_are_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = count_prompts(monkeypatch, OpenAIGenerator)
    with ChatServer(slow_seconds=0.5) as server:
        server.faults.extend(["500", "garbage", "drop", "slow"])
        gen = generator(server, timeout=0.2, max_retries=4)
        assert gen.generate([prompt("q")], 1, PARAMS) == [["q"]]
    assert (sent.prompts, len(server.requests)) == (1, 5)


def test_client_error_fails_at_once_with_one_line() -> None:
    with ChatServer() as server:
        server.faults.append("400")
        gen = generator(server)
        with pytest.raises(RuntimeError) as error:
            gen.generate([prompt("q")], 1, PARAMS)
    message = str(error.value)
    assert "\n" not in message
    assert f"{server.base_url}/chat/completions" in message and "HTTP 400" in message and "scripted 400" in message
    assert len(server.requests) == 1


def test_exhausted_retries_raise_with_the_last_status() -> None:
    with ChatServer() as server:
        server.faults.extend(["503"] * 3)
        gen = generator(server, max_retries=2)
        with pytest.raises(TransientFailure, match=r"failed after 3 attempts: HTTP 503: .*scripted 503"):
            gen.generate([prompt("q")], 1, PARAMS)
    assert len(server.requests) == 3


def test_unreachable_server_raises_a_connection_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gen = OpenAIGenerator("m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff=0.01)
    with pytest.raises(TransientFailure, match=rf"127\.0\.0\.1:{port}/v1/chat/completions failed after 2 attempts: "
                                           r"ConnectionError"):
        gen.generate([prompt("q")], 1, PARAMS)


def test_api_key_is_sent_but_never_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-0123456789"
    monkeypatch.setenv("CURATE_TEST_API_KEY", secret)
    with ChatServer() as server:
        gen = generator(server, api_key_env="CURATE_TEST_API_KEY", max_retries=1)
        gen.generate([prompt("q")], 1, PARAMS)
        server.faults.extend(["401", "500", "500"])
        with pytest.raises(ChatRejected) as refused:
            gen.generate([prompt("q")], 1, PARAMS)
        with pytest.raises(TransientFailure) as exhausted:
            gen.generate([prompt("q")], 1, PARAMS)
    assert server.headers[0]["authorization"] == f"Bearer {secret}"
    for text in (str(refused.value), str(exhausted.value), repr(gen)):
        assert secret not in text


def test_generate_cached_sends_only_misses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sent = count_prompts(monkeypatch, OpenAIGenerator)
    with ChatServer() as server, Cache(tmp_path / "c.sqlite") as cache:
        gen = make_generator(BackendSpec("openai", "test-model", {"base_url": server.base_url, "backoff": 0.01}))
        assert isinstance(gen, OpenAIGenerator)
        prompts = [prompt("a", png_bytes(1)), prompt("b")]
        first = generate_cached(gen, cache, prompts, 2, PARAMS)
        assert first == [["a", "a"], ["b", "b"]]
        assert (len(server.requests), sent.prompts) == (2, 2)
        assert generate_cached(gen, cache, prompts, 2, PARAMS) == first
        assert (len(server.requests), sent.prompts) == (2, 2)
        assert generate_cached(gen, cache, [*prompts, prompt("c")], 2, PARAMS)[2] == ["c", "c"]
        assert (len(server.requests), sent.prompts) == (3, 3)
        gen.close()
