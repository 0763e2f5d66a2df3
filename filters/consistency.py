"""consistency: recorded tool outputs match what the code really produces (no hallucinated observations)."""

from __future__ import annotations

import imagehash
from pydantic import Field

from curate.images import image_hash
from curate.sample import Sample
from curate.sandbox.compare import recorded_stdout, same_output, short_diff
from curate.sandbox.trajectory import code_calls
from curate.stage import KEEP, Verdict, reject
from curate.stage.sandbox import SandboxStage, SandboxStageOptions


class Consistency(SandboxStage):
    """Compares each code call's recorded observation with a re-execution; rejects the trajectory on a mismatch.

    Text is compared after normalisation (whitespace, numbers with `rel_tol`, numpy array reprs; memory
    addresses and timestamps masked); images by perceptual-hash distance (`max_image_distance`). A call
    whose output differs between two re-executions is nondeterministic by nature (unseeded random numbers,
    clocks): it is noted in `meta.consistency.nondeterministic` and not counted as a hallucination.
    Reasons: `inconsistent_output`, `inconsistent_image`, `not_executed` (the code never got to the call).
    `meta.consistency.comparisons` holds recorded vs actual per call, for the inspector.
    """

    name = "consistency"
    reasons = {
        "inconsistent_output": "the recorded text is not what the code prints (the detail is a short diff)",
        "inconsistent_image": "recorded vs produced images differ by perceptual hash, or in count",
        "not_executed": "the code never got to the call (an earlier call failed or timed out)",
    }

    class Options(SandboxStageOptions):
        rel_tol: float = Field(default=1e-6, ge=0, description="relative tolerance for numbers")
        max_image_distance: int = Field(default=10, ge=0, le=64, description="largest phash distance between images")
        recheck_nondeterminism: bool = Field(default=True, description="re-run mismatching trajectories once")

    def process(self, batch: list[Sample]) -> list[Verdict]:
        records = self.executed(batch)
        mismatches = {id(s): self._mismatches(s, records[id(s)]) for s in batch if id(s) in records}
        suspects = [sample for sample in batch if mismatches.get(id(sample))]
        if suspects and self.options.recheck_nondeterminism:
            again = self.executed(suspects, fresh=True)
            for sample in suspects:
                first, second = records[id(sample)], again[id(sample)]
                unstable = {i for i, (a, b) in enumerate(zip(first["cells"], second["cells"])) if not self._same_cell(a, b)}
                sample.meta[self.name]["nondeterministic"] = sorted(unstable)
                mismatches[id(sample)] = [m for m in mismatches[id(sample)] if m[0] not in unstable]
        return [self._verdict(sample, mismatches.get(id(sample), [])) for sample in batch]

    def _mismatches(self, sample: Sample, record: dict) -> list[tuple[int, str, str]]:
        """(call, reason, detail) for every call whose recorded observation does not match."""
        found: list[tuple[int, str, str]] = []
        comparisons = []
        for index, code_call in enumerate(code_calls(sample)):
            where = f"call {index} (message {code_call.message_index})"
            observation = code_call.observation
            recorded = recorded_stdout(observation.text) if observation else ""
            if index >= len(record["cells"]):
                found.append((index, "not_executed", f"{where}: {record['detail'] or 'not reached'}"))
                continue
            cell = record["cells"][index]
            actual = cell["stdout"] + (f"{cell['traceback']}" if cell["error"] else "")
            recorded_hashes = [image_hash(sample.images[i].data) for i in (observation.image_indices if observation else [])
                               if i < len(sample.images)]
            distances = _distances(recorded_hashes, cell["image_hashes"])
            comparisons.append({"call": index, "recorded": recorded, "actual": actual,
                                "recorded_images": len(recorded_hashes), "actual_images": len(cell["image_hashes"]),
                                "image_distances": distances})
            if not same_output(recorded, actual, self.options.rel_tol):
                found.append((index, "inconsistent_output", f"{where}:\n{short_diff(recorded, actual)}"))
            elif len(recorded_hashes) != len(cell["image_hashes"]) or any(
                d is None or d > self.options.max_image_distance for d in distances
            ):
                found.append((index, "inconsistent_image",
                              f"{where}: {len(recorded_hashes)} recorded image(s) vs {len(cell['image_hashes'])} produced,"
                              f" phash distances {distances}"))
        sample.meta[self.name] = {"comparisons": comparisons}
        return found

    def _same_cell(self, first: dict, second: dict) -> bool:
        return same_output(first["stdout"], second["stdout"], self.options.rel_tol) and first["image_hashes"] == second["image_hashes"]

    def _verdict(self, sample: Sample, mismatches: list[tuple[int, str, str]]) -> Verdict:
        if not mismatches:
            return KEEP
        _, reason, detail = mismatches[0]
        return reject(reason, detail)


def _distances(recorded: list[str | None], actual: list[str | None]) -> list[int | None]:
    return [
        None if a is None or b is None else imagehash.hex_to_hash(a) - imagehash.hex_to_hash(b)
        for a, b in zip(recorded, actual)
    ]
