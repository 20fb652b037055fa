"""Names of the files the `lora-moe` commands write into their output folders.

One place for them, importing nothing, so the orchestration side (`tasks/`, which never imports
torch) reads the same names the commands write instead of restating them.
"""

from pydantic import AliasChoices

VANILLA_LORA_FILE = "vanilla_lora.safetensors"  # stage 1
LORA_MOE_FILE = "lora_moe_stage2.safetensors"  # stage 2
METRICS_FILE = "metrics.json"  # both training stages: the held-out measurement
TRAIN_LOG_FILE = "train_log.jsonl"  # both training stages: one JSON object per line
MODEL_SET_FILE = "model_set.json"  # `lora-moe models tiny` and model-set folders
EVAL_REPORT_FILE = "eval_report.json"  # `lora-moe eval`

# Every command that writes a folder names it --output_dir. `out`, the data-preparation commands'
# former spelling, still works as a key of a --config file (on the command line click's token
# normalisation makes `--out` and `--output_dir` one option: `moe.cli.app.OPTION_ALIASES`).
OUTPUT_DIR = AliasChoices("output_dir", "out")

# Every --overwrite option: what it may replace.
OVERWRITE_HELP = "Replace an existing output, but only one that this command wrote (never an input)."
