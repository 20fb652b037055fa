"""The MLflow model registry entry of a pipeline run (through `MlflowClient`, with aliases).

Each run registers one version of `wan22-surgical-lora-moe` (configurable) whose content is a
small bundle: the LoRA-MoE file plus `bundle.json`, the refs (URI + sha256) of everything it
needs (merged DiTs, vanilla LoRA, base components, eval report), the task, the data
fingerprint and the eval verdict. The merged DiTs are referenced, never copied.

The bundle is saved as an MLflow pyfunc model from code (`tasks/registry/video_model_code.py`, not a
pickle): `mlflow.pyfunc.load_model("models:/NAME@champion").predict([{"prompt": ...}])` fetches
the refs and returns the paths of generated videos. It is logged as an MLflow 3 logged model
(`create_logged_model` + `log_model_artifacts`) that the model version points at:

    MLmodel, python_model.py (the code), requirements.txt ...
    artifacts/bundle/bundle.json, artifacts/bundle/lora_moe_stage2.safetensors

    MODEL_CARD.md, artifacts.json (every ref: URI, sha256, size)

The version points at the pipeline's parent MLflow run (its metrics, datasets, eval report) and
carries about a dozen tags a person filters by (`version_tags`: task, data fingerprint, gate
verdict, headline metrics, commit ...); the refs are in `artifacts.json` and `bundle.json`, not in
tags. Its description is the model card's short form (`tasks.registry.card`).

Aliases: `candidate` always moves to the new version; `champion` moves to it only when the
eval gate passed and, when a champion exists, the candidate is not worse on the gate's primary
metric (read from the champion's `metric.<name>` tag). `promote` moves an alias by hand. When
the pipeline moves `champion` it emits the Prefect event `lora-moe.champion.promoted`
(`promotion_event`), which the `export-champion` deployment is triggered by.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from moe.config.file_names import LORA_MOE_FILE
from moe.errors import MoeError
from tasks.artifacts.refs import ArtifactRef

CANDIDATE, CHAMPION = "candidate", "champion"
PROMOTED_EVENT = "lora-moe.champion.promoted"
MODEL_CARD_FILE = "MODEL_CARD.md"
ARTIFACTS_FILE = "artifacts.json"
LORA_MOE_SHA256_TAG = "lora_moe.sha256"  # checked by `generate --model` against the bundle (older versions: artifact.lora_moe.sha256)
BUNDLE_FORMAT = "lora-moe-bundle/1"
BUNDLE_FILE = "bundle.json"
BUNDLE_ARTIFACT = "bundle"  # the pyfunc artifact (a folder) holding bundle.json and the LoRA-MoE file
BUNDLE_PATH = f"artifacts/{BUNDLE_ARTIFACT}"  # where that folder lies in the logged model
MODEL_CODE = Path(__file__).with_name("video_model_code.py")
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


class RegistryEntry(BaseModel):
    name: str
    version: str
    aliases: list[str]
    champion_decision: str  # why champion moved or stayed
    model_id: str | None = None
    champion_moved: bool = False  # this registration moved `champion` to this version
    previous_champion: str | None = None  # the version that held `champion` before


def version_tags(
    *,
    task: str,
    data_fingerprint: str,
    gate: dict[str, Any],
    metrics: dict[str, float],
    lora_moe_sha256: str,
    flow_run_id: str,
    code: dict[str, str],
    based_on: str | None = None,
    weak: list[str] = (),
) -> dict[str, str]:
    """The tags of a registered version: what a person filters versions by (task, data, gate
    verdict, headline metrics, code, weak experts) and what the readers need (`check-new-data`:
    the data fingerprint; `champion_decision`: `metric.<primary>`; `generate --model`: the LoRA-MoE
    sha256). Every ref is in the version's artifacts.json instead."""
    from tasks.registry.card import headline_metric_names

    tags = {
        "task": task,
        "data_fingerprint": data_fingerprint,
        "gate.passed": str(bool(gate.get("passed"))).lower(),
        "package_version": code.get("lora_moe.version", ""),
        LORA_MOE_SHA256_TAG: lora_moe_sha256,
        "prefect.flow_run_id": flow_run_id,
    }
    if code.get("mlflow.source.git.commit"):
        tags["git_commit"] = code["mlflow.source.git.commit"]
    if based_on:
        tags["stage1_from_version"] = based_on
    if weak:
        tags["weak_experts"] = ",".join(weak)
    return tags | {metric_tag(n): repr(float(metrics[n])) for n in headline_metric_names(gate) if n in metrics}


