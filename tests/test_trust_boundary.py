"""The worker's trust boundary (issue 22, item 1; `tasks.trust`): a deployment run's form cannot
send the worker's MLflow token or SigV4-signed requests to a host the worker was not configured
with, the worker's allow-lists bound what a run reads and writes, and a manifest names only files
inside its own folder. (A deployment run started through the API as the UI's Run button does is
in tests/test_stack.py.)"""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from moe.data.manifest import ClipRecord
from moe.errors import MoeError
from tasks.trust import WorkerPolicy, check_endpoints, check_locations, check_run, redact

WORKER = {"MLFLOW_TRACKING_URI": "http://mlflow.lab:5000", "AWS_ENDPOINT_URL_S3": "http://minio.lab:9000", "AWS_PROFILE": "trainer"}


def _endpoints(environ, **given):
    values = {"tracking_uri": None, "s3_endpoint": None, "s3_profile": None} | given
    check_endpoints(WorkerPolicy.from_environ(environ), **values)


@pytest.mark.parametrize(
    "given, field",
    [
        ({"tracking_uri": "http://collector.example:5000"}, "tracking.tracking_uri"),
        ({"s3_endpoint": "http://collector.example:9000"}, "storage.s3.endpoint_url"),
        ({"s3_profile": "admin"}, "storage.s3.profile"),
    ],
)
def test_a_deployment_form_cannot_point_the_workers_credentials_elsewhere(given, field):
    with pytest.raises(MoeError, match=rf"^{field}='[^']+' is refused: .*worker's own .*leave {field} empty"):
        _endpoints(WORKER, **given)
    with pytest.raises(MoeError, match=rf"{field}=.* is not set there"):  # nothing configured: nothing else either
        _endpoints({}, **given)


def test_the_workers_own_endpoints_or_none_are_accepted():
    _endpoints(WORKER)
    _endpoints(WORKER, tracking_uri="http://mlflow.lab:5000/", s3_endpoint="http://minio.lab:9000", s3_profile="trainer")
    _endpoints({"AWS_ENDPOINT_URL": "http://minio.lab:9000"}, s3_endpoint="http://minio.lab:9000")


def test_credentials_in_a_uri_never_reach_the_message():
    with pytest.raises(MoeError) as e:
        _endpoints({"MLFLOW_TRACKING_URI": "http://bot:worker-secret@mlflow.lab:5000"}, tracking_uri="http://me:form-secret@collector.example:5000")
    assert "secret" not in str(e.value) and "collector.example:5000" in str(e.value) and "mlflow.lab:5000" in str(e.value)
    assert redact("https://u:p@h.example:8443/path") == "https://h.example:8443/path"


def test_a_run_started_by_hand_may_point_anywhere_but_a_deployment_run_may_not():
    given = dict(artifact_root="outputs/x", tracking_uri="http://collector.example:5000", s3_endpoint=None, s3_profile=None, work_dir=None, inputs={})
    check_run(WORKER, deployment_run=False, **given)
    with pytest.raises(MoeError, match="tracking.tracking_uri"):
        check_run(WORKER, deployment_run=True, **given)


@pytest.mark.parametrize(
    "uri, inside",
    [
        ("s3://lab/pipeline", True),
        ("s3://lab/pipeline/", True),
        ("s3://lab/pipeline/runs/a", True),
        ("s3://lab/pipeline-other", False),
        ("s3://other/pipeline", False),
        ("s3://lab/pipeline/../private", False),
        ("s3://lab/pipeline//x", False),
        ("/srv/lora-moe", False),
    ],
)
def test_artifact_roots_are_matched_at_path_boundaries(uri, inside):
    policy = WorkerPolicy.from_environ({"LORA_MOE_ALLOWED_ARTIFACT_ROOTS": " s3://lab/pipeline , s3://lab/scratch/"})
    if inside:
        check_locations(policy, artifact_root=uri, work_dir=None, inputs={})
    else:
        with pytest.raises(
            MoeError,
            match=r"^artifact_root=.* is outside the worker's allowed artifact roots "
            r"\(LORA_MOE_ALLOWED_ARTIFACT_ROOTS: s3://lab/pipeline, s3://lab/scratch/\)",
        ):
            check_locations(policy, artifact_root=uri, work_dir=None, inputs={})


def test_local_roots_resolve_dot_dot_and_symlinks(tmp_path):
    allowed, secret = tmp_path / "allowed", tmp_path / "secret"
    allowed.mkdir()
    secret.mkdir()
    (allowed / "link").symlink_to(secret)
    policy = WorkerPolicy.from_environ({"LORA_MOE_ALLOWED_ARTIFACT_ROOTS": str(allowed)})
    check_locations(policy, artifact_root=str(allowed / "runs"), work_dir=f"file://{allowed}/work", inputs={})
    for escape in (f"{allowed}/../secret", str(allowed / "link" / "x"), "s3://lab/pipeline"):
        with pytest.raises(MoeError, match="artifact_root"):
            check_locations(policy, artifact_root=escape, work_dir=None, inputs={})
    with pytest.raises(MoeError, match="storage.work_dir"):
        check_locations(policy, artifact_root=str(allowed), work_dir=str(secret), inputs={})


