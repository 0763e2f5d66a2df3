"""Mini-o3 cold-start rows: `{conversations: "<Python literal>", images: [...], data_source, ...}`.

Verified (Mini-o3 `scripts/preprocess_coldstart.py`, which `eval`s the column, and a fork's
converter tests): `conversations` is a Python-literal string of LLaVA turns `{from: human|gpt|system,
value}`; images are `{bytes, path}` (parquet) or paths. The model crops with
`<grounding>{"bbox_2d": [...], "source": "original_image"|"observation_N"}</grounding>`, a `crop` call
here (arguments JSON or a Python literal) that the sandbox stages list and do not run; the zoomed
image comes back in the next human turn ("... (Observation 1):\\n<image>.\\n..."), kept as written. The
column is read with `ast.literal_eval` (JSON too), never `eval`, and written back as a Python literal.
"""

from __future__ import annotations

from typing import Any

from curate.formats.spec import InlineSpec, SpecFormat


class MiniO3Format(SpecFormat):
    name = "minio3"
    description = "Mini-o3 cold-start rows (Python-literal conversations, <grounding> crop calls)"
    spec = InlineSpec(
        source="minio3",
        messages="conversations",
        messages_encoding="python",
        role_key="from",
        content_key="value",
        roles={"human": "user", "gpt": "assistant", "system": "system"},
        answer_tag="answer",
        calls=[{"tag": "grounding", "body": "arguments", "tool": "crop"}],
    )

    def sniff(self, record: Any) -> bool:
        turns = str(record.get("conversations"))
        return "from" in turns and "value" in turns
