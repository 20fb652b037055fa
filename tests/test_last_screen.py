"""The last lines of `python -m flows run` (flows/__main__.py `last_screen`): what was registered or
that nothing is new, the headline numbers with their intervals, the gate's checks, one report path
that does not change from run to run (a local root's `latest-eval` link), and commands that work
in a fresh shell. The end-to-end run is in tests/test_pipeline_cli.py; these cover each case."""

from __future__ import annotations

import sys

import pytest

from flows.__main__ import LATEST_EVAL, last_screen
from flows.pipeline import PipelineSummary, StageReport
from tasks.artifacts.refs import ArtifactRef
from tasks.registry.versions import RegistryEntry

METRICS = {
    "stage1_overall_improvement_over_base": 0.1704,
    "stage1_overall_improvement_over_base_ci_low": 0.1616,
    "stage1_overall_improvement_over_base_ci_high": 0.1803,
    "stage2_learned_roi_improvement_over_stage1": -0.0123,
    "routing_top1_accuracy": 0.875,
    "val_clips": 13.0,
}
GATE = {
    "passed": False,
    "primary_metric": "stage2_learned_roi_loss",
    "primary_value": 3.48,
    "higher_is_better": False,
    "checks": [
        {"name": "stage1_overall_improvement_over_base", "value": 0.1704, "threshold": 0.01, "passed": True, "description": ""},
        {"name": "stage2_learned_roi_improvement_over_stage1", "value": -0.0123, "threshold": 0.0, "passed": False, "description": ""},
    ],
    "skipped": [{"name": "hint_correct_vs_wrong_roi_margin", "reason": "no held-out clip has an ROI"}],
}


def _summary(root: str, *, cached: bool = False, skipped: str | None = None, metrics=METRICS, gate=GATE) -> PipelineSummary:
    eval_uri = f"{root}/runs/abc/eval/eval"
    state = "Cached" if cached else "Completed"
    return PipelineSummary(
        flow_run_id="abc",
        artifact_root=root,
        tracking_uri="sqlite:////x/mlflow.db",
        task="tiny-t2v",
        mlflow_run_url="http://mlflow/run",
        registry_url="http://mlflow/model",
        data_fingerprint="f" * 64,
        registered=RegistryEntry(name="m", version="3", aliases=["candidate"], champion_decision="gate failed: champion stays v2"),
        stages=[StageReport(name=n, state=state) for n in ("stage1-train", "eval", "register")],
        artifacts={} if skipped else {"eval_report": ArtifactRef(uri=eval_uri, sha256="0" * 64, size=1, kind="eval_report", layout="folder")},
        metrics={} if skipped else metrics,
        gate={} if skipped else gate,
        skipped=skipped,
        report_url="http://mlflow/run/artifacts/eval/report.md",
    )


@pytest.fixture
def local_root(tmp_path, monkeypatch):
    (tmp_path / "runs/abc/eval/eval").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return tmp_path


def test_a_new_version_leads_with_the_headline_and_the_gate(local_root):
    lines = last_screen(_summary(f"file://{local_root}"))
    assert lines[:2] == ["registered m v3, aliases: candidate", "  gate failed: champion stays v2"]
    assert lines[2].startswith("headline (13 held-out clips; tiny models:")
    # An improvement of 0.1704 is a loss change of -17.0%; its interval turns round with it.
    assert "  stage 1 vs base, held-out loss                     -17.0% (95% CI -18.0% to -16.2%)" in lines
    assert "  stage 2 vs stage 1, loss in the instrument region  +1.2%" in lines
    assert "  router picks the clip's instrument (top-1)         88%" in lines
    assert not any("FVD" in line for line in lines)  # not measured: not shown
    assert "  promotion gate FAILED: 1/2 checks" in lines
    assert "    FAIL  stage2_learned_roi_improvement_over_stage1 -0.0123 >= 0" in lines
    assert "    skip  hint_correct_vs_wrong_roi_margin: no held-out clip has an ROI" in lines
    # The report's path is the same after every run: a link to the newest run's eval folder.
    link = local_root / LATEST_EVAL
    assert f"report: {LATEST_EVAL}/report.md  (samples: {LATEST_EVAL}/samples)" in lines
    assert link.is_symlink() and link.resolve() == (local_root / "runs/abc/eval/eval").resolve()
    assert "  in MLflow: http://mlflow/run/artifacts/eval/report.md" in lines


