"""What a person sees of a pipeline run, on the session's tiny S3 run (`s3_pipeline`): the Prefect
flow run's name, tags and artifacts (resolved settings, the summary leading with the gate, the
eval report with its plots); the MLflow experiment's view, the parent run's metrics, commit,
datasets and report; the lineage as logged models; the registered version's run, tags, model
card and artifacts.json. Also the model card's pieces on their own (data licence, weak experts)."""

import json
import re
from pathlib import Path

import pytest

from tasks.registry.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, code_version, mlflow_client

ROOT = Path(__file__).resolve().parent.parent


def _prefect():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _artifacts(flow_run_id: str) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _prefect() as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found if a.key}


def _parent(s3_pipeline):
    client = mlflow_client(s3_pipeline["tracking_uri"])
    experiment = client.get_experiment_by_name(s3_pipeline["params"]["tracking"]["experiment"])
    flow_run_id = s3_pipeline["summary"].flow_run_id
    [parent] = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    nested = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    return client, experiment, parent, nested


def test_the_flow_run_says_what_it_is(s3_pipeline):
    summary = s3_pipeline["summary"]
    with _prefect() as client:
        run = client.read_flow_run(summary.flow_run_id)
    assert re.fullmatch(r"tiny-t2v-train-[a-z]+-[a-z]+", run.name)
    entry = summary.registered
    expected = {
        "task:tiny-t2v",
        "preset:tiny",
        f"data:{summary.data_fingerprint[:12]}",
        f"registered:v{entry.version}",
        f"gate:{'passed' if summary.gate['passed'] else 'failed'}",
    }
    assert expected <= set(run.tags)
    assert ("champion" in run.tags) == entry.champion_moved


def test_the_resolved_settings_are_visible(s3_pipeline):
    summary = s3_pipeline["summary"]
    settings = _artifacts(summary.flow_run_id)["lora-moe-settings"].data
    stage1 = settings.split("## stage1", 1)[1].split("## merge", 1)[0]
    assert "| max_train_epochs | `1` | **set** |" in stage1 and "| learning_rate | `0.01` | preset |" in stage1
    assert "| lr_scheduler | `cosine` | default |" in stage1
    stage2 = settings.split("## stage2", 1)[1].split("## eval", 1)[0]
    assert "| network_dim | `4` | stage 1 |" in stage2
    assert "| bootstrap_samples | `200` | **set** |" in settings and "| min_routing_top1_accuracy | `0.8` | default |" in settings
    _, _, parent, _ = _parent(s3_pipeline)
    params = parent.data.params  # the same values as MLflow params of the parent run
    assert float(params["stage1.learning_rate"]) == 0.01 and params["stage1.max_train_epochs"] == "1"
    assert params["stage1.lr_scheduler"] == "cosine" and params["eval.bootstrap_samples"] == "200"
    assert params["gate.min_routing_top1_accuracy"] == "0.8" and params["data.frames"] == "9"


def test_at_a_glance_shows_the_headline_numbers_and_the_contact_sheet():
    from flows.surfaces import glance_lines

    metrics = {"stage2_learned_fvd": 5225.0, "stage2_learned_fvd_ci_low": 3184.0, "stage2_learned_fvd_ci_high": 7001.0}
    metrics |= {"stage2_hint_instrument_accuracy": 0.75, "classifier_round_trip_accuracy": 0.93, "other_metric": 1.0}
    lines = glance_lines(metrics, "http://mlflow/get-artifact?path=eval%2Fsamples%2Fcontact_sheet.png&run_uuid=r")
    assert lines[0] == "## At a glance"
    assert "| FVD of stage 2's generated clips (lower is better) | 5225 (95% CI 3184 to 7001) |" in lines
    assert "| generated clips show the hinted instrument (stage 2) | 75% |" in lines and not any("other_metric" in x for x in lines)
    assert "![contact sheet](http://mlflow/get-artifact?path=eval%2Fsamples%2Fcontact_sheet.png&run_uuid=r)" in lines
    assert glance_lines({"other_metric": 1.0}, None) == []


