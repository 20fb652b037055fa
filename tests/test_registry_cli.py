"""Using registered models: `lora-moe registry list|show|promote`, `lora-moe generate --model
models:/NAME@ALIAS` and `mlflow.pyfunc.load_model(...).predict(...)`, against an MLflow registry
(SQLite) the test fills with real bundles: the tiny stage-2 run's LoRA-MoE, merged DiTs and
components stored in a local artifact store, registered the way the pipeline's `register` does."""

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from moe.config.generate import GenerateConfig
from moe.data.video import read_video, written_by_lora_moe
from moe.inference import generate_video
from tasks.artifacts.local import LocalStore, local_path
from tasks.registry.tracking import TrackingSettings, mlflow_client, ref_tags, stage_run, start_pipeline_run
from tasks.registry.versions import CANDIDATE, CHAMPION, metric_tag, register_bundle, write_bundle

PROMPT = "laparoscopic view, a hook cauterizing tissue"
SMALL_VIDEO = ["--video_size", "32x32", "--video_length", "5", "--infer_steps", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def registry(stage2_run, mlflow_uri, tmp_path_factory):
    """Two versions of a fresh registered model: v1 passed its gate (champion), v2 failed it."""
    root = tmp_path_factory.mktemp("registry")
    store = LocalStore(str(root / "store"))
    models = stage2_run["models"]
    files = {
        "merged_low_noise": stage2_run["merged_low"],
        "merged_high_noise": stage2_run["merged_high"],
        "lora_moe": stage2_run["lora_moe"],
        "base_vae": models.vae,
        "base_text_encoder": models.text_encoder,
        "base_tokenizer": models.tokenizer,
    }
    refs = {name: store.put(path, f"run/{name}", name, "test") for name, path in files.items()}
    name = f"surgical-{uuid.uuid4().hex[:8]}"
    ctx = start_pipeline_run(
        TrackingSettings(experiment=name),
        mlflow_uri,
        str(root / "mlflow-artifacts"),
        {"prefect.flow_run_id": "test", "prefect.flow_run_name": "test"},
        {},
    )
    client = mlflow_client(mlflow_uri)
    entries = []
    for loss, passed in ((0.5, True), (0.4, False)):
        bundle = root / f"bundle-{len(entries)}"
        write_bundle(
            bundle,
            task="tiny-t2v",
            lora_moe_file=stage2_run["lora_moe"],
            artifacts=refs,
            data_fingerprint="ab" * 32,
            metrics={"stage2_learned_roi_loss": loss},
            gate={"passed": passed},
        )
        tags = {"gate.passed": str(passed).lower(), "data_fingerprint": "ab" * 32, metric_tag("stage2_learned_roi_loss"): repr(loss)}
        for ref_name, ref in refs.items():
            tags |= ref_tags(ref_name, ref)
        with stage_run(ctx, "register") as run:
            entries.append(
                register_bundle(
                    client, name, ctx.experiment_id, run.run_id, bundle, tags, passed, "stage2_learned_roi_loss", loss, higher_is_better=False
                )
            )
    assert [e.aliases for e in entries] == [[CANDIDATE, CHAMPION], [CANDIDATE]]
    return {"name": name, "client": client, "uri": mlflow_uri, "store": store, "refs": refs, "root": root}


@pytest.fixture
def registry_env(registry, plugins, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    monkeypatch.setenv("LORA_MOE_DOWNLOAD_CACHE", str(tmp_path / "downloads"))  # a fresh worker cache per test
    return registry


def test_list_and_show(registry_env, capsys):
    name = registry_env["name"]
    code, out, _ = run_cli(capsys, ["registry", "list", "--name", name])
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{name} (2 versions)"
    assert lines[1].split()[:4] == ["v2", "candidate", "gate", "FAILED"] and "stage2_learned_roi_loss 0.4" in lines[1]
    assert lines[2].split()[:4] == ["v1", "champion", "gate", "passed"]
    code, out, _ = run_cli(capsys, ["registry", "show", f"{name}@champion", "--json"])
    shown = json.loads(out)
    assert shown["version"] == "1" and shown["aliases"] == ["champion"] and shown["gate_passed"] is True
    assert shown["metrics"] == {"stage2_learned_roi_loss": 0.5}
    assert shown["artifacts"]["merged_low_noise"] == {
        "uri": registry_env["refs"]["merged_low_noise"].uri,
        "sha256": registry_env["refs"]["merged_low_noise"].sha256,
        "size": str(registry_env["refs"]["merged_low_noise"].size),
    }
    code, out, _ = run_cli(capsys, ["registry", "show", f"models:/{name}/2"])
    assert code == 0 and out.startswith(f"{name} version 2  aliases: candidate") and "gate: FAILED" in out
    assert registry_env["refs"]["lora_moe"].uri in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["registry", "show", "NAME@nope"], "error: no registered model 'NAME'"),
        (["registry", "show", "{name}@nope"], "error: {name} has no alias 'nope' (aliases: candidate, champion)"),
        (["registry", "show", "{name}"], "is not a registered model URI: use models:/NAME@ALIAS"),
        (["registry", "promote", "{name}", "two"], "VERSION must be a version number"),
        (["registry", "promote", "{name}", "9"], "has no version '9'"),
        (["registry", "lst"], "No such command 'lst'"),
    ],
)
def test_bad_registry_requests_are_one_line(registry_env, capsys, args, message):
    code, _, err = run_cli(capsys, [a.format(name=registry_env["name"]) for a in args])
    assert code == 2 and message.format(name=registry_env["name"]) in err