def resource_id(name: str, version: str) -> str:
    """The Prefect resource id of a registered model version."""
    return f"lora-moe.model-version.{name}.{version}"


def promotion_event(
    entry: RegistryEntry, *, gate: dict[str, Any], metrics: dict[str, float], data_fingerprint: str, task: str, run_url: str | None = None
) -> dict[str, Any] | None:
    """The keyword arguments of `prefect.events.emit_event` announcing that `champion` moved to
    `entry` (None when this registration left it where it was): the resource names the model
    and version, the payload carries the gate, the headline metrics and where to read more."""
    if not entry.champion_moved:
        return None
    from tasks.registry.card import headline_metric_names

    headline = {n: metrics[n] for n in headline_metric_names(gate) if n in metrics}
    return {
        "event": PROMOTED_EVENT,
        "resource": {
            "prefect.resource.id": resource_id(entry.name, entry.version),
            "prefect.resource.name": f"{entry.name} v{entry.version}",
            "lora-moe.model": entry.name,
            "lora-moe.version": entry.version,
            "lora-moe.alias": CHAMPION,
        },
        "payload": {
            "model_uri": f"models:/{entry.name}/{entry.version}",
            "previous_champion": entry.previous_champion,
            "decision": entry.champion_decision,
            "task": task,
            "data_fingerprint": data_fingerprint,
            "gate": {
                "passed": gate.get("passed"),
                "primary_metric": gate.get("primary_metric"),
                "primary_value": gate.get("primary_value"),
                "checks": [{k: c.get(k) for k in ("name", "value", "threshold", "passed")} for c in gate.get("checks", [])],
            },
            "metrics": headline,
            "logged_model_id": entry.model_id,
            "mlflow_run_url": run_url,
        },
    }


def metric_tag(name: str) -> str:
    return f"metric.{name}"


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="Wan2.2 surgical-video LoRA-MoE bundles (wan-lora-moe pipeline).")
        except MlflowException:  # created meanwhile
            pass


def current_version(client, name: str, alias: str):
    """The model version holding `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_decision(client, name: str, gate_passed: bool, primary_metric: str, primary_value: float, higher_is_better: bool) -> tuple[bool, str]:
    """(move champion?, why)."""
    if not gate_passed:
        return False, "eval gate failed: champion unchanged"
    champion = current_version(client, name, CHAMPION)
    if champion is None:
        return True, "gate passed and there was no champion"
    tag = champion.tags.get(metric_tag(primary_metric))
    if tag is None:
        return True, f"gate passed; champion v{champion.version} has no {primary_metric} to compare"
    theirs = float(tag)
    not_worse = primary_value >= theirs if higher_is_better else primary_value <= theirs
    verdict = "not worse than" if not_worse else "worse than"
    return not_worse, (f"gate passed; {primary_metric} {primary_value:.6g} is {verdict} champion v{champion.version}'s {theirs:.6g}")


def write_bundle(
    folder: Path,
    *,
    task: str,
    lora_moe_file: Path,
    artifacts: dict[str, ArtifactRef],
    data_fingerprint: str,
    metrics: dict[str, float],
    gate: dict[str, Any],
    based_on: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`folder/bundle.json` and a copy of the LoRA-MoE file: what a registry version holds."""
    import moe

    if "lora_moe" not in artifacts:
        raise ValueError("a bundle needs the lora_moe ref")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lora_moe_file, folder / LORA_MOE_FILE)
    bundle = {
        "format": BUNDLE_FORMAT,
        "package_version": moe.__version__,
        "task": task,
        "data_fingerprint": data_fingerprint,
        "lora_moe_file": LORA_MOE_FILE,
        "artifacts": {name: json.loads(ref.model_dump_json()) for name, ref in artifacts.items()},
        "eval": {"metrics": metrics, "gate": gate},
        "based_on": based_on,
    }
    (folder / BUNDLE_FILE).write_text(json.dumps(bundle, indent=2))
    return bundle


