"""The flow's typed parameters come from the trainers' configs; the flow side imports no torch."""

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from flows.params import (
    EVAL_RUNTIME_FIELDS,
    RUNTIME_FIELDS,
    TINY_EVAL,
    TINY_STAGE1,
    TINY_STAGE2,
    DataSettings,
    EvalSettings,
    Stage1Settings,
    Stage2Settings,
    forced_stages,
    resolve_settings,
)
from moe.config.eval import EvalConfig
from moe.config.train import TARGET_FLAGS, Stage1Config, Stage2Config
from moe.config.workflow import WorkflowConfig, eval_options, stage1_options


def test_no_torch_on_the_flow_side():
    """The mirror of `moe` importing no prefect/mlflow/boto3: a flow process stays light."""
    code = """
import pkgutil, sys, importlib
import flows, tasks
names = ["flows"] + [m.name for m in pkgutil.walk_packages(flows.__path__, "flows.")]
names += [m.name for m in pkgutil.walk_packages(tasks.__path__, "tasks.")]
for name in names:
    importlib.import_module(name)
print(len(names), "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) >= 20 and out[1] == "False"


def test_settings_are_the_configs_minus_runtime_fields():
    assert set(Stage1Settings.model_fields) == set(Stage1Config.model_fields) - RUNTIME_FIELDS
    assert set(Stage2Settings.model_fields) == set(Stage2Config.model_fields) - RUNTIME_FIELDS - set(TARGET_FLAGS)
    assert set(EvalSettings.model_fields) == set(EvalConfig.model_fields) - EVAL_RUNTIME_FIELDS
    assert {"seed", "samples", "bootstrap_samples", "sigmas"} <= set(EvalSettings.model_fields)
    field = Stage1Settings.model_fields["learning_rate"]
    assert field.default is None and "Default 0.0001; tiny presets 0.01" in field.description
    with pytest.raises(ValidationError, match="greater than 0"):  # the config's constraints are kept
        Stage1Settings(learning_rate=-1.0)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Stage1Settings(learning_rat=1e-3)
    with pytest.raises(ValidationError, match="Input should be 'shift', 'logit_normal' or 'uniform'"):
        Stage2Settings(timestep_sampling="cosine")


def test_preset_values_and_overrides():
    assert TINY_STAGE1 == stage1_options(WorkflowConfig(output_dir="."))  # what `lora-moe workflow run` trains with
    tiny = resolve_settings(Stage1Settings(max_train_epochs=3), True, TINY_STAGE1)
    assert tiny["max_train_epochs"] == 3 and tiny["learning_rate"] == TINY_STAGE1["learning_rate"]
    assert resolve_settings(Stage1Settings(), False, TINY_STAGE1) == {}  # real presets: the config defaults
    Stage1Config(dit="a", dataset="c", output_dir="o", **tiny)  # valid as the child will read it
    Stage2Config(dit="a", dataset="c", output_dir="o", **resolve_settings(Stage2Settings(), True, TINY_STAGE2))
    assert resolve_settings(EvalSettings(), True, TINY_EVAL) == eval_options(WorkflowConfig(output_dir="."))
    assert DataSettings().resolved(True) == {"size": "64x64", "frames": 17, "dtype": "float32", "embed_dtype": "float32"}
    assert DataSettings(frames=81).resolved(False)["frames"] == 81
    with pytest.raises(ValidationError, match="expected WIDTHxHEIGHT"):
        DataSettings(size="64")


def test_force_recomputes_from_a_stage_on():
    assert forced_stages(None) == set()
    assert forced_stages("stage2-train") == {"stage2-train", "eval", "register"}
    assert forced_stages("merge-high") == {"merge-low", "merge-high", "stage2-train", "eval", "register"}


def test_the_ui_form_schema():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import lora_moe_pipeline

    schema = json.loads(json.dumps(parameter_schema(lora_moe_pipeline.fn).model_dump()))
    assert list(schema["properties"]) == [
        "preset",
        "artifact_root",
        "models",
        "data",
        "stage1",
        "merge",
        "stage2",
        "evaluation",
        "gate",
        "tracking",
        "storage",
        "resources",
        "force",
        "only_new_data",
        "stage2_from_champion",
    ]
    gate = schema["definitions"]["PromotionGate"]["properties"]  # the eval's own gate model
    assert gate["min_routing_top1_accuracy"]["default"] == 0.8 and "primary_metric" in gate
    assert "tiny" in schema["properties"]["preset"]["enum"]
    stage1 = schema["definitions"]["Stage1Settings"]["properties"]
    assert "Default 0.0001" in stage1["learning_rate"]["description"]
    assert schema["properties"]["artifact_root"]["description"].startswith("s3://bucket/prefix or a local folder")


def test_gpus_per_stage_come_from_the_parameter_then_the_worker_environment():
    from flows.params import Resources, StageResources
    from moe.errors import MoeError

    assert Resources().resolved(True, {}).stage1.gpus == 0 and Resources().resolved(False, {}).stage2.gpus == 1
    env = {"LORA_MOE_GPUS": "4", "LORA_MOE_STAGE2_GPUS": "2"}  # job variables of a deployment
    got = Resources(eval=StageResources(gpus=1)).resolved(True, env)
    assert (got.prepare_data.gpus, got.stage1.gpus, got.stage2.gpus, got.eval.gpus, got.merge.gpus) == (4, 4, 2, 1, 0)
    with pytest.raises(MoeError, match="LORA_MOE_STAGE1_GPUS='two' must be a number of GPUs"):
        Resources().resolved(False, {"LORA_MOE_STAGE1_GPUS": "two"})


def test_the_pull_step_checks_the_installed_version(tmp_path, monkeypatch):
    import moe
    from flows.worker_steps import check_installed

    monkeypatch.setenv("LORA_MOE_WORK_DIR", str(tmp_path / "work"))
    assert check_installed(moe.__version__) == {"directory": str(tmp_path / "work")} and (tmp_path / "work").is_dir()
    with pytest.raises(RuntimeError, match=f"this worker runs wan-lora-moe {moe.__version__}, but the deployment was made for 9.9"):
        check_installed("9.9")