def test_the_summary_leads_with_the_gate_and_the_report_is_an_artifact(s3_pipeline):
    summary = s3_pipeline["summary"]
    artifacts = _artifacts(summary.flow_run_id)
    text = artifacts["lora-moe-pipeline-summary"].data
    first_section = text.split("\n## ", 2)[1]
    assert first_section.startswith(f"Promotion gate: {'PASSED' if summary.gate['passed'] else 'FAILED'}")
    for check in summary.gate["checks"]:
        row = next(line for line in first_section.splitlines() if f"| `{check['name']}`" in line)
        cells = [cell.strip() for cell in row.strip("|").split("|")]  # result, value, threshold first
        assert cells[0] == ("pass" if check["passed"] else "**FAIL**") and cells[2] == f"{check['threshold']:.4g}"
    assert summary.report_url and f"[Eval report]({summary.report_url})" in first_section
    # Then the headline numbers (this run generates no clips: no contact sheet, no FVD), then what was registered.
    glance = text.split("\n## ", 3)[2]
    assert glance.startswith("At a glance") and text.split("\n## ", 4)[3].startswith("Registered")
    improvement = summary.metrics["stage1_overall_improvement_over_base"]
    assert f"| stage 1 vs base, held-out loss | {-improvement:+.1%} (95% CI " in glance
    assert f"| router picks the clip's instrument (top-1) | {summary.metrics['routing_top1_accuracy']:.0%} |" in glance
    assert "FVD" not in glance and "![contact sheet]" not in glance
    assert "/artifacts/eval/report.md?workflowType=machine_learning" in summary.report_url  # MLflow's training view
    report = artifacts["eval-report"].data
    assert report.startswith("# Evaluation: tiny-t2v")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert all("/get-artifact?path=eval%2F" in url and "&run_uuid=" in url for url in images)  # the parent run's copy
    assert any("path=eval%2Fplots%2F" in url and url.split("&")[0].endswith(".png") for url in images)
    assert "](plots/" not in report and "](eval_report.json)" not in report  # no link the UI cannot follow


def test_mlflow_experiment_and_parent_run(s3_pipeline, s3_endpoint):
    summary = s3_pipeline["summary"]
    client, experiment, parent, nested = _parent(s3_pipeline)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND  # model training, not GenAI
    assert summary.mlflow_run_url.endswith("?workflowType=machine_learning")  # the UI's view switch, for links
    tags = parent.data.tags
    assert tags["lora_moe.version"] == code_version()["lora_moe.version"]
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
    assert not [k for k in tags if k.startswith("artifact.")]  # the refs are artifacts.json
    primary = summary.gate["primary_metric"]
    assert parent.data.metrics[primary] == pytest.approx(summary.metrics[primary])
    datasets = {d.dataset.name: d for d in parent.inputs.dataset_inputs}
    assert datasets["clips"].dataset.digest == summary.data_fingerprint[:16]
    assert (
        json.loads(datasets["clips"].dataset.source)["uri"]
        == summary.artifacts["latent_cache"].uri.rsplit("/prepare-data/", 1)[0] + "/synth-data/data/manifest.jsonl"
    )
    assert datasets["latent_cache"].dataset.digest == summary.artifacts["latent_cache"].sha256[:16]
    assert {t.key: t.value for t in datasets["clips"].tags}["mlflow.data.context"] == "training"
    for stage in ("stage1-train", "stage2-train", "eval"):
        assert {d.dataset.name for d in nested[stage].inputs.dataset_inputs} == {"clips", "latent_cache"}, stage
    files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"eval", "artifacts.json"} <= files
    report = {f.path for f in client.list_artifacts(parent.info.run_id, "eval")}
    assert {"eval/report.md", "eval/eval_report.json", "eval/plots"} <= report
    refs = json.loads(Path(client.download_artifacts(parent.info.run_id, "artifacts.json", str(s3_pipeline["work"]))).read_text())
    assert refs["lora_moe"]["sha256"] == summary.artifacts["lora_moe"].sha256


