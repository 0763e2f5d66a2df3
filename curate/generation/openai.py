"""The one client of OpenAI-compatible `/v1/chat/completions` servers (`vllm serve`, SGLang, hosted APIs), and
generation through it.

`ChatClient` makes one POST per call and classifies what comes back, for `curate.retry`'s policy: rate
limits (429), server errors (5xx), dropped connections, timeouts and bodies that are not a completion are
`TransientError` (with `Retry-After`); any other 4xx is `ChatRejected` at once. The API key is read from an
environment variable, sent as a bearer token, and masked in every message. The `openai` judge backend
(`curate.judges.openai_chat`) uses the same client.

`OpenAIGenerator` sends prompts concurrently, at most `concurrency` at a time, each asking for all n
completions in one request; a server that returns fewer choices (some ignore `n`) is asked again for the
rest, with the seed moved on so the extra samples differ.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from curate.generation import Prompt, SamplingParams
from curate.retry import RetryPolicy, TransientError, masked, retry, retry_after_seconds


class ChatRejected(RuntimeError):
    """The server refused the request itself (a 4xx other than 429): retrying cannot help."""

    def __init__(self, message: str, status: int = 0, text: str = "") -> None:
        super().__init__(message, status, text)
        self.status, self.text = status, text

    def __str__(self) -> str:
        return str(self.args[0])


class ChatClient:
    """One OpenAI-compatible chat-completions endpoint: one POST per `post`, failures classified, the key masked."""

    def __init__(self, base_url: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 pool_size: int = 10) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.timeout = timeout
        self._key = os.environ.get(api_key_env, "").strip()
        self._session = requests.Session()
        for scheme in ("http://", "https://"):
            self._session.mount(scheme, HTTPAdapter(pool_maxsize=pool_size))
        if self._key:
            self._session.headers["Authorization"] = f"Bearer {self._key}"

    def __repr__(self) -> str:
        return f"ChatClient(url={self.url!r})"

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """The completion object the server answered: TransientError or ChatRejected otherwise."""
        try:
            response = self._session.post(self.url, json=body, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as error:
            raise TransientError(self.line(f"{type(error).__name__}: {error}")) from None
        status = response.status_code
        if status == 429 or status >= 500:
            raise TransientError(self.line(f"HTTP {status}: {response.text[:200]}"),
                                 retry_after_seconds(response.headers.get("Retry-After")))
        if not response.ok:
            text = self.line(response.text[:200])
            raise ChatRejected(self.line(f"POST {self.url} failed: HTTP {status}: {text}"), status, text)
        try:
            completion = response.json()
            if isinstance(completion["choices"], list) and completion["choices"]:
                return completion
        except (ValueError, KeyError, TypeError):
            pass
        raise TransientError(self.line(f"HTTP {status} without choices: {response.text[:200]}"))

    def line(self, text: str) -> str:
        """`text` as one line, the API key masked (a server or proxy may echo it)."""
        return masked(text, self._key, f"Bearer {self._key}" if self._key else "")

    def close(self) -> None:
        self._session.close()


class OpenAIGenerator:
    """n completions per prompt from an OpenAI-compatible chat-completions server."""

    backend = "openai"

    def __init__(self, model: str, base_url: str = "http://127.0.0.1:8000/v1", api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, max_retries: int = 5, timeout: float = 120.0, backoff: float = 1.0,
                 send_images: bool = True) -> None:
        self.model = model
        self.client = ChatClient(base_url, api_key_env, timeout, pool_size=concurrency)
        self.url = self.client.url
        self.concurrency = concurrency
        self.policy = RetryPolicy(max_retries, backoff)
        self.send_images = send_images

    def __repr__(self) -> str:
        return f"OpenAIGenerator(model={self.model!r}, url={self.url!r})"

    def generate(self, prompts: Sequence[Prompt], n: int, params: SamplingParams) -> list[list[str]]:
        """n completions for each prompt, in the order of the prompts."""
        pool = ThreadPoolExecutor(self.concurrency)
        try:
            return list(pool.map(self._complete, prompts, repeat(n), repeat(params)))
        finally:
            pool.shutdown(cancel_futures=True)

    def close(self) -> None:
        self.client.close()

    def _complete(self, prompt: Prompt, n: int, params: SamplingParams) -> list[str]:
        """n completions of one prompt, asking again while the server returns fewer."""
        messages = prompt.chat("image_url") if self.send_images else prompt.text_chat()
        completions: list[str] = []
        while len(completions) < n:
            completions += self._post({
                "model": self.model, "messages": messages, "n": n - len(completions),
                "temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_tokens,
                "seed": params.seed + len(completions),
            })
        return completions[:n]

    def _post(self, body: dict[str, Any]) -> list[str]:
        """The completions of one request, retried on transient failures; TransientFailure when they persist."""

        def attempt() -> list[str]:
            return _contents(self.client.post(body), self.client)

        return retry(attempt, self.policy, f"POST {self.url}")


def _contents(completion: dict[str, Any], client: ChatClient) -> list[str]:
    """The message contents of the choices, in index order."""
    try:
        choices = sorted(completion["choices"], key=lambda choice: choice.get("index", 0))
        return [choice["message"]["content"] or "" for choice in choices]
    except (KeyError, TypeError, AttributeError):
        raise TransientError(client.line(f"not a chat completion: {str(completion)[:200]}")) from None