def test_registry_needs_a_tracking_uri(plugins, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, err = run_cli(capsys, ["registry", "list"])
    assert code == 2 and err.strip() == (
        "error: no registry given: pass --tracking_uri URI or set MLFLOW_TRACKING_URI (http://mlflow:5000, sqlite:///mlflow.db)"
    )


def test_promote_refuses_a_failed_gate_unless_forced(registry_env, capsys):
    name, client = registry_env["name"], registry_env["client"]
    code, _, err = run_cli(capsys, ["registry", "promote", name, "2", "--alias", "champion"])
    assert code == 2 and err.strip() == f"error: {name} v2: its eval gate failed; pass --force to make it champion anyway"
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    code, out, _ = run_cli(capsys, ["registry", "promote", name, "2", "--alias", "champion", "--force"])
    assert code == 0 and out.strip() == f"{name}: champion -> v2 (was v1), by hand (forced: gate failed)"
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "2"
    assert client.get_model_version(name, "2").tags["promoted.champion"] == "by hand (forced: gate failed)"
    code, out, _ = run_cli(capsys, ["registry", "promote", name, "1"])  # champion is the default alias
    assert code == 0 and out.strip() == f"{name}: champion -> v1 (was v2), by hand"
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"


def test_generate_from_the_registry_is_generate_from_the_files(registry_env, stage2_run, capsys, tmp_path):
    """`--model models:/NAME@champion` fetches exactly the files the bundle names: the video equals
    the one generated from those files by path."""
    save = tmp_path / "from-registry.mp4"
    code, out, err = run_cli(
        capsys,
        [
            "generate",
            "--model",
            f"models:/{registry_env['name']}@champion",
            "--prompt",
            PROMPT,
            "--instrument_hint",
            "hook",
            *SMALL_VIDEO,
            "--save_path",
            save,
        ],
    )
    assert code == 0, err
    assert written_by_lora_moe(save) and out.startswith(f"wrote {save} (5 frames, 32x32)")
    models = stage2_run["models"]
    direct, _ = generate_video(
        GenerateConfig(
            dit=stage2_run["merged_low"],
            dit_high_noise=stage2_run["merged_high"],
            lora_moe_weights=stage2_run["lora_moe"],
            vae=models.vae,
            text_encoder=models.text_encoder,
            tokenizer=models.tokenizer,
            prompt=PROMPT,
            instrument_hint="hook",
            video_size=(32, 32),
            video_length=5,
            infer_steps=2,
            seed=3,
            save_path=tmp_path / "direct.mp4",
        )
    )
    assert np.array_equal(read_video(save), read_video(tmp_path / "direct.mp4")) and direct.std() > 0
    cache = tmp_path / "downloads" / "sha256"
    assert {p.name for p in cache.glob("*/*")} == {r.sha256 for r in registry_env["refs"].values()}  # each once
    code, _, err = run_cli(
        capsys, ["generate", "--model", f"models:/{registry_env['name']}/1", "--prompt", PROMPT, *SMALL_VIDEO, "--save_path", tmp_path / "again.mp4"]
    )
    assert code == 0, err  # the second time, everything comes from the cache
    assert {p.name for p in cache.glob("*/*")} == {r.sha256 for r in registry_env["refs"].values()}


def test_a_tampered_stored_artifact_writes_no_video(registry_env, capsys, tmp_path):
    ref = registry_env["refs"]["merged_high_noise"]
    stored = local_path(ref.uri)
    original = tmp_path / "original.safetensors"
    shutil.copyfile(stored, original)
    try:
        with open(stored, "r+b") as f:  # one byte of a tensor changes; the size does not
            f.seek(stored.stat().st_size - 3)
            f.write(b"\x7f")
        save = tmp_path / "never.mp4"
        code, _, err = run_cli(
            capsys, ["generate", "--model", f"models:/{registry_env['name']}@champion", "--prompt", PROMPT, *SMALL_VIDEO, "--save_path", save]
        )
    finally:
        shutil.copyfile(original, stored)
    assert code == 2
    assert err.startswith(f"error: {ref.uri} does not match its ref: sha256 ") and f"instead of {ref.sha256[:12]}..." in err
    assert len(err.strip().splitlines()) == 1 and not save.exists()
    assert not list((tmp_path / "downloads" / "sha256").glob(f"*/{ref.sha256}"))  # nothing unverified is kept


def test_a_tampered_registered_bundle_writes_no_video(registry_env, capsys, tmp_path):
    client, name = registry_env["client"], registry_env["name"]
    version = client.get_model_version(name, "2")
    registered = local_path(version.source) / "artifacts" / "bundle" / "lora_moe_stage2.safetensors"
    data = bytearray(registered.read_bytes())
    try:
        registered.write_bytes(bytes(data[:-1] + bytes([data[-1] ^ 1])))
        save = tmp_path / "never.mp4"
        code, _, err = run_cli(capsys, ["generate", "--model", f"models:/{name}/2", "--prompt", PROMPT, *SMALL_VIDEO, "--save_path", save])
    finally:
        registered.write_bytes(bytes(data))
    assert code == 2 and "lora_moe_stage2.safetensors does not match its ref" in err
    assert "(the registered copy was changed or damaged)" in err and not save.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "models:/x@champion", "--dit", "a.safetensors"], "--model supplies the DiTs, the LoRA-MoE and the components: drop --dit"),
        ([], "pass --dit (and --dit_high_noise) with an adapter, or a registered model as --model models:/NAME@ALIAS"),
        (["--model", "runs:/abc/model"], "error: --model runs:/abc/model: no resolver for runs: URI is installed (installed: models)"),
        (["--model", "models:/x"], "error: 'models:/x' is not a registered model URI"),
    ],
)
def test_generate_model_usage_errors(plugins, capsys, tmp_path, args, message):
    code, _, err = run_cli(capsys, ["generate", *args, "--prompt", PROMPT, "--save_path", tmp_path / "x.mp4"])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_pyfunc_predict_returns_the_video_paths(registry_env, tmp_path):
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{registry_env['name']}@{CHAMPION}")
    requests = [
        {
            "prompt": PROMPT,
            "instrument_hint": "suction",
            "video_size": "32x32",
            "video_length": 5,
            "infer_steps": 2,
            "seed": 1,
            "output_dir": str(tmp_path / "videos"),
            "device": "cpu",
        },
        {
            "prompt": PROMPT,
            "video_size": "32x32",
            "video_length": 5,
            "infer_steps": 2,
            "seed": 2,
            "output_dir": str(tmp_path / "videos"),
            "device": "cpu",
        },
    ]
    paths = model.predict(requests)
    assert len(paths) == 2 and len(set(paths)) == 2
    for path in paths:
        assert Path(path).parent == tmp_path / "videos" and written_by_lora_moe(path)
        assert read_video(path).shape == (5, 32, 32, 3)
    assert not np.array_equal(read_video(paths[0]), read_video(paths[1]))
    assert model.metadata.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # not a pickle
