"""Prefect flows over the `tasks` package: `flows.pipeline.lora_moe_pipeline` (`lora-moe-pipeline`).
The flow process never imports torch; run it with `python -m flows run ...`."""
