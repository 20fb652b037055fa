"""`python -m flows run`: the embedded path of `make demo` (Prefect's local ephemeral API, a
local artifact folder, MLflow on SQLite under it), here with inputs given by path so that
`resolve-inputs` runs too; and bad parameters as one `error:` line with exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = [
    "--set",
    "data.frames=9",
    "--set",
    "data.size=32x32",
    "--set",
    "stage1.max_train_epochs=1",
    "--set",
    "stage2.max_train_epochs=1",
    "--set",
    "evaluation.samples=0",
    "--set",
    "evaluation.metric_clips=0",
    "--set",
    "evaluation.bootstrap_samples=200",
]


def _flows(args, env, timeout=900):
    return subprocess.run([sys.executable, "-m", "flows", *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("cli") / "outputs" / "prefect"  # its parents do not exist yet, as in make demo
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_ENDPOINT"))}
    return env | {"PREFECT_HOME": str(home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--set", "stage1.learning_rate=-1"], "error: invalid parameters: .*stage1.learning_rate: Input should be greater than 0"),
        (["run", "--preset", "t2v-A14B"], "error: preset t2v-A14B needs the base model URIs"),
        (["run", "--set", "models.dit=/x.safetensors"], "error: models: dit_high_noise, text_encoder, tokenizer, vae not given"),
        (["run", "--force", "stage3"], "error: invalid parameters: .*force: Input should be 'tiny-models'"),
        (["run", "--set", "stage1"], "--set needs NAME=VALUE"),
        (["run", "--bogus"], "No such option: --bogus"),
    ],
)
def test_bad_parameters_are_one_line_and_exit_2(cli_env, tmp_path, args, message):
    import re

    done = _flows([*args, "--artifact_root", str(tmp_path)], cli_env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert re.search(message, done.stderr) and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


def test_local_run_from_the_command_line(cli_env, tiny_workspace, tmp_path):
    models = tiny_workspace["models"]
    inputs = [
        "--set",
        f"models.dit={models.low_noise}",
        "--set",
        f"models.dit_high_noise={models.high_noise}",
        "--set",
        f"models.vae={models.vae}",
        "--set",
        f"models.text_encoder={models.text_encoder}",
        "--set",
        f"models.tokenizer={models.tokenizer}",
        "--set",
        f"data.manifest={tiny_workspace['manifest']}",
    ]
    root = tmp_path / "demo"
    done = _flows(["run", "--artifact_root", str(root), *inputs, *SMALL], cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    # One epoch per stage: the gate fails, so the version stays a candidate.
    assert lines[0] == "registered wan22-surgical-lora-moe v1, aliases: candidate", done.stdout
    # The headline: the eval report's own numbers, then the gate's checks.
    report_dir = root / "latest-eval"
    assert report_dir.is_symlink() and (report_dir / "report.md").is_file()
    report = json.loads((report_dir / "eval_report.json").read_text())
    s1 = report["metrics"]["stage1_overall_improvement_over_base"]
    assert any(line.startswith("  stage 1 vs base, held-out loss") and f"  {-s1:+.1%} (95% CI " in line for line in lines), lines
    passed = sum(c["passed"] for c in report["gate"]["checks"])
    assert f"  promotion gate {'passed' if report['gate']['passed'] else 'FAILED'}: {passed}/{len(report['gate']['checks'])} checks" in lines
    assert f"report: {report_dir / 'report.md'}  (samples: {report_dir / 'samples'})" in lines
    # Commands that work in a fresh shell: the venv, MLflow's store, the UIs, the registry.
    activate = Path(sys.prefix, "bin", "activate")  # shown relative to the current folder when below it
    shown = activate.relative_to(Path.cwd()) if activate.is_relative_to(Path.cwd()) else activate
    assert f"  source {shown}" in lines or sys.prefix == sys.base_prefix
    assert f"  export MLFLOW_TRACKING_URI=sqlite:///{root / 'mlflow.db'}" in lines
    assert f"PREFECT_HOME={cli_env['PREFECT_HOME']} prefect server start" in done.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}" in done.stdout
    assert "  lora-moe generate --model models:/wan22-surgical-lora-moe/1 --prompt '...' --save_path sample.mp4" in lines
    assert (root / "mlflow.db").is_file() and (root / "prefect-results").is_dir()
    assert os.path.isfile(os.path.join(cli_env["PREFECT_HOME"], "prefect.db"))  # what `prefect server start` shows
    run_dirs = list((root / "runs").iterdir())
    assert len(run_dirs) == 1
    stored = {p.name for p in run_dirs[0].iterdir()}
    assert stored == {"prepare-data", "stage1-train", "merge-low", "merge-high", "stage2-train", "eval"}  # inputs by path: not copied
    assert (run_dirs[0] / "merge-low" / "merged_low_noise.safetensors").is_file()
    assert report_dir.resolve() == (run_dirs[0] / "eval" / "eval").resolve()
    # Run again: every stage is cached, and the first line says that nothing is new.
    again = _flows(["run", "--artifact_root", str(root), *inputs, *SMALL], cli_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[0] == "nothing new: every stage was cached; wan22-surgical-lora-moe v1 is still candidate"
    assert len(list((root / "runs").iterdir())) == 1 and report_dir.resolve() == (run_dirs[0] / "eval" / "eval").resolve()