def save_bundle_model(bundle_dir: Path, out: Path) -> Path:
    """The bundle as a pyfunc model from code in `out` (a new folder): MLflow runs
    `video_model_code.py` to build the model, so nothing is pickled. Requirements are given, not
    inferred (inferring would load the model in a subprocess)."""
    import tempfile

    import mlflow

    import moe

    with tempfile.TemporaryDirectory() as tmp:
        # MLflow names an artifact folder after its source folder: stage it as `bundle`.
        staged = Path(tmp) / BUNDLE_ARTIFACT
        shutil.copytree(bundle_dir, staged)
        mlflow.pyfunc.save_model(
            path=str(out),
            python_model=str(MODEL_CODE),
            artifacts={BUNDLE_ARTIFACT: str(staged)},
            pip_requirements=[f"wan-lora-moe=={moe.__version__}"],
        )
    return out


def register_bundle(
    client,
    name: str,
    experiment_id: str,
    run_id: str,
    bundle_dir: Path,
    tags: dict[str, str],
    gate_passed: bool,
    primary_metric: str,
    primary_value: float,
    higher_is_better: bool,
    run_link: str | None = None,
    card=None,
    artifacts: dict[str, ArtifactRef] | None = None,
    model_tags: dict[str, str] | None = None,
) -> RegistryEntry:
    """A new model version of `name` holding `bundle_dir` (as a pyfunc model), with its tags and
    aliases. `run_id`: the run the version points at (the pipeline's parent run: metrics, data,
    report). `card`: a `tasks.registry.card.ModelCard` without its version (written as MODEL_CARD.md
    and, in short, as the version's description); `artifacts`: written as artifacts.json."""
    import tempfile

    from mlflow.entities import LoggedModelStatus

    _ensure_registered_model(client, name)
    model = client.create_logged_model(
        experiment_id, name="lora-moe-bundle", source_run_id=run_id, tags=model_tags or {}, model_type="LoRA-MoE bundle"
    )
    move, why = champion_decision(client, name, gate_passed, primary_metric, primary_value, higher_is_better)
    previous = current_version(client, name, CHAMPION)
    card = card.model_copy(update={"name": name, "decision": why}) if card is not None else None
    version = client.create_model_version(
        name,
        source=model.artifact_location,
        run_id=run_id,
        tags=tags | {"champion_decision": why, "logged_model_id": model.model_id},  # the SQL store keeps no model_id
        run_link=run_link,
        description=card.description() if card is not None else why,
        model_id=model.model_id,
    )
    try:  # the files, with the card naming the version's number; no alias points at the version yet
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_bundle_model(bundle_dir, Path(tmp) / "model")
            if card is not None:
                (folder / MODEL_CARD_FILE).write_text(card.model_copy(update={"version": str(version.version)}).markdown())
            if artifacts is not None:
                (folder / ARTIFACTS_FILE).write_text(json.dumps({k: json.loads(ref.model_dump_json()) for k, ref in artifacts.items()}, indent=2))
            client.log_model_artifacts(model.model_id, str(folder))
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    except BaseException:
        _delete_quietly(client, name, version.version)
        raise
    # what `mlflow.register_model` records: the logged model's page then names its version
    client.set_logged_model_tags(model.model_id, {"mlflow.modelVersions": json.dumps([{"name": name, "version": str(version.version)}])})
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    if move:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    aliases = client.get_model_version(name, version.version).aliases
    return RegistryEntry(
        name=name,
        version=str(version.version),
        aliases=sorted(aliases),
        champion_decision=why,
        model_id=model.model_id,
        champion_moved=move,
        previous_champion=str(previous.version) if previous is not None else None,
    )


def _delete_quietly(client, name: str, version: str) -> None:
    """Remove a version whose files could not be stored (the error that got here matters more)."""
    try:
        client.delete_model_version(name, version)
    except Exception:
        pass


# -- reading the registry (the `lora-moe registry` commands, `generate --model`, the flow) ------------


