"""wan-lora-moe: two-stage LoRA mixture-of-experts fine-tuning of WAN2.2 video DiTs.

The core library. It never imports Prefect or MLflow; orchestration lives in `tasks/` and `flows/`.
"""

__version__ = "0.1.0"
