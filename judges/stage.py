"""Base of the judge stages: a rubric, a backend, scored dimensions and thresholds.

A judge stage turns each sample into one request (the rubric as system instruction, the sample as text
and images), gets back a verdict of its schema (integer scores from 1 to 5 per dimension plus a
justification), and keeps the sample when every score meets its threshold. Scores and justification go
to `meta[stage]` for kept and rejected samples alike. Answers that are not a verdict (after the parse retries)
are `judge_error`, never a low score; a judge that could not be reached is no verdict at all: the run stops
on it (`curate.retry`) and resumes where it stopped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from curate.judges.backend import JudgeBackend, JudgeRequest
from curate.judges.batch import BatchRunner
from curate.judges.bounds import PromptBounds, bound_sample
from curate.judges.limits import Budget, RateLimiter
from curate.judges.runner import JudgeFailure, JudgeRunner, estimate_tokens, request_key
from pydantic import BaseModel, Field, field_validator

from curate.cache import Cache
from curate.errors import UserError
from curate.generation import Prompt
from curate.registry import Registry
from curate.retry import RetryPolicy
from curate.sample import Sample
from curate.stage import KEEP, Resources, Stage, StageContext, StageOptions, Verdict, reject
from curate.stage.cost import StageCost

RUBRICS = Path(__file__).parent / "rubrics"
# Gemini 3.1 Pro takes 1M tokens; 128k keeps a request within most judges' context and its cost bounded,
# and far above any trajectory of the bundled sample. Metis-ColdStart shows at most 15 images.
DEFAULT_MAX_PROMPT_TOKENS = 131_072
DEFAULT_MAX_IMAGES = 16
PAID_BACKENDS = ("gemini", "openai")
BACKENDS: Registry[JudgeBackend] = Registry("judge backend", {
    "gemini": "curate.judges.gemini:GeminiBackend",
    "openai": "curate.judges.openai_chat:OpenAIJudge",
    "transformers": "curate.judges.local:LocalJudge",
}, "curate.judge_backends")


@dataclass(frozen=True)
class Rubric:
    name: str
    version: str
    text: str

    @property
    def id(self) -> str:
        """name@version plus a digest of the text: editing a rubric without bumping its version still
        changes every cache key, so no stale verdict is reused."""
        return f"{self.name}@{self.version}:{hashlib.sha256(self.text.encode()).hexdigest()[:12]}"


def load_rubric(source: str) -> Rubric:
    """A bundled rubric by name (`judges/rubrics/<name>.md`) or a file path; front matter gives name and version."""
    path = Path(source) if source.endswith(".md") else RUBRICS / f"{source}.md"
    if not path.is_file():
        raise UserError(f"rubric {source!r} not found: give a bundled name ({', '.join(sorted(p.stem for p in RUBRICS.glob('*.md')))}) "
                        f"or a path to a .md file")
    text = path.read_text()
    front: dict[str, Any] = {}
    if text.startswith("---\n"):
        header, _, text = text[4:].partition("\n---\n")
        front = yaml.safe_load(header) or {}
    return Rubric(str(front.get("name", path.stem)), str(front.get("version", "0")), text.strip())


def make_backend(backend: str, model: str, options: dict[str, Any]) -> JudgeBackend:
    return BACKENDS.load(backend)(model, **options)


class JudgeOptions(StageOptions):
    backend: Literal["gemini", "openai", "transformers"] = Field(default="gemini", description="judge backend")
    model: str = Field(default="gemini-3.1-pro-preview", description="model name for the backend")
    backend_options: dict[str, Any] = Field(default_factory=dict,
                                            description="e.g. base_url, api_key_env (gemini/openai), batch_size (transformers)")
    rubric: str | None = Field(default=None, description="bundled rubric name or path to a .md file; default: the stage's")
    min_scores: dict[str, int] = Field(default_factory=dict, description="threshold per dimension (default 3 each)")
    temperature: float = Field(default=0.0, ge=0)
    max_tokens: int = Field(default=1024, gt=0)
    concurrency: int = Field(default=8, gt=0, description="requests in flight")
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0, description="estimated input + output tokens")
    max_retries: int = Field(default=5, ge=0, description="retries of 429 / 5xx / timeouts")
    parse_retries: int = Field(default=2, ge=0, description="retries of answers that are not the schema")
    backoff: float = Field(default=1.0, ge=0, description="first retry delay in seconds (doubles, plus jitter)")
    max_requests: int | None = Field(default=None, gt=0, description="budget: stop the run after this many requests")
    max_usd: float | None = Field(default=None, gt=0, description="budget: stop at this estimated spend")
    usd_per_million_input: float = Field(default=0.0, ge=0, description="price, for max_usd")
    usd_per_million_output: float = Field(default=0.0, ge=0, description="price, for max_usd")
    batch_price_ratio: float = Field(default=0.5, gt=0, le=1, description="batch price / online price (Gemini: 0.5)")
    mode: Literal["online", "batch"] = Field(default="online",
                                             description="batch: the provider's Batch API (gemini), at its lower price")
    batch_retries: int = Field(default=2, ge=0, description="later jobs for a request that failed or had no result")
    batch_poll_seconds: float = Field(default=10.0, gt=0, description="first wait between polls (x1.5 each, to the max)")
    batch_max_poll_seconds: float = Field(default=300.0, gt=0, description="longest wait between polls")
    max_prompt_tokens: int | None = Field(default=DEFAULT_MAX_PROMPT_TOKENS, gt=0,
                                          description="estimated input tokens per request; longer trajectories are cut")
    max_images: int | None = Field(default=DEFAULT_MAX_IMAGES, ge=0, description="images per request; the rest are left out")
    expected_output_tokens: int | None = Field(default=None, gt=0,
                                               description="for `curate estimate`: output tokens per request (default max_tokens)")

    _plugin_backends = field_validator("backend", mode="wrap")(BACKENDS.plugin_names_too())


def backend_settings(backend: str) -> dict[str, Any]:
    """The settings a paid backend adds to every cache key (its class declares them)."""
    return BACKENDS.load(backend).settings


def make_runner(options: JudgeOptions, cache: Cache, rubric: Rubric) -> JudgeRunner | BatchRunner:
    """A runner with the options' backend, concurrency, rate limits, budget and retry policy; in batch mode,
    the batch runner around it."""
    online = JudgeRunner(
        make_backend(options.backend, options.model, options.backend_options), cache, rubric.id,
        options.concurrency, RateLimiter(options.requests_per_minute, options.tokens_per_minute),
        Budget(options.max_requests, options.max_usd, options.usd_per_million_input, options.usd_per_million_output),
        RetryPolicy(options.max_retries, options.backoff), options.parse_retries)
    if options.mode == "online":
        return online
    return BatchRunner(online, options.batch_retries, options.batch_poll_seconds, options.batch_max_poll_seconds,
                       options.batch_price_ratio)


class JudgeStage(Stage):
    """Subclasses set `name`, `default_rubric`, `Scores` (the verdict schema), `dimension_reasons`
    (dimension -> rejection reason), `reasons` (every reason it can give -> one line), and implement
    `render(sample)`."""

    Options = JudgeOptions
    batch_size = 32
    backend_classes = BACKENDS  # backend_options are checked against these constructors at recipe load
    batch_mode_size = 1 << 30  # in batch mode one job takes every row of a committed batch
    default_rubric: ClassVar[str]
    Scores: ClassVar[type[BaseModel]]
    dimension_reasons: ClassVar[dict[str, str]]

    def __init__(self, options: StageOptions | None = None) -> None:
        super().__init__(options)
        if self.options.mode == "batch":
            self.batch_size = self.batch_mode_size  # type: ignore[misc]

    @property
    def resources(self) -> Resources:  # type: ignore[override]
        # One client (or local model) per run, with its own concurrency.
        return Resources(io=self.options.backend != "transformers", heavy=True)

    def setup(self, context: StageContext) -> None:
        options = self.options
        self.rubric = load_rubric(options.rubric or self.default_rubric)
        unknown = set(options.min_scores) - set(self.dimension_reasons)
        if unknown:
            raise UserError(f"stage {self.name!r}: min_scores names {sorted(unknown)}; "
                            f"its dimensions are {sorted(self.dimension_reasons)}")
        self.cache = Cache(context.cache_path)
        self.runner = make_runner(options, self.cache, self.rubric)

    def teardown(self) -> None:
        self.runner.close()
        self.cache.close()

    def render(self, sample: Sample) -> Prompt | None:
        """What the judge sees; None when there is nothing to judge (the sample is kept unjudged)."""
        raise NotImplementedError

    def request(self, sample: Sample) -> tuple[JudgeRequest, dict[str, Any] | None] | None:
        """The request the judge gets for a sample, bounded to `max_prompt_tokens` and `max_images`, and what
        the bound cut (None when nothing); None when there is nothing to judge. `curate estimate` uses it too."""
        bounds = PromptBounds(self.options.max_prompt_tokens, self.options.max_images)
        bounded, cut = bound_sample(sample, bounds, reserved_chars=len(self.rubric.text))
        prompt = self.render(bounded)
        if prompt is None:
            return None
        return JudgeRequest(self.rubric.text, prompt, self.Scores, self.options.temperature, self.options.max_tokens), cut

    def cost_estimate(self, cache: Cache) -> _CostEstimator | None:
        """For `curate estimate`: counts the requests a run would send, on a paid backend; None on a local one."""
        if self.options.backend not in PAID_BACKENDS:
            return None
        self.rubric = load_rubric(self.options.rubric or self.default_rubric)
        return _CostEstimator(self, cache)

    def process(self, batch: list[Sample]) -> list[Verdict]:
        made = [self.request(sample) for sample in batch]
        judged = [i for i, item in enumerate(made) if item is not None]
        outcomes = dict(zip(judged, self.runner.run([made[i][0] for i in judged]), strict=True))  # type: ignore[index]
        return [self._verdict(sample, outcomes.get(i), made[i][1] if made[i] else None) for i, sample in enumerate(batch)]

    def _verdict(self, sample: Sample, outcome: BaseModel | JudgeFailure | None, cut: dict[str, Any] | None) -> Verdict:
        about = {"rubric": self.rubric.id, "model": f"{self.options.backend}:{self.options.model}"}
        if cut is not None:
            about["prompt_cut"] = cut
        if outcome is None:
            sample.meta[self.name] = {**about, "judged": False}
            return KEEP
        if isinstance(outcome, JudgeFailure):
            sample.meta[self.name] = {**about, "error": outcome.message}
            return reject("judge_error", outcome.message)
        scores = outcome.model_dump()
        sample.meta[self.name] = {**about, **scores}
        thresholds = {dim: self.options.min_scores.get(dim, 3) for dim in self.dimension_reasons}
        low = [(dim, scores[dim], threshold) for dim, threshold in thresholds.items() if scores[dim] < threshold]
        if not low:
            return KEEP
        summary = ", ".join(f"{dim} {score} < {threshold}" for dim, score, threshold in low)
        return reject(self.dimension_reasons[low[0][0]], f"{summary}: {scores.get('justification', '')}")


class _CostEstimator:
    """A judge stage's requests counted without a backend: keys as the runner makes them, tokens as the rate
    limiter estimates them, output tokens from `expected_output_tokens` (default: `max_tokens`, an upper bound)."""

    def __init__(self, stage: JudgeStage, cache: Cache) -> None:
        options = stage.options
        self.stage, self.cache = stage, cache
        self.settings = backend_settings(options.backend)
        self.seen: set[str] = set()  # a request repeated in the input is paid for once
        self.cost = StageCost(stage.name, f"{options.backend}:{options.model}",
                              usd_per_million_input=options.usd_per_million_input,
                              usd_per_million_output=options.usd_per_million_output,
                              batch_price_ratio=options.batch_price_ratio)

    def add(self, sample: Sample) -> None:
        made = self.stage.request(sample)
        if made is None:
            return
        request, options = made[0], self.stage.options
        key = request_key(options.backend, options.model, self.settings, self.stage.rubric.id, request)
        if key in self.seen:
            return
        self.seen.add(key)
        if self.cache.get(key) is not None:
            self.cost.cached += 1
            return
        self.cost.requests += 1
        self.cost.input_tokens += estimate_tokens(request) - request.max_tokens
        self.cost.output_tokens += options.expected_output_tokens or request.max_tokens
