"""Judge backend for any OpenAI-compatible chat-completions server (vLLM `serve`, SGLang, hosted APIs), through
the project's one client of such servers (`curate.generation.openai.ChatClient`).

Asks for JSON-schema output (`response_format: json_schema`); a server that rejects that with a 400 is asked
again without it, the schema then described in the system prompt, and the runner's parser digs the JSON out
of whatever comes back. Requests run in threads so the runner's asyncio concurrency applies.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from curate.generation.openai import ChatClient, ChatRejected
from curate.judges.backend import JudgeReply, JudgeRequest, json_schema


class OpenAIJudge:
    name = "openai"
    settings: dict[str, Any] = {}  # noqa: RUF012 - read only

    def __init__(self, model: str, base_url: str = "http://127.0.0.1:8000/v1", api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0) -> None:
        self.model = model
        self.client = ChatClient(base_url, api_key_env, timeout)
        self.url = self.client.url
        self.structured = True  # until the server says it cannot do json_schema

    def __repr__(self) -> str:
        return f"OpenAIJudge(model={self.model!r}, url={self.url!r})"

    async def complete(self, request: JudgeRequest) -> JudgeReply:
        return await asyncio.to_thread(self._complete, request)

    async def aclose(self) -> None:
        self.client.close()

    def _complete(self, request: JudgeRequest) -> JudgeReply:
        try:
            completion = self.client.post(self._body(request))
        except ChatRejected as error:
            if not (error.status == 400 and self.structured and "response_format" in error.text):
                raise
            self.structured = False
            completion = self.client.post(self._body(request))
        text = completion["choices"][0].get("message", {}).get("content") or ""
        usage = completion.get("usage") or {}
        return JudgeReply(text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))

    def _body(self, request: JudgeRequest) -> dict[str, Any]:
        schema = json_schema(request.schema)
        system = request.system
        body: dict[str, Any] = {"model": self.model, "temperature": request.temperature, "max_tokens": request.max_tokens}
        if self.structured:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": request.schema.__name__, "schema": schema, "strict": True}}
        else:
            system += f"\n\nReply with one JSON object matching this JSON schema:\n{json.dumps(schema)}"
        body["messages"] = [{"role": "system", "content": system}, *request.prompt.chat("image_url")]
        return body
