"""The `gemini` judge backend: Google's Gemini API through the official `google-genai` client.

One `complete` call is one `generateContent` request: the rubric as the system instruction, the prompt's
text and images (inline) as one user turn, the verdict's JSON schema as the response schema. The client's
own retries are off, since `curate.judges.runner.JudgeRunner` retries (`curate.retry`'s policy); rate limits, server
errors, timeouts and connection failures become `TransientError` (with the server's retry delay where it gave one).
"""

from __future__ import annotations

import importlib
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

from google import genai
from google.genai import errors, types

from curate.errors import UserError
from curate.generation import Prompt
from curate.retry import TransientError, masked, retry_after_seconds
from curate.sample import TextPart
from curate.judges.backend import JudgeReply, JudgeRequest, json_schema

KEY_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
INLINE_LIMIT = 19_000_000  # bytes of inline batch requests; the API takes about 20 MB, a file beyond


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
                 timeout: float = 120.0, inline_limit: int = INLINE_LIMIT) -> None:
        self.model = model
        self.inline_limit = inline_limit
        self._polled: types.BatchJob | None = None  # the job last polled
        variables = (api_key_env,) if api_key_env else KEY_VARIABLES
        key = next((os.environ[v] for v in variables if os.environ.get(v, "").strip()), None)
        if key is None:
            raise UserError(f"the gemini judge needs an API key: set {' or '.join(variables)} "
                            "(the recipe's --local profile needs no key)")
        self._key = key.strip()
        options = types.HttpOptions(base_url=base_url, timeout=int(timeout * 1000),
                                    retry_options=types.HttpRetryOptions(attempts=1))
        self._http_options = options

    @cached_property
    def _client(self) -> genai.Client:
        """Made at the first request the cache lacks (the key is checked above, at set-up)."""
        return genai.Client(api_key=self._key, http_options=self._http_options)

    def __repr__(self) -> str:
        return f"GeminiBackend(model={self.model!r})"

    async def complete(self, request: JudgeRequest) -> JudgeReply:
        contents, config = _content_and_config(request)
        try:
            response = await self._client.aio.models.generate_content(model=self.model, contents=contents, config=config)
        except errors.APIError as error:
            raise self._classify(error) from None
        except (*TRANSPORT_ERRORS, json.JSONDecodeError) as error:  # no answer, or a body that is not JSON
            raise TransientError(self._line(f"gemini {self.model}: {type(error).__name__}: {error}")) from None
        return _reply(response)

    # --- the Batch API (`mode: batch`): the same requests at half the price, answered within 24 hours --------

    def submit_batch(self, display_name: str, entries: list[tuple[str, JudgeRequest]]) -> str:
        """Create a batch job of `entries` (cache key, request); its name. Inline while the requests fit
        `inline_limit` bytes, else as an uploaded JSONL file."""
        lines = [{"key": key, "request": _rest_request(request)} for key, request in entries]
        size = sum(len(json.dumps(line)) for line in lines)
        config = types.CreateBatchJobConfig(display_name=display_name)
        with self._errors_as_lines():
            if size <= self.inline_limit:
                inline = [types.InlinedRequest(contents=contents, config=request_config, metadata={"key": key})
                          for key, (contents, request_config) in ((k, _content_and_config(r)) for k, r in entries)]
                job = self._client.batches.create(model=self.model, src=inline, config=config)
            else:
                data = "".join(json.dumps(line) + "\n" for line in lines).encode()
                uploaded = self._client.files.upload(file=io.BytesIO(data), config=types.UploadFileConfig(
                    mime_type="jsonl", display_name=display_name))
                job = self._client.batches.create(model=self.model, src=uploaded.name, config=config)
        return str(job.name)

    def find_batch(self, display_name: str) -> str | None:
        """The job created under `display_name`, if the provider has one (a run killed right after creating it)."""
        with self._errors_as_lines():
            return next((job.name for job in self._client.batches.list() if job.display_name == display_name), None)

    def batch_state(self, job: str) -> str:
        """pending, running, succeeded, failed, cancelled or expired."""
        with self._errors_as_lines():
            self._polled = self._client.batches.get(name=job)  # a finished job's results come with it
        state = self._polled.state
        return str(getattr(state, "value", state)).removeprefix("JOB_STATE_").lower()

    def batch_results(self, job: str) -> dict[str, JudgeReply | str]:
        """A finished job's outcome per key: the reply, or the request's error as a line."""
        with self._errors_as_lines():
            polled = self._polled if self._polled is not None and self._polled.name == job else self._client.batches.get(name=job)
            destination = polled.dest
            if destination is not None and destination.file_name:
                data = self._client.files.download(file=destination.file_name)
                return dict(_file_result(json.loads(line)) for line in data.splitlines() if line.strip())
        responses = (destination.inlined_responses if destination else None) or []
        return {str((item.metadata or {}).get("key")): _reply(item.response) if item.response else
                self._line(f"gemini batch request failed: {item.error}") for item in responses}

    @contextmanager
    def _errors_as_lines(self) -> Iterator[None]:
        """Errors of the Batch API as one line: TransientError where retrying may help, as online."""
        try:
            yield
        except errors.APIError as error:
            raise self._classify(error) from None
        except TRANSPORT_ERRORS as error:
            raise TransientError(self._line(f"gemini {self.model}: {type(error).__name__}: {error}")) from None

    async def aclose(self) -> None:
        if "_client" not in self.__dict__:  # never made: nothing to close
            return
        await self._client.aio.aclose()
        self._client.close()  # the Batch API's calls go through the synchronous client

    def _classify(self, error: errors.APIError) -> Exception:
        """429 and 5xx are worth retrying; any other status is a mistake that retrying cannot fix."""
        message = self._line(f"gemini {self.model}: HTTP {error.code} {error.status or ''}: {error.message or ''}")
        if error.code == 429 or error.code >= 500:
            return TransientError(message, retry_after=_retry_after(error))
        return RuntimeError(message)

    def _line(self, text: str) -> str:
        """One line, with the key redacted should a server or library ever echo it."""
        return masked(text, self._key)


