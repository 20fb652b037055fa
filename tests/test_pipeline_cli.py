"""`python -m flows run`: the embedded path of `make demo` (Prefect's local ephemeral API, a
local artifact folder, MLflow on SQLite under it), here with inputs given by path so that
`resolve-inputs` runs too; and bad parameters as one `error:` line with exit code 2."""

import os
import subprocess
import sys

import pytest

SMALL = ["--set", "data.frames=9", "--set", "data.size=32x32", "--set", "stage1.max_train_epochs=1",
         "--set", "stage2.max_train_epochs=1", "--set", "evaluation.samples=0", "--set", "evaluation.bootstrap_samples=200"]


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
    inputs = ["--set", f"models.dit={models.low_noise}", "--set", f"models.dit_high_noise={models.high_noise}",
              "--set", f"models.vae={models.vae}", "--set", f"models.text_encoder={models.text_encoder}",
              "--set", f"models.tokenizer={models.tokenizer}", "--set", f"data.manifest={tiny_workspace['manifest']}"]
    root = tmp_path / "demo"
    done = _flows(["run", "--artifact_root", str(root), *inputs, *SMALL], cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("registered wan22-surgical-lora-moe version 1, aliases: candidate")
    assert f"PREFECT_HOME={cli_env['PREFECT_HOME']} prefect server start" in done.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}" in done.stdout
    assert (root / "mlflow.db").is_file() and (root / "prefect-results").is_dir()
    assert os.path.isfile(os.path.join(cli_env["PREFECT_HOME"], "prefect.db"))  # what `prefect server start` shows
    run_dirs = list((root / "runs").iterdir())
    assert len(run_dirs) == 1
    stored = {p.name for p in run_dirs[0].iterdir()}
    assert stored == {"prepare-data", "stage1-train", "merge-low", "merge-high", "stage2-train", "eval"}  # inputs by path: not copied
    assert (run_dirs[0] / "merge-low" / "merged_low_noise.safetensors").is_file()

