"""A registered model as local files: the bundle's LoRA-MoE (checked against its ref) and every
ref it names (merged DiTs, VAE, text encoder, tokenizer) fetched through the worker's download
cache, each verified by sha256; an artifact fetched once (by the pipeline's eval, an earlier
generation) is reused.

`resolve_models_uri` is what `lora-moe generate --model models:/NAME@ALIAS` calls, through the
`lora_moe.model_uri_resolvers` entry point (moe never imports this package); the pyfunc model
(`tasks.registry.video_model`) uses `fetch_bundle_inputs` on the bundle MLflow downloaded for it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from moe.config.file_names import LORA_MOE_FILE
from moe.errors import MoeError
from moe.files.atomic import size_on_disk
from moe.files.hashing import sha256_file
from moe.model_uri import ResolvedModel
from tasks.artifacts.download_cache import DownloadCache
from tasks.artifacts.refs import ArtifactRef
from tasks.registry.versions import download_bundle, get_version, lora_moe_sha256, parse_model_uri, read_bundle

# bundle ref name -> `lora-moe generate` option
INPUT_REFS = {
    "merged_low_noise": "dit",
    "merged_high_noise": "dit_high_noise",
    "base_vae": "vae",
    "base_text_encoder": "text_encoder",
    "base_tokenizer": "tokenizer",
}


def verified_lora_moe(bundle_dir: Path, bundle: dict, expected_sha256: str | None = None) -> Path:
    """The bundle's LoRA-MoE file, after checking its sha256 against the bundle's ref (and, when
    given, the sha256 the registry version recorded: `tasks.registry.versions.lora_moe_sha256`)."""
    ref = ArtifactRef.model_validate(bundle["artifacts"]["lora_moe"])
    if expected_sha256 is not None and expected_sha256 != ref.sha256:
        raise MoeError(
            f"{bundle_dir}: bundle.json records LoRA-MoE sha256 {ref.sha256[:12]}..., the registry version "
            f"{expected_sha256[:12]}...: the bundle was changed after registration"
        )
    path = Path(bundle_dir) / bundle.get("lora_moe_file", LORA_MOE_FILE)
    got = sha256_file(path)
    if got != ref.sha256:
        raise MoeError(
            f"{path} does not match its ref: sha256 {got[:12]}... instead of {ref.sha256[:12]}... (the registered copy was changed or damaged)"
        )
    return path


def fetch_bundle_inputs(bundle: dict, lora_moe: Path, cache: DownloadCache, source: str) -> ResolvedModel:
    """Everything generation needs for a bundle whose LoRA-MoE file is verified, as local paths."""
    paths = {
        option: cache.fetch(ArtifactRef.model_validate(bundle["artifacts"][name]))
        for name, option in INPUT_REFS.items()
        if name in bundle["artifacts"]
    }
    missing = sorted({"dit", "vae", "text_encoder", "tokenizer"} - set(paths))
    if missing:
        raise MoeError(f"{source}: its bundle names no {', '.join(missing)} ref; it cannot generate")
    return ResolvedModel(task=bundle["task"], lora_moe_weights=lora_moe, source=source, **paths)


def resolve_models_uri(uri: str) -> dict:
    """`models:/NAME@ALIAS` (or `/VERSION`) -> {generate option: local path, task}. The registry is
    MLFLOW_TRACKING_URI's; refs are fetched with the standard AWS chain and AWS_ENDPOINT_URL_S3
    into the download cache (LORA_MOE_DOWNLOAD_CACHE, else LORA_MOE_WORK_DIR/downloads, the
    worker's)."""
    from tasks.artifacts.s3 import S3Options
    from tasks.registry.tracking import mlflow_client, quiet_mlflow_output

    quiet_mlflow_output()
    name, which = parse_model_uri(uri)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise MoeError(f"--model {uri}: set MLFLOW_TRACKING_URI to the registry's tracking server (or sqlite:///... file)")
    client = mlflow_client(tracking_uri)
    version = get_version(client, name, which)
    cache = DownloadCache(s3=S3Options())
    before = size_on_disk(cache.root)
    source = f"{name} v{version.version}"
    tmp = Path(tempfile.mkdtemp(prefix="bundle-", dir=_make(cache.root / "tmp")))
    try:
        bundle_dir = download_bundle(version, tmp, tracking_uri)
        bundle = read_bundle(bundle_dir)
        lora_moe = verified_lora_moe(bundle_dir, bundle, lora_moe_sha256(version))
        kept = cache.adopt(lora_moe, bundle["artifacts"]["lora_moe"]["sha256"])  # verified: it joins the cache
        inputs = fetch_bundle_inputs(bundle, kept, cache, source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cached = {"download_cache": cache.root, "cache_bytes_before": before, "cache_bytes": size_on_disk(cache.root)}
    return inputs.model_copy(update=cached).model_dump(mode="json")


def _make(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder
