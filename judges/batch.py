"""`mode: batch`: a judge stage's requests as provider batch jobs, at the batch price, paid for once.

A job is written down before it exists and named as soon as it does: `BatchJobs` keeps, next to the cache
(a `batch_jobs` table of the same SQLite file), each job's display name, its provider name once created
and the cache keys it holds. A run killed at any point resumes without submitting a key twice:
- killed before the create call returned: the job is looked up by its display name, and submitted only
  when the provider has none;
- killed while the job runs: the resumed run finds the keys it needs in a recorded job and waits on it.

`BatchRunner` has the runner's interface (`run(requests)` -> verdicts or failures, in order):
cached verdicts come from the cache; the rest go out as one job (per call: a stage's batch) and are polled
with backoff under a progress bar; results are matched by key, parsed and cached exactly as online.
A request that failed, had no result or answered something that is not the schema goes into a later job,
up to `retries` times. Then, if its last job answered it (not the schema), it is a `JudgeFailure` (the
stage's `judge_error`, cached); if it never got an answer, the run stops with `TransientFailure` once the
other keys' verdicts are cached, and a rerun submits only what is missing (`curate.retry`'s policy). A job
that fails, expires or is cancelled is resubmitted once; a second such job stops the run the same way.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass

from pydantic import BaseModel
from tqdm import tqdm

from curate.cache import Cache
from curate.errors import UserError
from curate.retry import TransientFailure, retry
from curate.judges.backend import BatchBackend, JudgeReply, JudgeRequest
from curate.judges.limits import Budget
from curate.judges.runner import JudgeFailure, JudgeRunner, parse_verdict

FINISHED_BADLY = {"failed", "cancelled", "expired"}


@dataclass(frozen=True)
class Job:
    display_name: str
    name: str | None  # the provider's name; None until the create call returned
    keys: tuple[str, ...]
    attempt: int  # 0 for a first submission, 1 for the resubmission of a job that failed or expired


class BatchJobs:
    """The jobs in flight, in the `batch_jobs` table of the cache file: written before a job is created."""

    def __init__(self, cache: Cache) -> None:
        self._db = sqlite3.connect(cache.path, timeout=60, isolation_level=None, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS batch_jobs (display_name TEXT PRIMARY KEY, backend TEXT NOT NULL,"
                         " model TEXT NOT NULL, name TEXT, keys TEXT NOT NULL, attempt INTEGER NOT NULL, created REAL)")

    def add(self, backend: str, model: str, job: Job) -> None:
        self._db.execute("INSERT INTO batch_jobs VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (job.display_name, backend, model, job.name, json.dumps(job.keys), job.attempt, time.time()))

    def named(self, job: Job, name: str) -> Job:
        self._db.execute("UPDATE batch_jobs SET name = ? WHERE display_name = ?", (name, job.display_name))
        return Job(job.display_name, name, job.keys, job.attempt)

    def remove(self, job: Job) -> None:
        self._db.execute("DELETE FROM batch_jobs WHERE display_name = ?", (job.display_name,))

    def in_flight(self, backend: str, model: str) -> list[Job]:
        rows = self._db.execute("SELECT display_name, name, keys, attempt FROM batch_jobs WHERE backend = ? AND model = ?"
                                " ORDER BY created", (backend, model)).fetchall()
        return [Job(display, name, tuple(json.loads(keys)), attempt) for display, name, keys, attempt in rows]

    def close(self) -> None:
        self._db.close()


class BatchRunner:
    """Judges requests through a backend's batch API; see the module docstring."""

    def __init__(self, online: JudgeRunner, retries: int = 2, poll_seconds: float = 10.0,
                 max_poll_seconds: float = 300.0, price_ratio: float = 0.5, progress: bool = True) -> None:
        if not hasattr(online.backend, "submit_batch"):
            online.close()
            raise UserError(f"mode: batch needs a backend with a batch API (gemini); {online.backend.name!r} has none: "
                            "use mode: online")
        self.online = online  # its backend, cache, keys, budget and retry policy; its event loop closes the backend
        self.backend: BatchBackend = online.backend  # type: ignore[assignment]
        self.cache = online.cache
        self.jobs = BatchJobs(online.cache)
        self.retries = retries
        self.poll_seconds = poll_seconds
        self.max_poll_seconds = max_poll_seconds
        self.price_ratio = price_ratio  # batch price / online price, for the budget
        self.progress = progress
        self.submitted = 0  # requests submitted in jobs by this runner, resubmissions included

    @property
    def budget(self) -> Budget:
        return self.online.budget

    def key(self, request: JudgeRequest) -> str:
        return self.online.key(request)

    def close(self) -> None:
        self.jobs.close()
        self.online.close()

    def run(self, requests: list[JudgeRequest]) -> list[BaseModel | JudgeFailure]:
        keys = [self.key(request) for request in requests]
        outcomes: dict[str, BaseModel | JudgeFailure] = {}
        todo: dict[str, JudgeRequest] = {}
        for key, request in zip(keys, requests, strict=True):
            cached = self.cache.get(key)
            if cached is not None:
                outcomes[key] = JudgeFailure(cached["failure"]) if "failure" in cached else request.schema.model_validate(cached)
            else:
                todo[key] = request
        tries: dict[str, list[str]] = {key: [] for key in todo}  # what went wrong with each key, per round
        unanswered: list[str] = []
        while todo:
            results, finished = self._round(todo)
            for key in list(todo):
                verdict, problem = self._outcome(todo[key], results.get(key))
                if verdict is not None:
                    self.cache.put(key, verdict.model_dump())
                    outcomes[key] = verdict
                    del todo[key]
                    continue
                tries[key].append(problem)
                if len(tries[key]) > self.retries:
                    if isinstance(results.get(key), JudgeReply):  # answered, and not the schema: a verdict of sorts
                        outcomes[key] = self._failure(key, tries[key])
                    else:
                        unanswered.append(key)
                    del todo[key]
            for job in finished:  # only now: a kill before the verdicts were cached re-attaches to the job
                self.jobs.remove(job)
        if unanswered:  # never a verdict: the batch stays uncommitted, and a rerun asks again for these only
            raise TransientFailure(f"{self.backend.name} batch: {len(unanswered)} request(s) had no answer after "
                                   f"{self.retries + 1} batch attempts: {' | '.join(tries[unanswered[0]])}")
        return [outcomes[key] for key in keys]

    # --- one round: the jobs that hold these keys, waited on ----------------------------------------------------

    def _round(self, todo: dict[str, JudgeRequest]) -> tuple[dict[str, JudgeReply | str], list[Job]]:
        """Every key's result from the recorded jobs holding it, or from a new job for the rest; the jobs."""
        jobs = [job for job in self.jobs.in_flight(self.backend.name, self.backend.model) if set(job.keys) & todo.keys()]
        held = {key for job in jobs for key in job.keys}
        fresh = [key for key in todo if key not in held]
        if fresh:
            jobs.append(self._submit([(key, todo[key]) for key in fresh], attempt=0))
        return self._wait([job for job in jobs if job is not None], todo)

    def _submit(self, entries: list[tuple[str, JudgeRequest]], attempt: int) -> Job | None:
        """Record the job, then create it: a kill in between finds it again by its display name."""
        if not entries:
            return None
        self.budget.check()
        job = Job(f"curate-{uuid.uuid4().hex}", None, tuple(key for key, _ in entries), attempt)
        self.jobs.add(self.backend.name, self.backend.model, job)
        tried = False

        def create() -> str:
            """A retry first looks the job up: a create that timed out may have reached the provider."""
            nonlocal tried
            if tried and (found := self.backend.find_batch(job.display_name)) is not None:
                return found
            tried = True
            return self.backend.submit_batch(job.display_name, entries)

        name = self._call(create)
        self.budget.requests += len(entries)
        self.submitted += len(entries)
        return self.jobs.named(job, name)

    def _wait(self, jobs: list[Job], todo: dict[str, JudgeRequest]) -> tuple[dict[str, JudgeReply | str], list[Job]]:
        """Poll the jobs, with backoff, until each has finished; their results by key, and the jobs that gave them."""
        results: dict[str, JudgeReply | str] = {}
        finished: list[Job] = []
        waiting = [attached for job in jobs if (attached := self._attached(job, todo)) is not None]
        delay = self.poll_seconds
        with tqdm(total=sum(len(job.keys) for job in waiting), desc=f"{'batch jobs':>24}", unit="req",
                  disable=None if self.progress else True, leave=False) as bar:  # None: off when not a terminal
            while waiting:
                still: list[Job] = []
                for job in waiting:
                    state = self._call(lambda job=job: self.backend.batch_state(job.name))
                    if state == "succeeded":
                        results.update(self._collect(job))
                        finished.append(job)
                        bar.update(len(job.keys))
                    elif state in FINISHED_BADLY:
                        if (again := self._resubmit(job, state, todo)) is not None:
                            still.append(again)
                    else:
                        still.append(job)
                bar.set_postfix(jobs=len(still))
                waiting = still
                if waiting:
                    time.sleep(delay)
                    delay = min(delay * 1.5, self.max_poll_seconds)
        return results, finished

    def _attached(self, job: Job, todo: dict[str, JudgeRequest]) -> Job | None:
        """A recorded job with its provider name: looked up when a kill came before the name was recorded,
        created now (for the keys still wanted) when the provider never got it."""
        if job.name is not None:
            return job
        found = self._call(lambda: self.backend.find_batch(job.display_name))
        if found is not None:
            return self.jobs.named(job, found)
        self.jobs.remove(job)
        return self._submit([(key, todo[key]) for key in job.keys if key in todo], job.attempt)

    def _collect(self, job: Job) -> dict[str, JudgeReply | str]:
        results = self._call(lambda: self.backend.batch_results(job.name))
        for reply in results.values():
            if isinstance(reply, JudgeReply):
                self.budget.charge(round(reply.input_tokens * self.price_ratio), round(reply.output_tokens * self.price_ratio))
        return results

    def _resubmit(self, job: Job, state: str, todo: dict[str, JudgeRequest]) -> Job | None:
        if job.attempt >= 1:
            self.jobs.remove(job)
            raise TransientFailure(f"{self.backend.name} batch job {job.name} ended {state} after a resubmission; the "
                                   "verdicts so far are cached: run the same command again to resubmit what is left, "
                                   "or use mode: online")
        self.jobs.remove(job)
        return self._submit([(key, todo[key]) for key in job.keys if key in todo], attempt=1)

    def _call(self, call):  # type: ignore[no-untyped-def]
        """A Batch API call, retried on transient errors with the online runner's policy."""
        return retry(call, self.online.retry, f"{self.backend.name} batch API")

    # --- outcomes -------------------------------------------------------------------------------------------------

    @staticmethod
    def _outcome(request: JudgeRequest, result: JudgeReply | str | None) -> tuple[BaseModel | None, str]:
        if result is None:
            return None, "no result for this request"
        if isinstance(result, str):
            return None, result
        verdict = parse_verdict(result.text, request.schema)
        return verdict, "" if verdict is not None else f"not a {request.schema.__name__}: {result.text[:120]}"

    def _failure(self, key: str, problems: list[str]) -> JudgeFailure:
        """After the retries, when the last answer was paid for and not the schema: cached (it would come back
        the same)."""
        failure = JudgeFailure(f"{len(problems)} batch attempts: {' | '.join(problems)}")
        self.cache.put(key, {"failure": failure.message})
        return failure
