"""Look at what a run kept and rejected, and why: polars frames for notebooks, HTML for one sample.

    from curate.inspect import Run
    run = Run("runs/sft")
    run.funnel()                                   # stage, in, kept, rejected, seconds
    run.reasons()                                  # stage, reason, rows
    run.rejected(stage="image_dedup").collect()    # lazy: scanning, not loading
    run.show("sft0-00039")                         # the sample as HTML in a notebook

Rejected shards are scanned lazily (`polars.scan_parquet`; through fsspec for a run on an object store,
`Run("s3://bucket/runs/sft")`), so a run with millions of rejected rows opens at once and a filter reads
only what it needs.
"""

from __future__ import annotations

import base64
import difflib
import html
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.dataset as ds

from curate.errors import UserError
from curate.formats import get_format
from curate.rundir import OUTPUT_FORMAT, RunDir
from curate.sample import ImagePart, Sample, TextPart

SAMPLE_COLUMNS = ["id", "source", "messages", "images", "answer", "meta"]


def funnel_frame(manifest: dict[str, Any]) -> pl.DataFrame:
    """Per stage: rows in, kept, rejected, seconds."""
    return pl.DataFrame(
        [{key: stage[key] for key in ("name", "in", "kept", "rejected", "seconds")} for stage in manifest["stages"]],
        schema={"name": pl.String, "in": pl.Int64, "kept": pl.Int64, "rejected": pl.Int64, "seconds": pl.Float64},
    ).rename({"name": "stage"})


class Run:
    def __init__(self, location: str | Path) -> None:
        """A finished run directory: a local path or any fsspec URL (`s3://bucket/runs/sft`)."""
        self.location = str(location)
        self.run_dir = RunDir(location)
        self.manifest = self.run_dir.manifest()

    def _scan(self, entries: list[dict[str, Any]]) -> pl.LazyFrame:
        """Shards scanned lazily: by polars on local disk, through the run's fsspec store elsewhere."""
        paths = [self.run_dir.path_of(entry["path"]) for entry in entries]
        filesystem = self.run_dir.arrow_filesystem()
        if filesystem is None:
            return pl.scan_parquet(paths)
        return pl.scan_pyarrow_dataset(ds.dataset(paths, format="parquet", filesystem=filesystem))

    # --- tables ------------------------------------------------------------------

    def funnel(self) -> pl.DataFrame:
        return funnel_frame(self.manifest)

    def reasons(self) -> pl.DataFrame:
        return pl.DataFrame(
            [
                {"stage": stage["name"], "reason": reason, "rows": count}
                for stage in self.manifest["stages"]
                for reason, count in stage["reasons"].items()
            ],
            schema={"stage": pl.String, "reason": pl.String, "rows": pl.Int64},
        )

    def rejected(self, stage: str | None = None, reason: str | None = None, source: str | None = None) -> pl.LazyFrame:
        """Rejected rows (lazy), optionally filtered; columns: the canonical row + stage, reason, detail."""
        if not self.manifest["rejected"]:
            return pl.LazyFrame(schema={"id": pl.String, "stage": pl.String, "reason": pl.String, "detail": pl.String})
        frame = self._scan(self.manifest["rejected"])
        for column, value in (("stage", stage), ("reason", reason), ("source", source)):
            if value is not None:
                frame = frame.filter(pl.col(column) == value)
        return frame

    def summary(self, stage: str | None = None, reason: str | None = None, source: str | None = None) -> pl.DataFrame:
        """One line per rejected row, without the heavy columns."""
        return self.rejected(stage, reason, source).select("id", "source", "stage", "reason", "detail").collect()

    def kept(self) -> pl.LazyFrame:
        return self._scan(self.manifest["outputs"])

    def scores(self) -> pl.DataFrame:
        """Every numeric annotation stages left in `meta` (judge scores, pass rates, ...), kept and rejected alike,
        one row per sample: columns `id`, `kept`, and `<stage>.<field>` for each number found."""
        rows = []
        for kept, frame in ((False, self.rejected().select("id", "meta")), (True, self._kept_meta())):
            for sample_id, meta in frame.collect().iter_rows():
                numbers = _numbers(json.loads(meta or "{}"))
                if numbers:
                    rows.append({"id": sample_id, "kept": kept, **numbers})
        return pl.DataFrame(rows) if rows else pl.DataFrame(schema={"id": pl.String, "kept": pl.Boolean})

    def _kept_meta(self) -> pl.LazyFrame:
        """(id, meta JSON) of kept rows; RL shards carry the annotations in extra_info.extra.curate_meta."""
        if self.manifest["output_kind"] == "sft":
            return self.kept().select("id", "meta")
        extra = pl.col("extra_info").struct.field("extra")
        curate_meta = extra.str.json_path_match("$.curate_meta").fill_null("{}")
        return self.kept().select(pl.col("extra_info").struct.field("id").alias("id"), curate_meta.alias("meta"))

    # --- one sample ----------------------------------------------------------------

    def sample(self, sample_id: str) -> tuple[Sample, dict[str, str] | None]:
        """The sample with this id and, if rejected, its {stage, reason, detail}."""
        found = self.rejected().filter(pl.col("id") == sample_id).collect()
        if found.height:
            row = found.row(0, named=True)
            return Sample.from_row({key: row[key] for key in SAMPLE_COLUMNS}), {k: row[k] for k in ("stage", "reason", "detail")}
        fmt = get_format(OUTPUT_FORMAT[self.manifest["output_kind"]])
        id_column = pl.col("id") if self.manifest["output_kind"] == "sft" else pl.col("extra_info").struct.field("id")
        kept = self.kept().filter(id_column == sample_id).collect()
        if kept.height:
            return fmt.parse(kept.row(0, named=True), self.location), None
        raise UserError(f"{self.location}: no sample with id {sample_id!r}")

    def show(self, sample_id: str) -> Any:
        """The sample rendered for a notebook (an IPython HTML object)."""
        from IPython.display import HTML

        return HTML(self.html(sample_id))

    def html(self, sample_id: str) -> str:
        sample, rejection = self.sample(sample_id)
        return render_html(sample, rejection)

    def gallery(self, reason: str, limit: int = 3, stage: str | None = None) -> str:
        ids = self.rejected(stage=stage, reason=reason).select("id").head(limit).collect()["id"].to_list()
        return "".join(self.html(sample_id) for sample_id in ids)

    # --- export --------------------------------------------------------------------

    def export(self, ids: Iterable[str], path: str | Path, format_name: str | None = None) -> int:
        """Write hand-picked samples (rejected or kept) to a file a recipe can take as input, e.g. to re-admit them."""
        fmt = format_name or OUTPUT_FORMAT[self.manifest["output_kind"]]
        samples = [self.sample(sample_id)[0] for sample_id in ids]
        return get_format(fmt).write(samples, Path(path))


