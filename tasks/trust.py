"""The trust boundary of a deployment run: what a person who may start runs (the Prefect form, or
the API behind it) can point the worker at.

The worker holds credentials: an MLflow token (MLFLOW_TRACKING_TOKEN, or a user and password) and
an AWS identity (keys, a session token, a profile). MLflow sends its token to whatever tracking
URI the run uses, and boto3 signs every request (SigV4, with the session token) for whatever
endpoint it is given. So in a deployment run the tracking server, the S3 endpoint and the AWS
profile come from the worker's own configuration; a form value that differs is refused in one
line before anything is contacted (the same value, or none, is fine). A run started by hand
(`python -m flows run`, no deployment) is the operator's own and may point anywhere.

What a form can read and write is otherwise what the worker's identity may (its IAM policy is the
boundary). A worker can narrow that with two allow-lists, checked for every run:

    LORA_MOE_ALLOWED_ARTIFACT_ROOTS  where `artifact_root` (and a form's `storage.work_dir`) may lie
    LORA_MOE_ALLOWED_INPUT_PREFIXES  where the base models and the clip manifest may be read from
                                     (inside an allowed artifact root is allowed too)

Each is a comma-separated list of `s3://bucket/prefix` or local folders; a URI is inside an entry
when it is the entry or below it at a path boundary (`s3://b/data` does not admit `s3://b/data-x`),
local paths after resolving symlinks. A manifest names only files inside its own folder
(`moe.data.manifest`), so its clips are inside whatever admitted the manifest.

Files of the worker itself are another matter: no IAM policy guards them, and the worker's own
credentials are files too. So a deployment run reads or writes a local path that its form named
(a model, a manifest, a sample-prompts file, an artifact root, a work folder) only inside an entry
of those allow-lists, set or not; the worker's own defaults (LORA_MOE_ARTIFACT_ROOT, ...) are its own.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel

from moe.errors import MoeError

ARTIFACT_ROOTS_VARIABLE = "LORA_MOE_ALLOWED_ARTIFACT_ROOTS"
INPUT_PREFIXES_VARIABLE = "LORA_MOE_ALLOWED_INPUT_PREFIXES"


class WorkerPolicy(BaseModel):
    """The worker's own endpoints and allow-lists (from its environment)."""

    tracking_uri: str | None = None
    s3_endpoint: str | None = None
    s3_profile: str | None = None
    artifact_roots: tuple[str, ...] = ()
    input_prefixes: tuple[str, ...] = ()

    @classmethod
    def from_environ(cls, environ: dict[str, str]) -> WorkerPolicy:
        def listed(name: str) -> tuple[str, ...]:
            return tuple(item.strip() for item in environ.get(name, "").split(",") if item.strip())

        return cls(
            tracking_uri=environ.get("MLFLOW_TRACKING_URI") or None,
            s3_endpoint=environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or None,
            s3_profile=environ.get("AWS_PROFILE") or None,
            artifact_roots=listed(ARTIFACT_ROOTS_VARIABLE),
            input_prefixes=listed(INPUT_PREFIXES_VARIABLE),
        )