def test_commands_work_in_a_fresh_shell(local_root):
    lines = last_screen(_summary(f"file://{local_root}"), venv=local_root / ".venv")
    start = lines.index("look at it in a new shell:")
    commands = [line.strip() for line in lines[start + 1 :]]
    if sys.prefix != sys.base_prefix:
        assert commands.pop(0) == "source .venv/bin/activate"
    assert commands[0] == "export MLFLOW_TRACKING_URI=sqlite:////x/mlflow.db"
    assert commands[1] == f"PREFECT_HOME={local_root / 'prefect'} prefect server start"  # no Makefile here: no `make ui`
    assert commands[2] == "mlflow ui --backend-store-uri sqlite:////x/mlflow.db"
    assert commands[3].startswith("lora-moe registry list")
    # v3 failed the gate: it is no champion, so the command names the version itself.
    assert commands[4] == "lora-moe generate --model models:/m/3 --prompt '...' --save_path sample.mp4"


def test_make_ui_only_where_it_opens_this_runs_stores(local_root, monkeypatch):
    (local_root / "Makefile").write_text("ui:\n")
    commands = last_screen(_summary(f"file://{local_root}"))
    assert "  make ui OUT=.    # the Prefect and MLflow UIs on this run's stores (4200, 5000 when free)" in commands
    monkeypatch.setenv("PREFECT_HOME", str(local_root / "elsewhere"))
    commands = last_screen(_summary(f"file://{local_root}"))
    assert f"  PREFECT_HOME={local_root / 'elsewhere'} prefect server start" in commands
    assert "  mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in commands


def test_the_champion_is_named_by_its_alias(local_root):
    summary = _summary(f"file://{local_root}")
    summary.registered.aliases.append("champion")
    assert "  lora-moe generate --model models:/m@champion --prompt '...' --save_path sample.mp4" in last_screen(summary)


def test_a_cached_rerun_says_nothing_is_new(local_root):
    lines = last_screen(_summary(f"file://{local_root}", cached=True))
    assert lines[0] == "nothing new: every stage was cached; m v3 is still candidate"
    assert "registered" not in lines[0] and "gate failed" not in "\n".join(lines[:2])


def test_a_skipped_run_names_the_champion_and_no_numbers(local_root):
    lines = last_screen(_summary(f"file://{local_root}", skipped="no new clips since version 3"))
    assert lines[0] == "nothing trained: no new clips since version 3; m v3 is still champion"
    assert not any(line.startswith(("headline", "report:")) for line in lines)
    assert not (local_root / LATEST_EVAL).exists()


def test_an_s3_root_prints_the_reports_uri_and_links_nothing(local_root):
    lines = last_screen(_summary("s3://bucket/prefix"))
    assert "report: s3://bucket/prefix/runs/abc/eval/eval/report.md" in lines
    assert not (local_root / LATEST_EVAL).exists()


def test_a_second_run_moves_the_link_atomically(local_root):
    last_screen(_summary(f"file://{local_root}"))
    (local_root / "runs/def/eval/eval").mkdir(parents=True)
    second = _summary(f"file://{local_root}")
    second.artifacts["eval_report"] = second.artifacts["eval_report"].model_copy(update={"uri": f"file://{local_root}/runs/def/eval/eval"})
    last_screen(second)
    assert (local_root / LATEST_EVAL).resolve() == (local_root / "runs/def/eval/eval").resolve()
    assert [p.name for p in local_root.iterdir() if p.name.startswith(".")] == []  # no temporary link left


def test_generated_clip_numbers_are_shown_when_measured(local_root):
    metrics = METRICS | {
        "stage2_hint_instrument_accuracy": 0.75,
        "stage1_instrument_accuracy": 0.25,
        "classifier_round_trip_accuracy": 0.92,
        "stage2_learned_fvd": 812.34,
        "stage2_learned_fvd_ci_low": 700.0,
        "stage2_learned_fvd_ci_high": 901.5,
    }
    lines = last_screen(_summary(f"file://{local_root}", metrics=metrics))
    assert any(line.startswith("  generated clips show the hinted instrument (stage 2)") and line.endswith(" 75%") for line in lines)
    assert any(line.startswith("  ... the same prompts through stage 1") and line.endswith(" 25%") for line in lines)
    assert any(line.startswith("  ... at best: real clips through the VAE") and line.endswith(" 92%") for line in lines)
    assert any(line.endswith(" 812.3 (95% CI 700 to 901.5)") for line in lines)