def test_lineage_from_base_dits_to_the_lora_moe(s3_pipeline):
    summary = s3_pipeline["summary"]
    client, _, _, nested = _parent(s3_pipeline)

    def model_name(model_id):
        return client.get_logged_model(model_id).name

    def edges(stage):
        run = client.get_run(nested[stage].info.run_id)
        return ({model_name(m.model_id) for m in run.inputs.model_inputs}, {model_name(m.model_id) for m in run.outputs.model_outputs})

    assert edges("stage1-train") == ({"base-dit-low-noise", "base-dit-high-noise"}, {"stage1-lora"})
    assert edges("merge-low") == ({"base-dit-low-noise", "stage1-lora"}, {"merged-dit-low-noise"})
    assert edges("merge-high") == ({"base-dit-high-noise", "stage1-lora"}, {"merged-dit-high-noise"})
    assert edges("stage2-train") == ({"merged-dit-low-noise", "merged-dit-high-noise"}, {"lora-moe-bundle"})
    assert edges("eval")[0] == {"lora-moe-bundle"}
    run = client.get_run(nested["merge-low"].info.run_id)
    [merged] = [client.get_logged_model(m.model_id) for m in run.outputs.model_outputs]
    assert merged.tags["lora_moe.sha256"] == summary.artifacts["merged_low_noise"].sha256
    assert merged.tags["lora_moe.uri"] == summary.artifacts["merged_low_noise"].uri  # by reference: no files
    bundle = client.get_logged_model(summary.registered.model_id)
    if "register" not in summary.cached:
        assert {m.key for m in bundle.metrics} >= {summary.gate["primary_metric"]}  # the model's own metrics
        assert {m.dataset_name for m in bundle.metrics} == {"clips"}


def test_the_registered_version_has_a_run_a_dozen_tags_and_a_model_card(s3_pipeline, s3_endpoint, tmp_path, monkeypatch):
    import mlflow

    summary = s3_pipeline["summary"]
    client, _, parent, _ = _parent(s3_pipeline)
    entry = summary.registered
    version = client.get_model_version(entry.name, entry.version)
    assert version.run_id == parent.info.run_id and client.get_run(version.run_id).data.metrics
    tags = version.tags
    assert not [k for k in tags if k.startswith("artifact.")] and len(tags) <= 16, sorted(tags)
    assert {
        "task",
        "data_fingerprint",
        "gate.passed",
        "package_version",
        "lora_moe.sha256",
        "prefect.flow_run_id",
        "champion_decision",
        "logged_model_id",
        f"metric.{summary.gate['primary_metric']}",
    } <= set(tags)
    for check in summary.gate["checks"]:
        assert f"metric.{check['name']}" in tags
    description = version.description
    assert description.startswith(f"**{entry.champion_decision}**") and "Not for clinical use" in description
    assert "Synthetic clips" in description and "no licence restriction" in description
    assert "| result | value | threshold | check |" in description and len(description) <= 5000
    monkeypatch.setenv("MLFLOW_TRACKING_URI", s3_pipeline["tracking_uri"])
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{entry.name}/{entry.version}", dst_path=str(tmp_path)))
    card = (local / "MODEL_CARD.md").read_text()
    assert card.startswith(f"# {entry.name} v{entry.version}\n")
    for section in ("## Data", "## Intended use", "## Evaluation", "## Known weak spots"):
        assert section in card
    assert summary.data_fingerprint[:16] in card and "research" in card.lower()
    weak = tags.get("weak_experts", "")
    for expert in filter(None, weak.split(",")):
        assert f"expert `{expert}` may not have specialised" in card


