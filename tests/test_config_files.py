"""The option files under configs/ and the links of the README and docs/.

Every YAML under configs/ names the `lora-moe` command that runs it in its header. For a command
that takes `--config`, the file is loaded the way `lora-moe COMMAND --config FILE` loads it (the
CLI's own `read_config_file` + `build_config` with the command's config class) and must validate
to the values it holds; for one that does not take `--config` yet, its keys must be the command's
option names and the flags it stands for must parse with the command's own option types. Neither
touches a path: the files name weights and clips that do not exist on this machine, and the CLI
checks paths only after validation (`moe/cli/config_command.py`, `CheckedCommand.invoke`).

The README and docs/ ship with the repository: no link may leave it, and every relative link
(and #anchor) must resolve.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml

# ---- The project's names this test uses: the one place to update when modules move. -------------
# The loader and the config classes come from the CLI modules that use them, so a file is loaded
# exactly as `lora-moe COMMAND --config FILE` loads it, wherever the configs themselves live.
from moe.cli import _register_commands
from moe.cli.app import app
from moe.cli.cache import CacheConfig
from moe.cli.checkpoints import MergeConfig
from moe.cli.config_command import build_config, read_config_file
from moe.cli.eval import EvalConfig
from moe.cli.training import GenerateConfig, Stage1Config, Stage2Config
from moe.config.file_names import LORA_MOE_FILE, VANILLA_LORA_FILE  # what stage 1 and 2 write

# The commands that take --config, and the config class each one validates its options with.
CONFIG_CLASSES = {
    "stage1": Stage1Config,
    "stage2": Stage2Config,
    "eval": EvalConfig,
    "generate": GenerateConfig,
    "cache": CacheConfig,
    "merge": MergeConfig,
}
# ---------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
A14B = CONFIGS / "a14b"
CONFIG_FILES = sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml"))
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


@pytest.fixture(scope="module")
def cli():
    _register_commands()
    return typer.main.get_command(app)


def _command_name(path: Path) -> str:
    """The command the file's header says to run (`lora-moe NAME ...`)."""
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    match = re.search(r"lora-moe ([a-z0-9][a-z0-9-]*)", header)
    assert match, f"{path.relative_to(ROOT)}: the header comment must say the command that runs it (lora-moe COMMAND ...)"
    return match.group(1)


def _command(cli, name: str):
    command = cli.commands.get(name)
    assert command is not None, f"no command `lora-moe {name}`"
    return command


def _takes_config(command) -> bool:
    return any(p.name == "config" for p in command.params)


def _options(command) -> dict:
    return {p.name: p for p in command.params if p.name != "config"}


def _file_values(path: Path) -> dict:
    values = yaml.safe_load(path.read_text())
    assert isinstance(values, dict) and values, f"{path.relative_to(ROOT)} must hold a mapping of option names to values"
    return values


_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _plain(value):
    """A value as a YAML file spells it: paths as text, tuples as lists, models as mappings."""
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if hasattr(value, "value") and not isinstance(value, (int, float, str)):  # an enum
        return value.value
    return value


def _assert_same(name: str, loaded, written) -> None:
    """`loaded` (what the command received) holds what the file wrote for option `name`."""
    loaded = _plain(loaded)
    if isinstance(written, dict):  # a nested model (the eval gate): the keys the file gives
        assert isinstance(loaded, dict), name
        for key, value in written.items():
            _assert_same(f"{name}.{key}", loaded[key], value)
        return
    if name.endswith("size") and isinstance(written, str) and isinstance(loaded, list):
        written = [int(v) for v in written.lower().split("x")]  # 832x480 -> (832, 480)
    if name == "dtype":
        loaded, written = (_DTYPE_NAMES.get(v, v) for v in (loaded, written))
    if isinstance(written, list):
        assert loaded == [_plain(v) for v in written], name
    else:
        assert loaded == written, f"{name}: the file says {written!r}, the command got {loaded!r}"


def _load(path: Path):
    """What `lora-moe COMMAND --config FILE` validates, without the path checks that follow it."""
    name = _command_name(path)
    cls = CONFIG_CLASSES[name]
    return build_config(cls, read_config_file(path), {})


