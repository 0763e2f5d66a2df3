"""Where inputs and run directories live: any fsspec URL (`s3://`, `gs://`, `hf://`, `https://`, ...); a plain path
is the local case.

Only URLs travel (to worker processes, to Ray tasks); each process opens them itself through fsspec, and
the backend finds its credentials where it always does (for `s3://`: `AWS_*` variables, `~/.aws`; any
backend option also as `FSSPEC_<PROTOCOL>_<OPTION>`, e.g. `FSSPEC_S3_ENDPOINT_URL`). curate never takes
credentials itself, so they never reach a log line, a recipe or a run directory.

Every storage failure becomes one `UserError` line naming the URL and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from curate.errors import UserError

Location = str | Path  # a URL, or a local path


def is_url(location: Location) -> bool:
    return "://" in str(location)


def is_local(location: Location) -> bool:
    return not is_url(location) or str(location).startswith("file://")


def filesystem(location: Location) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding `location` and the path inside it; local folders are made as files are written."""
    try:
        fs, path = fsspec.core.url_to_fs(str(location))
    except (ImportError, ValueError) as exc:
        raise UserError(f"{location}: {_backend_hint(str(location), exc)}") from None
    if isinstance(fs, LocalFileSystem):
        fs = LocalFileSystem(auto_mkdir=True)
    return fs, path


def join(base: Location, *parts: str) -> str:
    """`base/part/...` for a URL or a local path (a URL keeps its scheme; `..` is resolved textually)."""
    if not is_url(base):
        return str(Path(base).joinpath(*parts))
    scheme, _, rest = str(base).partition("://")
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, *parts))}"


def parent(location: Location) -> str:
    if not is_url(location):
        return str(Path(location).parent)
    scheme, _, rest = str(location).partition("://")
    return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"


def name(location: Location) -> str:
    return posixpath.basename(str(location).rstrip("/")) if is_url(location) else Path(location).name


def suffix(location: Location) -> str:
    return posixpath.splitext(name(location))[1].lower()


def expand(pattern: str, base_dir: Path) -> list[str]:
    """The files an input entry names: a URL or a path (relative to `base_dir`), globs expanded, sorted.
    A missing file, an empty glob, a missing bucket or refused credentials stop here, before any work."""
    location = pattern if is_url(pattern) else str(base_dir / Path(pattern).expanduser())
    fs, path = filesystem(location)
    if glob_magic(path):
        with errors(location):
            found = sorted(p for p, info in fs.glob(path, detail=True).items() if info["type"] == "file")
        if not found:
            raise UserError(f"input file not found: no file matches {location}")
        return [fs.unstrip_protocol(p) if is_url(location) else p for p in found]
    if not is_file(location):
        raise UserError(f"input file not found: {location}")
    return [location if is_url(location) else str(Path(location).resolve())]


def glob_magic(path: str) -> bool:
    return any(char in path for char in "*?[")


@contextlib.contextmanager
def open_file(location: Location, mode: str = "rb", **kwargs: Any) -> Iterator[IO[Any]]:
    """A file streamed from its store (read ahead in blocks, never fetched whole first)."""
    fs, path = filesystem(location)
    with errors(location), fs.open(path, mode, **kwargs) as handle:
        yield handle


def read_bytes(location: Location) -> bytes:
    fs, path = filesystem(location)
    with errors(location):
        return fs.cat_file(path)


def is_file(location: Location) -> bool:
    """Whether a file is there; refused credentials or an unreachable store raise (a plain `isfile` would hide
    them as "not found")."""
    fs, path = filesystem(location)
    with errors(location):
        try:
            return fs.info(path)["type"] == "file"
        except FileNotFoundError:
            return False


def size(location: Location) -> int:
    fs, path = filesystem(location)
    with errors(location):
        return int(fs.size(path))