def test_inputs_must_lie_in_an_input_prefix_or_an_artifact_root():
    policy = WorkerPolicy.from_environ(
        {"LORA_MOE_ALLOWED_INPUT_PREFIXES": "s3://weights/wan22,s3://clips/surgical", "LORA_MOE_ALLOWED_ARTIFACT_ROOTS": "s3://lab/pipeline"}
    )
    check_locations(
        policy,
        artifact_root="s3://lab/pipeline",
        work_dir=None,
        inputs={
            "models.dit": "s3://weights/wan22/low.safetensors",
            "data.manifest": "s3://clips/surgical/manifest.jsonl",
            "models.vae": "s3://lab/pipeline/runs/a/vae",
        },
    )
    with pytest.raises(
        MoeError,
        match=r"^models.dit='s3://weights/other.safetensors' is outside the worker's allowed "
        r"input prefixes \(LORA_MOE_ALLOWED_INPUT_PREFIXES: s3://weights/wan22",
    ):
        check_locations(policy, artifact_root="s3://lab/pipeline", work_dir=None, inputs={"models.dit": "s3://weights/other.safetensors"})
    open_policy = WorkerPolicy.from_environ({})  # no allow-list: the worker's IAM policy is the boundary
    check_locations(open_policy, artifact_root="s3://any/where", work_dir="/tmp/x", inputs={"models.dit": "s3://a/b"})


@pytest.mark.parametrize("video", ["../other/clip.mp4", "videos/../../etc/passwd", "/etc/passwd", "s3://b/k.mp4", "..\\clip.mp4"])
def test_a_manifest_names_only_files_inside_its_own_folder(video):
    with pytest.raises(ValidationError, match="must be a path relative to the manifest's folder"):
        ClipRecord(video=video, caption="c", instruments=["hook"])
    with pytest.raises(ValidationError, match="must be a path relative to the manifest's folder"):
        ClipRecord(video="videos/a.mp4", caption="c", instruments=["hook"], mask=video)
    assert ClipRecord(video="videos/a..b.mp4", caption="c", instruments=["hook"]).video == "videos/a..b.mp4"


def test_the_flow_refuses_a_root_outside_the_allow_list_before_creating_anything(prefect_api, tmp_path, monkeypatch):
    from flows.pipeline import lora_moe_pipeline

    monkeypatch.setenv("LORA_MOE_ALLOWED_ARTIFACT_ROOTS", str(tmp_path / "allowed"))
    outside = tmp_path / "outside"
    state = lora_moe_pipeline(artifact_root=str(outside), return_state=True)
    assert state.is_failed()
    assert "artifact_root=" in state.message and "LORA_MOE_ALLOWED_ARTIFACT_ROOTS" in state.message
    assert not outside.exists() and os.listdir(tmp_path) == []


def test_a_deployment_run_reads_and_writes_worker_files_only_inside_an_allow_list(tmp_path):
    """No IAM policy guards the worker's own files (its credentials among them): a local path named
    in a deployment run's form needs an allow-list entry even when no list is set."""
    secret = tmp_path / "home" / ".aws" / "credentials"
    given = dict(artifact_root="s3://lab/pipeline", tracking_uri=None, s3_endpoint=None, s3_profile=None, work_dir=None)
    for field in ("models.vae", "data.manifest", "stage1.sample_prompts"):
        check_run({}, deployment_run=False, inputs={field: str(secret)}, **given)  # the operator's own run
        with pytest.raises(MoeError, match=rf"^{field}='.*credentials' is a file on the worker: a deployment run reads"):
            check_run({}, deployment_run=True, inputs={field: str(secret)}, **given)
    check_run({}, deployment_run=True, inputs={"models.dit": "s3://weights/dit.safetensors"}, **given)  # IAM decides
    data = tmp_path / "clips"
    allowed = {"LORA_MOE_ALLOWED_INPUT_PREFIXES": str(data)}
    check_run(allowed, deployment_run=True, inputs={"data.manifest": str(data / "manifest.jsonl")}, **given)
    with pytest.raises(MoeError, match="data.manifest"):
        check_run(allowed, deployment_run=True, inputs={"data.manifest": f"{data}/../home/.aws/credentials"}, **given)
    # Outputs: a form's local root or work folder likewise; the worker's own default root is its own.
    outputs = dict(tracking_uri=None, s3_endpoint=None, s3_profile=None, inputs={})
    check_run({}, deployment_run=True, artifact_root=str(tmp_path / "root"), work_dir=None, **outputs)
    with pytest.raises(MoeError, match=r"^artifact_root=.* is a folder on the worker: a deployment run writes"):
        check_run({}, deployment_run=True, artifact_root=str(tmp_path / "root"), work_dir=None, form_outputs=frozenset({"artifact_root"}), **outputs)
    with pytest.raises(MoeError, match=r"^storage.work_dir="):
        check_run(
            {},
            deployment_run=True,
            artifact_root="s3://lab/pipeline",
            work_dir=str(tmp_path / "home"),
            form_outputs=frozenset({"storage.work_dir"}),
            **outputs,
        )
    check_run(
        {"LORA_MOE_ALLOWED_ARTIFACT_ROOTS": str(tmp_path / "root")},
        deployment_run=True,
        artifact_root=str(tmp_path / "root" / "a"),
        work_dir=None,
        form_outputs=frozenset({"artifact_root"}),
        **outputs,
    )