def _numbers(meta: dict[str, Any], prefix: str = "") -> dict[str, float]:
    found: dict[str, float] = {}
    for key, value in meta.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            found[name] = float(value)
        elif isinstance(value, dict) and key not in ("input", "verl"):
            found.update(_numbers(value, f"{name}."))
    return found


def render_text(sample: Sample, rejection: dict[str, str] | None) -> str:
    """The same view as `render_html`, for a terminal: images as one-line placeholders."""
    lines = [f"{sample.id}  ({sample.source})"]
    if rejection:
        lines.append(f"REJECTED by {rejection['stage']}: {rejection['reason']}: {rejection['detail']}")
    for message in sample.messages:
        body = "".join(
            part.text if isinstance(part, TextPart) else f"[image {part.index}: {_image_label(sample, part)}]"
            for part in message.content
        )
        lines.append(f"--- {message.role}\n{body}".rstrip())
        for call in message.tool_calls:
            arguments = call.code if call.code is not None else json.dumps(call.arguments, ensure_ascii=False)
            lines.append(f">>> {call.name}:\n{arguments}")
    if sample.answer is not None:
        lines.append(f"--- ground truth: {json.dumps(sample.answer, ensure_ascii=False)}")
    for stage, annotation in sample.meta.items():
        lines.append(f"--- meta.{stage}: {json.dumps(annotation, ensure_ascii=False, default=str)[:2000]}")
    return "\n".join(lines)