def version(location: Location) -> tuple[str, int, str]:
    """What identifies a file's content cheaply: (location, size, modification time or ETag)."""
    fs, path = filesystem(location)
    with errors(location):
        info = fs.info(path)
    stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("last_commit") or ""
    return str(location), int(info.get("size") or 0), str(stamp)


def local_scratch(run_dir: Location) -> Path:
    """A local folder for a run's scratch files: inside a local run directory, else under the temp folder."""
    if is_local(run_dir):
        return Path(str(run_dir).removeprefix("file://")) / "scratch"
    digest = hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]
    return Path(os.environ.get("TMPDIR", "/tmp")) / "curate-scratch" / digest


def local_log(run_dir: Location) -> Path:
    """Where a run's log is written: RUN_DIR/logs/curate.log for a local run directory, else a local file (copied
    to RUN_DIR/logs/curate.log when the run ends), so that it can be read while the run goes on."""
    if is_local(run_dir):
        return Path(str(run_dir).removeprefix("file://")) / "logs" / "curate.log"
    return local_scratch(run_dir).with_name(f"{local_scratch(run_dir).name}-curate.log")


# --- one line per failure -------------------------------------------------------------


@contextlib.contextmanager
def errors(location: Location) -> Iterator[None]:
    """Turn what a storage backend raises into one line naming the URL and what to do."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        message = describe(str(location), exc)
        if message is None:
            raise
        raise UserError(message) from None


def describe(location: str, exc: BaseException) -> str | None:
    """The one-line message for a storage failure, or None when `exc` is not one."""
    kind = type(exc).__name__
    text = str(exc)
    if kind in ("NoCredentialsError", "PartialCredentialsError") or "Unable to locate credentials" in text:
        return f"{location}: no credentials found; {_credentials_hint(location)}"
    if isinstance(exc, PermissionError) and not is_url(location):
        return f"{location}: permission denied; check the file's permissions"
    if isinstance(exc, PermissionError) or kind in ("ClientAuthenticationError", "Forbidden") \
            or _status(exc) in (401, 403):
        return (f"{location}: access denied ({_first_line(text) or kind}); check the credentials"
                f" ({_credentials_hint(location)}) and that they may read/write this location")
    if isinstance(exc, FileNotFoundError) or _status(exc) == 404:
        bucket = " (no such bucket or object)" if is_url(location) else ""
        return f"{location}: not found{bucket}; check the URL, and create the bucket first for a run directory"
    if kind in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError",
                "ServerTimeoutError", "ConnectError") or isinstance(exc, (ConnectionError, TimeoutError)):
        return (f"{location}: cannot reach the storage endpoint ({_first_line(text) or kind}); check the endpoint"
                " (e.g. AWS_ENDPOINT_URL or FSSPEC_S3_ENDPOINT_URL for S3-compatible stores) and the network")
    if isinstance(exc, OSError) and is_url(location):
        return (f"{location}: storage error ({_first_line(text) or kind}); check the URL, the endpoint and the"
                " credentials")
    return None


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    response = getattr(exc, "response", None)
    if status is None and response is not None:
        status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:200] if text.strip() else ""


def _credentials_hint(location: str) -> str:
    scheme = location.partition("://")[0] if is_url(location) else "file"
    return {
        "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials",
        "gs": "set GOOGLE_APPLICATION_CREDENTIALS, or run `gcloud auth application-default login`",
        "gcs": "set GOOGLE_APPLICATION_CREDENTIALS, or run `gcloud auth application-default login`",
        "hf": "set HF_TOKEN, or run `hf auth login`",
    }.get(scheme, f"see the {scheme} fsspec backend's documentation")


def _backend_hint(location: str, exc: BaseException) -> str:
    scheme = location.partition("://")[0]
    package = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(scheme)
    if package:
        return f"reading {scheme}:// needs the {package} package: pip install {package}"
    return f"no storage backend for {scheme}:// ({_first_line(str(exc))}); see fsspec's list of backends"
