"""Logs people can read (issue 21 part 2): in a log (the Prefect UI through tasks.stages.launcher, a
worker's log file) progress is a short line every tenth of the way or every 30 s with the rate
and the time left, not a line per redraw; on a terminal it is tqdm as before. Long phases say
what they do; numbers have 4 significant digits; a third-party warning that every T2V run
printed is gone."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap

import pytest
from tqdm import tqdm

from moe.runtime import progress as progress_module
from moe.runtime.progress import LogProgress, format_number, metrics_line, phase, progress
from tasks.stages.launcher import run_command


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


STATUS = re.compile(r"^train: \d+/100000 step \(\d+%\), [\d.e+-]+ (step/s|s/step), ETA .+, elapsed .+$")


def test_a_long_fast_loop_is_a_dozen_lines_with_rate_and_eta():
    log = io.StringIO()
    for _ in progress(range(100_000), desc="train", unit="step", file=log):
        pass
    lines = log.getvalue().splitlines()
    assert 10 <= len(lines) <= 12, lines  # the first step, each tenth, the end: not 100000 redraws
    assert all(STATUS.match(line) for line in lines[:-1]), lines
    assert re.match(r"^train: done: 100000 step in [\d.]+ s, [\d.e+-]+ step/s$", lines[-1]), lines[-1]
    assert "\r" not in log.getvalue()


def test_a_slow_loop_says_where_it_is_every_30_s(clock):
    """2000 steps of 1 s: a line every 30 s (and at each tenth), not one per step."""
    log = io.StringIO()
    bar = progress(total=2000, desc="train", unit="step", file=log)
    for _ in range(2000):
        clock.now += 1.0
        bar.update(1)
        bar.set_postfix(loss=1 / 3, epoch=2)
    bar.close()
    lines = log.getvalue().splitlines()
    assert 2000 / 30 <= len(lines) <= 2000 / 30 + 12, len(lines)
    assert lines[1] == "train: 31/2000 step (2%), 1 step/s, ETA 32 min 49 s, elapsed 31.0 s, loss=0.3333, epoch=2"
    assert lines[-1] == "train: done: 2000 step in 33 min 20 s, 1 step/s (loss=0.3333, epoch=2)"


def test_bytes_are_scaled_and_a_stopped_loop_says_so(clock):
    log = io.StringIO()
    with progress(total=2_400_000_000, unit="B", unit_scale=True, desc="merge low.safetensors", file=log) as bar:
        for _ in range(6):
            clock.now += 10
            bar.update(200_000_000)
    lines = log.getvalue().splitlines()
    assert lines[0] == "merge low.safetensors: 200MB/2.40GB (8%), 20.0MB/s, ETA 1 min 50 s, elapsed 10.0 s"
    assert lines[-1] == "merge low.safetensors: stopped: 1.20GB/2.40GB in 1 min 00 s, 20.0MB/s"


def test_a_loop_that_fails_before_its_first_step_prints_nothing():
    """So that the error is the only line of a command that fails at once."""
    log = io.StringIO()
    with pytest.raises(RuntimeError):
        for _ in progress(range(10), desc="cache", unit="clip", file=log):
            raise RuntimeError("the first clip is damaged")
    assert log.getvalue() == ""


def test_on_a_terminal_it_is_tqdm_unchanged():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    bar = progress(range(50), desc="cache", unit="clip", file=screen, mininterval=0)
    assert type(bar) is tqdm
    for _ in bar:
        pass
    assert "\r" in screen.getvalue() and "50/50" in screen.getvalue() and "clip/s" in screen.getvalue()
    assert type(progress(range(3), disable=True)) is tqdm  # disabled: tqdm's own no-op, wherever it goes
    assert isinstance(progress(range(3), file=io.StringIO()), LogProgress)


def test_phases_say_when_they_start_and_how_long_they_took(clock):
    lines = []
    with phase("eval: held-out losses of every variant (24 clips x 6 sigmas)", lines.append):
        clock.now += 754
    assert lines == [
        "eval: held-out losses of every variant (24 clips x 6 sigmas)...",
        "eval: held-out losses of every variant (24 clips x 6 sigmas): done in 12 min 34 s",
    ]


def test_numbers_in_log_lines_have_4_significant_digits():
    metrics = {
        "routing_accuracy": 0.3333333333333333,
        "roi_loss_correct_hint": 2.3625208040078483,
        "val_loss_stage2": 2.1259672244389853,
        "val_clips": 24,
        "tiny": 1.234567e-05,
        "big": 123456.789,
    }
    assert metrics_line(metrics) == (
        "routing_accuracy 0.3333, roi_loss_correct_hint 2.363, val_loss_stage2 2.126, val_clips 24, tiny 1.235e-05, big 123500"
    )
    assert format_number(True) == "True" and format_number("a/b.safetensors") == "a/b.safetensors"


def test_the_launcher_logs_a_redrawn_line_once_not_per_redraw():
    """A bar some library draws with carriage returns, in a stage's output: its first state and
    its final state, not 2000 log lines."""
    lines = []
    code = textwrap.dedent("""
        import sys
        print("loading")
        for i in range(1, 2001):
            sys.stdout.write(f"\\rdownload: {i}/2000")
            sys.stdout.flush()
        sys.stdout.write("\\n")
        print("done")
    """)
    run_command([sys.executable, "-c", code], "prepare-data", lines.append)
    assert lines[0] == "loading" and lines[-2:] == ["download: 2000/2000", "done"]
    assert len(lines) <= 5, lines


def test_the_torchvision_warning_is_dropped_on_its_own_logger_only():
    """transformers warns that its CLIP image processor falls back to PIL when torchvision is
    missing, on every import of diffusers' Wan I2V pipeline (every T2V eval and generate did it)."""
    pytest.importorskip("transformers")
    if "torchvision" in sys.modules or _installed("torchvision"):
        pytest.skip("torchvision is installed: transformers has nothing to warn about")
    touch = "import transformers; transformers.CLIPImageProcessor"
    other = "from transformers.utils import logging; logging.get_logger('transformers.utils.import_utils').warning('other')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    before = subprocess.run([sys.executable, "-c", touch], capture_output=True, text=True, env=env)
    assert "requires torchvision (not installed)" in before.stderr  # the noise this test is about
    after = subprocess.run(
        [sys.executable, "-c", f"from moe.runtime.progress import quiet_third_party_output; quiet_third_party_output(); {touch}; {other}"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert after.returncode == 0, after.stderr
    assert "torchvision" not in after.stderr and "other" in after.stderr  # that message only, not the logger


def _installed(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(name) is not None


def test_a_tiny_generate_run_logs_phases_and_no_noise(tiny_lora_file, tmp_path):
    """The real command, its output a pipe (as under the launcher): phase lines with durations, no
    torchvision warning, no Hugging Face bars, no carriage returns."""
    from moe.tiny.model_set import write_tiny_model_set

    models = write_tiny_model_set(tmp_path / "models", "tiny-t2v", seed=0)
    lora, _ = tiny_lora_file
    save = tmp_path / "v.mp4"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe",
            "generate",
            "--dit",
            models.low_noise,
            "--dit_high_noise",
            models.high_noise,
            "--lora_weight",
            lora,
            "--model_set",
            tmp_path / "models",
            "--prompt",
            "a hook",
            "--video_size",
            "16x16",
            "--video_length",
            "5",
            "--infer_steps",
            "1",
            "--save_path",
            save,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {save} (5 frames, 16x16)")
    err = done.stderr.splitlines()
    assert err[0] == "generate: loading the DiTs and components (cpu)..."
    assert re.fullmatch(r"generate: sampling 1 steps, 5 frames at 16x16: done in [\d.]+ s", err[-1]), err
    assert len(err) == 4, err
    assert "torchvision" not in done.stderr and "Loading weights" not in done.stderr and "\r" not in done.stderr
