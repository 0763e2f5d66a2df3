"""Generation through any OpenAI-compatible `/v1/chat/completions` server (`vllm serve`, SGLang, hosted APIs).

Prompts go out concurrently, at most `concurrency` at a time, each asking for all n completions in one
request; a server that returns fewer choices (some ignore `n`) is asked again for the rest, with the seed
moved on so the extra samples differ. Rate limits (429), server errors (5xx), dropped connections,
timeouts and unreadable answers are retried with exponential backoff and jitter, honouring `Retry-After`;
any other 4xx fails at once. The API key is read from an environment variable and never reported.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from curate.generation import Prompt, SamplingParams


def chat_endpoint(base_url: str, api_key_env: str, pool_size: int = 10) -> tuple[str, requests.Session, str]:
    """(chat-completions URL, a session sending the key from `api_key_env` when it is set, the key)."""
    key = os.environ.get(api_key_env, "")
    session = requests.Session()
    for scheme in ("http://", "https://"):
        session.mount(scheme, HTTPAdapter(pool_maxsize=pool_size))
    if key:
        session.headers["Authorization"] = f"Bearer {key}"
    return base_url.rstrip("/") + "/chat/completions", session, key


class OpenAIGenerator:
    """n completions per prompt from an OpenAI-compatible chat-completions server."""

    backend = "openai"

    def __init__(self, model: str, base_url: str = "http://127.0.0.1:8000/v1", api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, max_retries: int = 5, timeout: float = 120.0, backoff: float = 1.0,
                 send_images: bool = True) -> None:
        self.model = model
        self.url, self._session, self._key = chat_endpoint(base_url, api_key_env, pool_size=concurrency)
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff = backoff
        self.send_images = send_images
        self.calls = 0  # prompts sent, once each whatever the retries
        self.requests = 0  # HTTP requests made, retries included
        self._lock = threading.Lock()

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
        self._session.close()

    def _complete(self, prompt: Prompt, n: int, params: SamplingParams) -> list[str]:
        """n completions of one prompt, asking again while the server returns fewer."""
        with self._lock:
            self.calls += 1
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
        """The completions of one request, retried on transient failures; RuntimeError when they persist."""
        for attempt in range(self.max_retries + 1):
            with self._lock:
                self.requests += 1
            retry_after = None
            try:
                response = self._session.post(self.url, json=body, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as error:
                status, text = type(error).__name__, str(error)
            else:
                contents = _contents(response) if response.ok else None
                if contents is not None:
                    return contents
                status = f"HTTP {response.status_code}" + (" without choices" if response.ok else "")
                text = response.text
                if response.status_code != 429 and 400 <= response.status_code < 500:
                    raise RuntimeError(self._message("failed", status, text))
                retry_after = retry_after_seconds(response)
            if attempt < self.max_retries:
                delay = self.backoff * 2**attempt if retry_after is None else retry_after
                time.sleep(delay + random.uniform(0, self.backoff))
        attempts = self.max_retries + 1
        raise RuntimeError(self._message(f"failed after {attempts} attempt{'s' * (attempts > 1)}", status, text))

    def _message(self, what: str, status: str, text: str) -> str:
        """A one-line error: the URL, the status and the start of the response text, the API key masked."""
        message = f"POST {self.url} {what}: {status}: {' '.join(text[:200].split())}"
        return message.replace(self._key, "***") if self._key else message


def _contents(response: requests.Response) -> list[str] | None:
    """The message contents of the choices, in index order; None when the body is not a completion."""
    try:
        choices = sorted(response.json()["choices"], key=lambda choice: choice["index"])
        return [choice["message"]["content"] or "" for choice in choices] or None
    except (ValueError, KeyError, TypeError):
        return None


def retry_after_seconds(response: requests.Response) -> float | None:
    """The server's `Retry-After` in seconds, None when absent or given as a date."""
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None