def _flags(command, values: dict) -> list[str]:
    """The command-line flags a mapping of option values stands for."""
    options = _options(command)
    argv = []
    for key, value in values.items():
        option = options[key]
        if option.is_flag:
            if value:
                argv.append(option.opts[0])
            elif option.secondary_opts:
                argv.append(option.secondary_opts[0])
        else:
            argv += [option.opts[0], str(value)]
    return argv


def _header_command(path: Path, name: str) -> list[str]:
    """The flags of the `lora-moe NAME ...` command line in the file's header (continued with \\)."""
    lines = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    for i, line in enumerate(lines):
        if line.startswith(f"lora-moe {name} ") and "--config" not in line:
            text = line
            while text.endswith("\\"):
                i += 1
                text = text[:-1] + " " + lines[i]
            return shlex.split(text)[2:]
    raise AssertionError(f"{path.relative_to(ROOT)}: `lora-moe {name}` takes no --config yet, so its header must give the command as flags")


def test_configs_exist():
    names = {p.name for p in A14B.glob("*.yaml")}
    assert {"cache.yaml", "stage1.yaml", "merge-low.yaml", "merge-high.yaml", "stage2.yaml", "eval.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=_ids(CONFIG_FILES))
def test_header_names_the_command(path, cli):
    name = _command_name(path)
    command = _command(cli, name)
    if _takes_config(command):
        assert name in CONFIG_CLASSES, f"`lora-moe {name}` takes --config now: add its config class to CONFIG_CLASSES"
        run = f"lora-moe {name} --config {path.relative_to(ROOT).as_posix()}"
        assert run in path.read_text(), f"{path.relative_to(ROOT)}: the header should say `{run}`"
    else:
        assert "Edit:" in path.read_text(), f"{path.relative_to(ROOT)}: the header should say which paths to edit"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=_ids(CONFIG_FILES))
def test_every_key_is_an_option(path, cli):
    """No typo: every key is one of the command's options (and a field of its config class)."""
    name = _command_name(path)
    command = _command(cli, name)
    keys = set(_file_values(path))
    unknown = keys - set(_options(command))
    assert not unknown, f"{path.relative_to(ROOT)}: not options of `lora-moe {name}`: {sorted(unknown)}"
    if _takes_config(command):
        fields = set(CONFIG_CLASSES[name].model_fields)
        assert set(_options(command)) == fields, f"CONFIG_CLASSES[{name!r}] is not the class `lora-moe {name}` reads"
        assert keys <= fields


@pytest.mark.parametrize("path", CONFIG_FILES, ids=_ids(CONFIG_FILES))
def test_file_loads_as_the_command_loads_it(path, cli):
    name = _command_name(path)
    command = _command(cli, name)
    values = _file_values(path)
    if _takes_config(command):
        cfg = _load(path)
        for key, value in values.items():
            _assert_same(key, getattr(cfg, key), value)
    else:
        # The flags the file stands for, parsed by the command's own option types (nothing runs).
        ctx = command.make_context(name, _flags(command, values))
        for key, value in values.items():
            _assert_same(key, ctx.params[key], value)
        # The command line in the header says the same as the keys.
        from_header = command.make_context(name, _header_command(path, name)).params
        assert from_header == ctx.params, f"{path.relative_to(ROOT)}: the header's command and the keys differ"


def _a14b(name: str, cli) -> dict:
    """configs/a14b/NAME.yaml as the command receives it: a config, or the parsed flags."""
    path = A14B / f"{name}.yaml"
    command = _command(cli, _command_name(path))
    if _takes_config(command):
        return _load(path).model_dump()
    return command.make_context(_command_name(path), _flags(command, _file_values(path))).params