def _content_and_config(request: JudgeRequest) -> tuple[list[types.Content], types.GenerateContentConfig]:
    """One `generateContent` request: the rubric (after any system turns) as the system instruction, the rest
    as one user turn, the verdict's JSON schema as the response schema."""
    system, parts = _split(request.prompt)
    config = types.GenerateContentConfig(
        system_instruction="\n\n".join([*system, request.system]) or None, response_mime_type="application/json",
        response_json_schema=json_schema(request.schema), temperature=request.temperature,
        max_output_tokens=request.max_tokens)
    return [types.Content(role="user", parts=parts)], config


def _rest_request(request: JudgeRequest) -> dict[str, Any]:
    """The same request as the REST `GenerateContentRequest` JSON a batch input file holds."""
    contents, config = _content_and_config(request)
    generation = {"responseMimeType": config.response_mime_type, "responseJsonSchema": config.response_json_schema,
                  "temperature": config.temperature, "maxOutputTokens": config.max_output_tokens}
    body: dict[str, Any] = {"contents": [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in contents],
                            "generationConfig": generation}
    if config.system_instruction:
        body["systemInstruction"] = {"parts": [{"text": config.system_instruction}], "role": "user"}  # as the client sends it
    return body


def _reply(response: types.GenerateContentResponse) -> JudgeReply:
    usage = response.usage_metadata or types.GenerateContentResponseUsageMetadata()
    output = (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)  # thinking is billed as output
    return JudgeReply(text=response.text or "", input_tokens=usage.prompt_token_count or 0, output_tokens=output)


def _file_result(line: dict[str, Any]) -> tuple[str, JudgeReply | str]:
    """One line of a results file: the key and its reply, or its error."""
    if "response" in line:
        return str(line.get("key")), _reply(types.GenerateContentResponse.model_validate(line["response"]))
    return str(line.get("key")), " ".join(f"gemini batch request failed: {line.get('error')}".split())


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
        if (seconds := retry_after_seconds(value)) is not None:
            return seconds
    return None


def _retry_delays(details: Any) -> list[str]:
    body = details.get("error", details) if isinstance(details, dict) else {}
    return [d.get("retryDelay") for d in body.get("details", []) if isinstance(d, dict) and "retryDelay" in d]
