"""The `gemini` judge backend: Google's Gemini API through the official `google-genai` client.

One `complete` call is one `generateContent` request: the rubric as the system instruction, the prompt's
text and images (inline) as one user turn, the verdict's JSON schema as the response schema. The client's
own retries are off, since `judges.runner.JudgeRunner` retries; rate limits, server errors, timeouts and
connection failures become `RetryableError` (with the server's retry delay where it gave one).
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

from google import genai
from google.genai import errors, types

from curate.errors import UserError
from curate.generation import Prompt
from curate.sample import TextPart
from judges.backend import JudgeReply, JudgeRequest, RetryableError, json_schema

KEY_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Timeouts and connection failures of whichever HTTP stack the client uses (httpx2, httpx or aiohttp)."""
    found: list[type[BaseException]] = [TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("aiohttp", "ClientError")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except ImportError:
            continue
    return tuple(found)


TRANSPORT_ERRORS = _transport_errors()


class GeminiBackend:
    name = "gemini"
    settings: dict[str, Any] = {}  # noqa: RUF012 - read only

    def __init__(self, model: str, api_key_env: str | None = None, base_url: str | None = None,
                 timeout: float = 120.0) -> None:
        self.model = model
        variables = (api_key_env,) if api_key_env else KEY_VARIABLES
        key = next((os.environ[v] for v in variables if os.environ.get(v, "").strip()), None)
        if key is None:
            raise UserError(f"the gemini judge needs an API key: set {' or '.join(variables)} "
                            "(the recipe's --local profile needs no key)")
        self._key = key.strip()
        options = types.HttpOptions(base_url=base_url, timeout=int(timeout * 1000),
                                    retry_options=types.HttpRetryOptions(attempts=1))
        self._client = genai.Client(api_key=self._key, http_options=options)

    def __repr__(self) -> str:
        return f"GeminiBackend(model={self.model!r})"

    async def complete(self, request: JudgeRequest) -> JudgeReply:
        system, parts = _split(request.prompt)
        config = types.GenerateContentConfig(
            system_instruction="\n\n".join([*system, request.system]) or None, response_mime_type="application/json",
            response_json_schema=json_schema(request.schema), temperature=request.temperature,
            max_output_tokens=request.max_tokens)
        try:
            response = await self._client.aio.models.generate_content(
                model=self.model, contents=[types.Content(role="user", parts=parts)], config=config)
        except errors.APIError as error:
            raise self._classify(error) from None
        except (*TRANSPORT_ERRORS, json.JSONDecodeError) as error:  # no answer, or a body that is not JSON
            raise RetryableError(self._line(f"gemini {self.model}: {type(error).__name__}: {error}")) from None
        usage = response.usage_metadata or types.GenerateContentResponseUsageMetadata()
        output = (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)  # thinking is billed as output
        return JudgeReply(text=response.text or "", input_tokens=usage.prompt_token_count or 0, output_tokens=output)

    async def aclose(self) -> None:
        await self._client.aio.aclose()

    def _classify(self, error: errors.APIError) -> Exception:
        """429 and 5xx are worth retrying; any other status is a mistake that retrying cannot fix."""
        message = self._line(f"gemini {self.model}: HTTP {error.code} {error.status or ''}: {error.message or ''}")
        if error.code == 429 or error.code >= 500:
            return RetryableError(message, retry_after=_retry_after(error))
        return RuntimeError(message)

    def _line(self, text: str) -> str:
        """One line, with the key redacted should a server or library ever echo it."""
        return " ".join(text.split()).replace(self._key, "***")


def _split(prompt: Prompt) -> tuple[list[str], list[types.Part]]:
    """The text of system-role messages, and every other message's parts in order, images inline."""
    system = [m.text for m in prompt.messages if m.role == "system"]
    parts = [types.Part.from_text(text=part.text) if isinstance(part, TextPart)
             else _image_part(prompt, part.index)
             for m in prompt.messages if m.role != "system" for part in m.content]
    return system, parts


def _image_part(prompt: Prompt, index: int) -> types.Part:
    image = prompt.images[index]
    subtype = (image.format or "png").lower()
    subtype = {"jpg": "jpeg"}.get(subtype, subtype)
    return types.Part.from_bytes(data=image.data, mime_type=f"image/{subtype}")


def _retry_after(error: errors.APIError) -> float | None:
    """Seconds to wait: the `Retry-After` header, else the `google.rpc.RetryInfo` delay in the error body."""
    headers = getattr(error.response, "headers", None) or {}
    for value in (headers.get("retry-after"), *_retry_delays(error.details)):
        try:
            return float(value.removesuffix("s"))
        except (AttributeError, ValueError):  # absent, or an HTTP date
            continue
    return None


def _retry_delays(details: Any) -> list[str]:
    body = details.get("error", details) if isinstance(details, dict) else {}
    return [d.get("retryDelay") for d in body.get("details", []) if isinstance(d, dict) and "retryDelay" in d]