def redact(uri: str) -> str:
    """`uri` without a user or password in it (they would otherwise reach the run's message)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))


def _same_endpoint(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def check_endpoints(policy: WorkerPolicy, *, tracking_uri: str | None, s3_endpoint: str | None, s3_profile: str | None) -> None:
    """Refuse, for a deployment run, form values that would send the worker's credentials to a
    host (or pick an identity) the worker was not configured with."""
    given = (
        ("tracking.tracking_uri", tracking_uri, policy.tracking_uri, "MLFLOW_TRACKING_URI", "tracking server", "its MLflow token"),
        (
            "storage.s3.endpoint_url",
            s3_endpoint,
            policy.s3_endpoint,
            "AWS_ENDPOINT_URL_S3",
            "S3 endpoint",
            "requests signed with its AWS credentials",
        ),
        ("storage.s3.profile", s3_profile, policy.s3_profile, "AWS_PROFILE", "AWS profile", "another of its AWS identities"),
    )
    for field, value, own, variable, noun, what in given:
        if value and not (own and _same_endpoint(value, own)):
            mine = f"{variable}={redact(own)}" if own else f"{variable} is not set there"
            raise MoeError(
                f"{field}={redact(value)!r} is refused: a deployment run uses the worker's own {noun} "
                f"({mine}), so that {what} never go to a place named in a form; leave {field} empty"
            )


def _inside(uri: str, prefix: str) -> bool:
    """Whether `uri` is `prefix` or below it at a path boundary (local paths: symlinks resolved)."""
    if prefix.startswith("s3://") or uri.startswith("s3://"):
        if not (prefix.startswith("s3://") and uri.startswith("s3://")):
            return False
        key, base = uri.removeprefix("s3://"), prefix.removeprefix("s3://").rstrip("/")
        if ".." in key.split("/") or re.search(r"//", key):
            return False  # S3 keeps such keys literally; refuse rather than reason about them
        return key == base or key.startswith(base + "/")
    path = Path(uri.removeprefix("file://")).expanduser()
    allowed = Path(prefix.removeprefix("file://")).expanduser()
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(allowed))


def _is_local(uri: str) -> bool:
    return not uri.startswith("s3://")


def check_locations(
    policy: WorkerPolicy,
    *,
    artifact_root: str,
    work_dir: str | None,
    inputs: dict[str, str],
    deployment_run: bool = False,
    form_outputs: frozenset[str] = frozenset(),
) -> None:
    """Every place the run writes or reads by URI lies inside the worker's allow-lists (where set).
    In a deployment run a path on the worker itself (no IAM policy guards it: the worker's own
    credentials are files too) is read or written only inside an allow-list entry, whether or not
    the lists are set; `form_outputs` names the output fields the form gave (not the worker's own
    defaults)."""
    outputs = (("artifact_root", artifact_root), ("storage.work_dir", work_dir))
    for field, uri in outputs:
        if not uri:
            continue
        inside = any(_inside(uri, root) for root in policy.artifact_roots)
        if policy.artifact_roots and not inside:
            raise MoeError(
                f"{field}={uri!r} is outside the worker's allowed artifact roots ({ARTIFACT_ROOTS_VARIABLE}: {', '.join(policy.artifact_roots)})"
            )
        if deployment_run and field in form_outputs and _is_local(uri) and not inside:
            raise MoeError(
                f"{field}={uri!r} is a folder on the worker: a deployment run writes the worker's files only "
                f"inside {ARTIFACT_ROOTS_VARIABLE} (not set there); leave {field} empty for the worker's own"
            )
    allowed = (*policy.input_prefixes, *policy.artifact_roots)
    for field, uri in inputs.items():
        inside = any(_inside(uri, prefix) for prefix in allowed)
        if allowed and not inside:
            raise MoeError(
                f"{field}={uri!r} is outside the worker's allowed input prefixes "
                f"({INPUT_PREFIXES_VARIABLE}: {', '.join(policy.input_prefixes) or 'none'}; "
                f"{ARTIFACT_ROOTS_VARIABLE}: {', '.join(policy.artifact_roots) or 'none'})"
            )
        if deployment_run and _is_local(uri) and not inside:
            raise MoeError(
                f"{field}={uri!r} is a file on the worker: a deployment run reads the worker's files only "
                f"inside {INPUT_PREFIXES_VARIABLE} or {ARTIFACT_ROOTS_VARIABLE} (neither admits it)"
            )


def check_run(
    environ: dict[str, str],
    *,
    deployment_run: bool,
    artifact_root: str,
    tracking_uri: str | None,
    s3_endpoint: str | None,
    s3_profile: str | None,
    work_dir: str | None,
    inputs: dict[str, str],
    form_outputs: frozenset[str] = frozenset(),
) -> None:
    """Both checks above for one flow run (the endpoint check for deployment runs only)."""
    policy = WorkerPolicy.from_environ(environ)
    if deployment_run:
        check_endpoints(policy, tracking_uri=tracking_uri, s3_endpoint=s3_endpoint, s3_profile=s3_profile)
    check_locations(policy, artifact_root=artifact_root, work_dir=work_dir, inputs=inputs, deployment_run=deployment_run, form_outputs=form_outputs)


__all__ = ["WorkerPolicy", "check_endpoints", "check_locations", "check_run", "redact"]