def test_data_licence_and_weak_experts():
    from tasks.artifacts.refs import ArtifactRef, DatasetRef
    from tasks.registry.card import DataCard, weak_experts

    def ref(uri, producer="input"):
        return ArtifactRef(uri=uri, sha256="ab" * 32, size=1, kind="clip", producer=producer)

    cholec = DatasetRef(
        manifest=ref("s3://d/c80/manifest.jsonl"),
        files={f"clips/video0{i}_000100.mp4": ref(f"s3://d/c80/clips/video0{i}_000100.mp4") for i in (1, 2)},
    )
    card = DataCard.of(cholec)
    assert card.source == "cholec80" and "CC BY-NC-SA 4.0" in card.licence and "non-commercial" in card.licence
    assert card.clips == 2
    other = DatasetRef(manifest=ref("s3://d/x/manifest.jsonl"), files={"a.mp4": ref("s3://d/x/a.mp4")})
    assert DataCard.of(other).source == "manifest" and "check it" in DataCard.of(other).licence
    synthetic = DatasetRef(manifest=ref("file:///r/manifest.jsonl", "synth-data@run"), files={})
    assert DataCard.of(synthetic).source == "synthetic"

    def estimate(mean, low=None, high=None):
        return {"mean": mean, "low": low, "high": high, "clips": 3}

    report = {
        "classes": {"hook": 2, "suction": 1},
        "routing": {"experts": ["scissors", "hook", "suction", "other"], "top1_share": {"scissors": 0.3, "hook": 0.6, "suction": 0.0, "other": 0.1}},
        "knockout": {
            "roi_delta": {
                "scissors": {"hook": estimate(0.002, 0.001, 0.003), "suction": estimate(-0.001, -0.002, 0.0)},  # ~0 everywhere
                "hook": {"hook": estimate(0.2, 0.1, 0.3), "suction": estimate(0.001, 0.0, 0.002)},  # specialised
                "suction": {"hook": estimate(0.05, 0.01, 0.09), "suction": estimate(0.01, -0.01, 0.03)},  # own interval reaches 0
                "other": {"hook": estimate(0.04, 0.02, 0.06), "suction": estimate(None)},  # no clip of its own: moves hook clips
            }
        },
    }
    weak = weak_experts(report)
    assert set(weak) == {"scissors", "suction"}
    assert "largest change 0.20%" in weak["scissors"] and "includes no change" in weak["suction"]
    assert "almost never picks it first" in weak["suction"]  # 1 held-out clip shows it, 0% top-1
    report["knockout"]["roi_delta"]["hook"]["hook"] = estimate(-0.02, -0.03, -0.01)  # switching it off helps its own class
    assert weak_experts(report)["hook"].endswith("hook clips (-2.0% [-3.0%, -1.0%]): the expert makes its own class worse")


def test_registry_show_reads_the_refs_from_artifacts_json(s3_pipeline, s3_endpoint, plugins, capsys, monkeypatch):
    from conftest import run_cli

    summary = s3_pipeline["summary"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", s3_pipeline["tracking_uri"])
    code, out, _ = run_cli(capsys, ["registry", "show", f"{summary.registered.name}/{summary.registered.version}", "--json"])
    shown = json.loads(out)
    assert code == 0 and shown["data_fingerprint"] == summary.data_fingerprint
    for name, ref in summary.artifacts.items():
        assert shown["artifacts"][name] == {"uri": ref.uri, "sha256": ref.sha256, "size": str(ref.size)}, name


def test_the_card_lists_the_generated_clip_numbers_when_measured():
    from tasks.artifacts.refs import ArtifactRef, DatasetRef
    from tasks.registry.card import DataCard, ModelCard

    data = DataCard.of(
        DatasetRef(manifest=ArtifactRef(uri="file:///r/manifest.jsonl", sha256="ab" * 32, size=1, kind="clip", producer="synth-data@run"), files={})
    )
    gate = {"passed": True, "primary_metric": "stage2_learned_roi_loss", "checks": [], "skipped": []}
    metrics = {"stage2_learned_roi_loss": 2.5, "stage2_learned_fvd": 812.25, "stage2_hint_instrument_accuracy": 0.75}
    card = ModelCard(task="tiny-t2v", name="m", version="1", decision="d", data=data, metrics=metrics, gate=gate)
    text = card.markdown()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows == [
        "| `stage2_learned_roi_loss` | 2.5 |",
        "| `stage2_learned_fvd` | 812.2 |",
        "| `stage2_hint_instrument_accuracy` | 0.75 |",
    ]  # unmeasured ones (stage1_fvd ...) left out
    assert "pre-trained on synthetic clips" in text and "never real surgery" in text