def parse_model_uri(uri: str) -> tuple[str, str]:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> (name, alias or version)."""
    match = MODEL_URI.match(uri)
    if match is None:
        raise MoeError(f"{uri!r} is not a registered model URI: use models:/NAME@ALIAS or models:/NAME/VERSION")
    return match["name"], match["alias"] or match["version"]


def parse_model_ref(text: str) -> tuple[str, str]:
    """`NAME@ALIAS`, `NAME/VERSION` or a `models:/` URI -> (name, alias or version)."""
    return parse_model_uri(text if text.startswith("models:/") else f"models:/{text}")


def get_version(client, name: str, alias_or_version: str):
    """The model version `alias_or_version` (digits: a version number, else an alias) of `name`,
    or a MoeError saying what exists."""
    from mlflow.exceptions import MlflowException

    try:
        if alias_or_version.isdigit():
            return client.get_model_version(name, alias_or_version)
        return client.get_model_version_by_alias(name, alias_or_version)
    except MlflowException as e:
        try:
            model = client.get_registered_model(name)
        except MlflowException:
            raise MoeError(f"no registered model {name!r} at {client.tracking_uri}") from None
        known = ", ".join(sorted(model.aliases)) or "none"
        what = "version" if alias_or_version.isdigit() else "alias"
        raise MoeError(f"{name} has no {what} {alias_or_version!r} (aliases: {known}): {e.message}") from None


def lora_moe_sha256(version) -> str | None:
    """The LoRA-MoE sha256 the version recorded at registration (older versions: artifact.lora_moe.sha256)."""
    return version.tags.get(LORA_MOE_SHA256_TAG) or version.tags.get("artifact.lora_moe.sha256")


def version_artifacts(version, tracking_uri: str) -> dict[str, dict[str, Any]]:
    """The refs a version names (artifact name -> uri, sha256, size ...): its artifacts.json, or
    for versions registered before it existed, the `artifact.NAME.FIELD` tags."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    tagged: dict[str, dict[str, Any]] = {}
    for key, value in version.tags.items():
        if key.startswith("artifact."):
            artifact, _, field = key.removeprefix("artifact.").rpartition(".")
            tagged.setdefault(artifact, {})[field] = value
    if tagged:
        return tagged
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{version.source.rstrip('/')}/{ARTIFACTS_FILE}", dst_path=tmp, tracking_uri=tracking_uri
            )
            return json.loads(Path(path).read_text())
        except (MlflowException, OSError, ValueError):
            return {}


def gate_passed(version) -> bool | None:
    """The version's recorded gate verdict (None when it has none)."""
    value = version.tags.get("gate.passed")
    return None if value is None else value == "true"


def download_bundle(version, dst: Path, tracking_uri: str) -> Path:
    """The version's bundle folder (bundle.json + LoRA-MoE file), downloaded into `dst`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{version.source.rstrip('/')}/{BUNDLE_PATH}", dst_path=str(dst), tracking_uri=tracking_uri
        )
    except (MlflowException, OSError) as e:
        raise MoeError(f"cannot download the bundle of {version.name} v{version.version} from {version.source}: {str(e).splitlines()[0]}") from None
    return Path(path)


def read_bundle(folder: Path) -> dict[str, Any]:
    """bundle.json of a downloaded bundle, checked for its format."""
    try:
        bundle = json.loads((Path(folder) / BUNDLE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise MoeError(f"{folder} holds no readable {BUNDLE_FILE}: {e}") from None
    if bundle.get("format") != BUNDLE_FORMAT:
        raise MoeError(f"{folder / BUNDLE_FILE} is not a {BUNDLE_FORMAT} bundle (format {bundle.get('format')!r})")
    return bundle


def promote(client, name: str, version: str, alias: str, force: bool = False) -> str:
    """Move `alias` to `version` by hand; `champion` is refused to a version whose gate failed
    (or was never evaluated) unless `force`. Returns what was done, in one sentence."""
    target = get_version(client, name, version)
    passed = gate_passed(target)
    if alias == CHAMPION and passed is not True and not force:
        verdict = "failed" if passed is False else "was not recorded"
        raise MoeError(f"{name} v{target.version}: its eval gate {verdict}; pass --force to make it {CHAMPION} anyway")
    previous = current_version(client, name, alias)
    client.set_registered_model_alias(name, alias, target.version)
    note = "by hand" + (
        " (forced: gate " + ("failed" if passed is False else "not recorded") + ")" if alias == CHAMPION and passed is not True else ""
    )
    client.set_model_version_tag(name, target.version, f"promoted.{alias}", note)
    before = f" (was v{previous.version})" if previous is not None and previous.version != target.version else ""
    return f"{name}: {alias} -> v{target.version}{before}, {note}"