def _image_label(sample: Sample, part: ImagePart) -> str:
    if not 0 <= part.index < len(sample.images):
        return "missing"
    image = sample.images[part.index]
    return f"{image.format}, {len(image.data)} bytes"


# --- HTML ------------------------------------------------------------------------------

_STYLE = """<style>
.curate-sample{font-family:sans-serif;border:1px solid #ccc;border-radius:6px;padding:8px;margin:8px 0;max-width:900px}
.curate-turn{margin:6px 0;padding:6px;border-radius:4px;white-space:pre-wrap}
.curate-user{background:#eef5ff}.curate-assistant{background:#f4f4f4}.curate-tool{background:#fff8e6}.curate-system{background:#eee}
.curate-call{font-family:monospace;background:#272822;color:#f8f8f2;padding:6px;border-radius:4px;white-space:pre-wrap}
.curate-reject{color:#a00;font-weight:bold}.curate-diff td{vertical-align:top;font-family:monospace;white-space:pre-wrap}
.curate-sample img{max-width:240px;max-height:240px;border:1px solid #ddd;margin:2px}
</style>"""


def render_html(sample: Sample, rejection: dict[str, str] | None) -> str:
    """The conversation with its tool calls and images, the verdict, stage annotations, and recorded-vs-actual diffs."""
    parts = [_STYLE, f'<div class="curate-sample"><b>{html.escape(sample.id)}</b> · {html.escape(sample.source)}']
    if rejection:
        parts.append(f'<div class="curate-reject">rejected by {html.escape(rejection["stage"])}: '
                     f'{html.escape(rejection["reason"])}</div><div>{html.escape(rejection["detail"])}</div>')
    for message in sample.messages:
        body = []
        for part in message.content:
            if isinstance(part, TextPart):
                body.append(html.escape(part.text))
            else:
                body.append(_img(sample, part))
        for call in message.tool_calls:
            arguments = call.code if call.code is not None else json.dumps(call.arguments, ensure_ascii=False, indent=1)
            body.append(f'<div class="curate-call">{html.escape(call.name)}:\n{html.escape(arguments)}</div>')
        parts.append(f'<div class="curate-turn curate-{message.role}"><b>{message.role}</b>\n{"".join(body)}</div>')
    if sample.answer is not None:
        parts.append(f"<div><b>ground truth:</b> {html.escape(json.dumps(sample.answer, ensure_ascii=False))}</div>")
    for stage, annotation in sample.meta.items():
        if stage in ("raw", "input"):
            continue
        parts.append(_annotation_html(stage, annotation))
    if "raw" in sample.meta:
        parts.append(f'<details><summary>raw row</summary><pre>{html.escape(str(sample.meta["raw"])[:20000])}</pre></details>')
    parts.append("</div>")
    return "".join(parts)


def _img(sample: Sample, part: ImagePart) -> str:
    if not 0 <= part.index < len(sample.images):
        return f"[missing image {part.index}]"
    image = sample.images[part.index]
    encoded = base64.b64encode(image.data).decode()
    return f'<img src="data:image/{image.format};base64,{encoded}" title="image {part.index}">'


def _annotation_html(stage: str, annotation: Any) -> str:
    """A stage's meta: comparisons (recorded vs actual) side by side with a diff, everything else as JSON."""
    comparisons = annotation.get("comparisons", []) if isinstance(annotation, dict) else []
    rest = {k: v for k, v in annotation.items() if k != "comparisons"} if isinstance(annotation, dict) else annotation
    out = [f"<div><b>{html.escape(stage)}</b> <code>{html.escape(json.dumps(rest, ensure_ascii=False, default=str)[:2000])}</code></div>"]
    for comparison in comparisons:
        recorded, actual = str(comparison.get("recorded", "")), str(comparison.get("actual", ""))
        diff = "\n".join(difflib.unified_diff(recorded.splitlines(), actual.splitlines(), "recorded", "actual", lineterm=""))
        out.append(
            f'<table class="curate-diff"><tr><th>call {html.escape(str(comparison.get("call", "")))}: recorded</th><th>actual</th>'
            f"<th>diff</th></tr><tr><td>{html.escape(recorded)}</td><td>{html.escape(actual)}</td>"
            f"<td>{html.escape(diff)}</td></tr></table>"
        )
    return "".join(out)
