"""Every option of every command, as torch-free pydantic models, and the file loader they share.

    loader.py           read_config_file (YAML/TOML) and build_config: one way to turn a file plus
                        flags into a validated config, with one-line errors naming the option
    numbers.py          number types with their allowed ranges (ranks, seeds, sizes, frames)
    train.py            TrainConfig, Stage1Config, Stage2Config
    eval.py, gate.py    EvalConfig, SweepConfig; the promotion gate's thresholds and verdict
    generate.py         GenerateConfig          workflow.py   WorkflowConfig (the one-process run)
    cache.py, merge.py  CacheConfig, MergeConfig
    data.py, tiny.py    Cholec80Config, DataCheckConfig; SynthConfig, TinyModelsConfig
    lora.py             ExportExpertConfig, ConvertLoRAConfig, InspectConfig
    runtime_options.py  the DiT options every stage shares (dtype, fp8, block swap, compile)
    presets.py          the Wan2.2 model presets (A14B, 5B, tiny) and their block layout
    targets.py          which Linear layers a LoRA adapts, with their ranks
    instruments.py      the instrument vocabulary: class names, one expert each
    file_names.py       the names of the files the commands write

Nothing here imports torch (tests/test_structure.py checks it): `lora-moe --help`, the
Prefect flow process and config validation stay light.
"""
