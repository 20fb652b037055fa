"""The registered bundle as an MLflow pyfunc model: one generated video per request row.

    model = mlflow.pyfunc.load_model("models:/wan22-surgical-lora-moe@champion")
    [path] = model.predict([{"prompt": "a hook cauterises tissue", "instrument_hint": "hook"}])

`load_context` verifies the bundle's LoRA-MoE file and fetches (or finds in the download cache)
every ref it names; `predict` runs `moe.inference.generate_video` in this process and returns
the paths of the MP4s. torch is imported only inside `predict`, so loading the package (and
registering a model in the flow process) stays torch-free. MLflow builds the model by running
`video_model_code.py` (models from code), so nothing is unpickled.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import mlflow.pyfunc
from pydantic import BaseModel, Field


class VideoRequest(BaseModel):
    """One video to generate; empty fields take `lora-moe generate`'s defaults."""

    prompt: str
    instrument_hint: str | None = Field(None, description="Force one expert: scissors, hook, suction or other.")
    negative_prompt: str | None = None
    seed: int | None = None
    infer_steps: int | None = None
    video_size: str | None = Field(None, description="WIDTHxHEIGHT, multiples of 16.")
    video_length: int | None = Field(None, description="Frames, 4k+1.")
    guidance_scale: float | None = None
    device: str | None = Field(None, description="Default: LORA_MOE_DEVICE, else cuda when available, else cpu.")
    dtype: str | None = Field(None, description="Default: bf16 on cuda, float32 on cpu.")
    output_dir: str | None = Field(None, description="Default: LORA_MOE_VIDEO_DIR, else a lora-moe-videos temp folder.")


class LoraMoeVideoModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from tasks.artifacts.download_cache import DownloadCache
        from tasks.artifacts.s3 import S3Options
        from tasks.registry.bundle import fetch_bundle_inputs, verified_lora_moe
        from tasks.registry.versions import BUNDLE_ARTIFACT, read_bundle

        bundle_dir = Path(context.artifacts[BUNDLE_ARTIFACT])
        bundle = read_bundle(bundle_dir)
        lora_moe = verified_lora_moe(bundle_dir, bundle)
        self.inputs = fetch_bundle_inputs(bundle, lora_moe, DownloadCache(s3=S3Options()), str(bundle_dir))

    def predict(self, context, model_input: list[VideoRequest], params=None) -> list[str]:
        import torch

        from moe.config.generate import GenerateConfig
        from moe.inference import generate_video

        paths = []
        for request in model_input:
            request = request if isinstance(request, VideoRequest) else VideoRequest.model_validate(request)
            device = request.device or os.environ.get("LORA_MOE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
            out = Path(request.output_dir or os.environ.get("LORA_MOE_VIDEO_DIR") or Path(tempfile.gettempdir()) / "lora-moe-videos")
            out.mkdir(parents=True, exist_ok=True)
            given = request.model_dump(exclude_none=True, exclude={"output_dir", "device", "dtype"})
            cfg = GenerateConfig(
                **self.inputs.model_dump(exclude={"source"}, exclude_none=True),
                **given,
                device=device,
                dtype=request.dtype or ("bf16" if device.startswith("cuda") else "float32"),
                save_path=out / f"lora-moe-{uuid.uuid4().hex[:12]}.mp4",
            )
            generate_video(cfg)
            paths.append(str(cfg.save_path))
        return paths
