"""Form values that the API accepts mean what they say (issue 22, item 5): every number of the
flow's form is finite and bounded, a null is refused instead of read as "use the preset's value"
(a bare NaN or Infinity in a JSON number arrives as null), and a parameter the flow does not take
ends the run with one line in its state message, not a traceback in a crashed process's log."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from pydantic import ValidationError

from flows.params import DataSettings, MergeSettings, PromotionGate, Stage1Settings, Stage2Settings, StageResources


def _numbers(schema: dict):
    """(definition.property, its number schema) for every integer or number in the form."""
    for name, definition in schema["definitions"].items():
        for prop_name, prop in definition.get("properties", {}).items():
            for option in prop.get("anyOf", [prop]):
                item = option.get("items", option) if option.get("type") == "array" else option
                if item.get("type") in ("integer", "number"):
                    yield f"{name}.{prop_name}", item, prop


def test_every_number_of_the_form_is_bounded_and_never_null():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import lora_moe_pipeline

    schema = json.loads(json.dumps(parameter_schema(lora_moe_pipeline.fn).model_dump()))
    numbers = list(_numbers(schema))
    assert len(numbers) > 80
    unbounded = [
        name for name, item, _ in numbers if not ({"maximum", "exclusiveMaximum"} & item.keys() and {"minimum", "exclusiveMinimum"} & item.keys())
    ]
    nullable = [name for name, _, prop in numbers if any(o.get("type") == "null" for o in prop.get("anyOf", []))]
    assert unbounded == [] and nullable == []
    assert schema["definitions"]["Stage1Settings"]["properties"]["max_train_epochs"]["maximum"] == 10_000
    assert schema["properties"]["stage1"]["default"] == {}  # the form sends nothing for "the preset's value"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Stage1Settings(max_train_epochs=2**63), "less than or equal to 10000"),
        (lambda: Stage1Settings(learning_rate=None), "learning_rate: null is not a value; leave the field out"),
        (lambda: Stage1Settings(seed=2**40), "less than or equal to 4294967295"),
        (lambda: Stage2Settings(alpha_expert=math.inf), "finite number"),
        (lambda: MergeSettings(lora_multiplier=math.nan), "finite number"),
        (lambda: StageResources(timeout_minutes=math.inf), "finite number"),
        (lambda: StageResources(gpus=None), "gpus: null is not a value"),
        (lambda: PromotionGate(min_hint_margin=math.nan), "finite number"),
        (lambda: DataSettings(frames=None), "frames: null is not a value"),
        (lambda: DataSettings(size="100000x100000"), "each side must be a whole number >= 2 and <= 4096"),
        (lambda: DataSettings(synthetic_seed=-1), "greater than or equal to 0"),
    ],
)
def test_numbers_that_make_no_sense_and_nulls_are_refused(make, message):
    with pytest.raises(ValidationError, match=message):
        make()


def test_left_out_fields_still_take_the_preset(tmp_path):
    from flows.params import TINY_STAGE1, resolve_settings

    assert Stage1Settings().model_dump() == {} and StageResources().model_dump()["timeout_minutes"] == 24 * 60
    tiny = resolve_settings(Stage1Settings.model_validate({"max_train_epochs": 3}), True, TINY_STAGE1)
    assert tiny["max_train_epochs"] == 3 and tiny["learning_rate"] == TINY_STAGE1["learning_rate"]


def test_a_nan_sent_to_the_api_fails_validation_instead_of_training_with_the_preset(prefect_api):
    from prefect import get_client
    from prefect.exceptions import ParameterTypeError

    from flows.pipeline import lora_moe_pipeline

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(lora_moe_pipeline, parameters={"stage1": {"learning_rate": math.nan}})
        stored = client.read_flow_run(run.id).parameters
    assert stored["stage1"] == {"learning_rate": None}  # what the API made of the NaN
    with pytest.raises(ParameterTypeError, match="learning_rate: null is not a value"):
        lora_moe_pipeline.validate_parameters(stored)


def test_an_unknown_parameter_fails_the_run_in_one_line(prefect_api):
    from prefect import get_client
    from prefect.exceptions import SignatureMismatchError
    from prefect.flow_engine import run_flow
    from prefect.states import Crashed

    from flows.pipeline import lora_moe_pipeline

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(lora_moe_pipeline, parameters={"preset": "tiny", "stage_1": {"max_train_epochs": 2}})
        with pytest.raises(SignatureMismatchError):  # Prefect binds them before the flow starts: the process dies
            run_flow(lora_moe_pipeline, flow_run=client.read_flow_run(run.id))
        crashed = Crashed(message="Flow run infrastructure exited with non-zero status code 1.")
        client.set_flow_run_state(run.id, crashed, force=True)  # what the worker then records
        for hook in lora_moe_pipeline.on_crashed_hooks:  # and then it runs the flow's on_crashed hooks
            hook(lora_moe_pipeline, client.read_flow_run(run.id), crashed)
        state = client.read_flow_run(run.id).state
    assert state.is_failed() and "\n" not in state.message
    assert state.message.startswith("Invalid parameters: unknown parameter 'stage_1' (did you mean 'stage1'?); ")


def test_the_command_line_names_an_unknown_parameter(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "flows", "run", "--set", "stage_1.max_train_epochs=2", "--artifact_root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: invalid parameters: unknown parameter 'stage_1' (did you mean 'stage1'?)")
    assert done.stderr.count("\n") == 1 and not (tmp_path / "runs").exists()