def test_a14b_stages_hand_each_other_their_outputs(cli):
    cache, stage1, stage2, evaluation, generate = (_a14b(n, cli) for n in ("cache", "stage1", "stage2", "eval", "generate"))
    low, high = _a14b("merge-low", cli), _a14b("merge-high", cli)
    assert {c["task"] for c in (cache, stage1, stage2, evaluation, generate, low, high)} == {"i2v-A14B"}
    assert Path(stage1["dataset"]) == Path(stage2["dataset"]) == Path(evaluation["dataset"]) == Path(cache["output_dir"])
    for merge, base in ((low, stage1["dit"]), (high, stage1["dit_high_noise"])):
        assert Path(merge["dit"]) == Path(base)
        assert Path(merge["lora_weight"]) == Path(stage1["output_dir"]) / VANILLA_LORA_FILE
        # A sharded release folder merges into a folder of shards, a single file into a file.
        assert (Path(merge["save_merged_model"]).suffix == ".safetensors") == (Path(base).suffix == ".safetensors")
    for cfg in (stage2, generate):
        assert (Path(cfg["dit"]), Path(cfg["dit_high_noise"])) == (Path(low["save_merged_model"]), Path(high["save_merged_model"]))
    assert (Path(evaluation["merged_dit"]), Path(evaluation["merged_dit_high_noise"])) == (
        Path(low["save_merged_model"]),
        Path(high["save_merged_model"]),
    )
    assert (Path(evaluation["dit"]), Path(evaluation["dit_high_noise"])) == (Path(stage1["dit"]), Path(stage1["dit_high_noise"]))
    for cfg in (evaluation, generate):
        assert Path(cfg["lora_moe_weights"]) == Path(stage2["output_dir"]) / LORA_MOE_FILE
        assert Path(cfg["vae"]) == Path(cache["vae"]) and Path(cfg["tokenizer"]) == Path(cache["tokenizer"])
        assert Path(cfg["text_encoder"]) == Path(cache["text_encoder"])


def test_a14b_targets_are_the_reference_workflows(cli):
    """Stage 1 and stage 2 adapt the same modules: self-attention q r8 and k/v/o r4 in blocks 32-39,
    ffn.0 r4 in blocks 37-39 of the 40-block experts."""
    stage1 = _load(A14B / "stage1.yaml")
    stage2 = _load(A14B / "stage2.yaml")
    layers = stage1.preset.dit.num_layers
    assert layers == 40
    modules = stage1.target_spec().resolve(layers)
    expected = {f"blocks.{b}.self_attn.{m}": 8 if m == "q" else 4 for b in range(32, 40) for m in "qkvo"}
    expected |= {f"blocks.{b}.ffn.0": 4 for b in range(37, 40)}
    assert modules == expected
    assert stage2.target_spec().resolve(layers) == modules
    assert stage1.network_alpha == stage2.network_alpha == 1.0
    assert not stage2.use_base_lora and stage2.routing_mode == "learned" and stage2.num_experts == 4


def test_a14b_memory_options_as_documented(cli):
    for name in ("stage1", "stage2"):
        cfg = _load(A14B / f"{name}.yaml")
        assert cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing
        assert cfg.offload_inactive_dit == "auto"
        assert not (cfg.fsdp and cfg.blocks_to_swap), "--fsdp does not combine with --blocks_to_swap"


# ---- Links of the README and docs/ ----------------------------------------------------------------

_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_LINK = re.compile(r"""(?:href|src)\s*=\s*["']([^"']+)["']""")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (where brackets are not links)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(re.sub(r"`[^`]*`", "``", line))
    return "\n".join(kept)


def _links(path: Path) -> list[str]:
    prose = _prose(path.read_text())
    return _LINK.findall(prose) + _HTML_LINK.findall(prose)


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings (inline code kept, its backticks dropped)."""
    anchors, seen, fenced = set(), {}, False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


@pytest.mark.parametrize("doc", DOC_FILES, ids=_ids(DOC_FILES))
def test_links_stay_in_the_repository_and_resolve(doc):
    problems = []
    for target in _links(doc):
        if re.match(r"https?://", target):  # a public web page
            continue
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            problems.append(f"{target}: not a file of the repository")
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        if file_part.startswith("/") or not resolved.is_relative_to(ROOT):
            problems.append(f"{target}: outside the repository")
        elif "SPEC" in file_part or "shared/" in file_part:
            problems.append(f"{target}: the specification is not shipped; link docs/method.md")
        elif not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            problems.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert not problems, f"{doc.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


def test_every_docs_page_is_reachable_from_the_readme():
    """Each docs/ page is linked from the README or from a page the README links."""
    reached, todo = set(), [ROOT / "README.md"]
    while todo:
        doc = todo.pop()
        if doc in reached:
            continue
        reached.add(doc)
        for target in _links(doc):
            file_part = target.partition("#")[0]
            target_file = (doc.parent / file_part).resolve()
            if file_part.endswith(".md") and target_file.is_file() and target_file.is_relative_to(ROOT):
                todo.append(target_file)
    assert not set(DOC_FILES) - reached, sorted(str(p.relative_to(ROOT)) for p in set(DOC_FILES) - reached)
