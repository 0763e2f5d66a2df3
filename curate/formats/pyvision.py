"""PyVision results: `{id, question, response, messages, image_paths, ground_truth}` (JSON array).

Verified (agents-x-project/PyVision `inference_engine/vis_inference_demo_gpt.py` and
`prompt_template/prompt_template_vis.json`): `messages` are OpenAI chat turns whose content is a list
of parts; images travel inline as `image_url` data URIs, each between `<image_clue_i>` text tags. Code
is written `<code>` + fenced python; its result comes back as a user turn `<interpreter>\\nText
Result:\\n...\\nImage Result:\\n...</interpreter>` (the images it showed inside, as `image_clue_k`), or
`<interpreter>{error}</interpreter>`. The code uses the i-th input image as the variable
`image_clue_i` (from 0); the reader renames those to the sandbox's `image_{i+1}` and the writer
back. `image_paths` repeats the input images as paths on the authors' machine and is not read.
"""

from __future__ import annotations

from typing import Any

from curate.formats.inline import turns_mention
from curate.formats.spec import InlineSpec, ObservationSpec, SpecFormat


class PyVisionFormat(SpecFormat):
    name = "pyvision"
    description = "PyVision chat results (<code> blocks, <interpreter> user turns, image_clue_i variables)"
    spec = InlineSpec(
        source="pyvision",
        images=[],
        answer=["ground_truth"],
        calls=[{"tag": "code", "body": "python"}],
        observation=ObservationSpec(role="user", tags=["interpreter"]),
        image_variable="image_clue_",
        image_first_index=0,
    )

    def sniff(self, record: Any) -> bool:
        return turns_mention(record, "<interpreter>")
