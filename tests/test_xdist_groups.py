"""`make test` runs two pytest-xdist workers: a session fixture that builds a whole run (the demo
run: about 4 minutes) must be built on one worker only, for every module that uses it."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent

_CONFTEST = f"""
import os, sys
import pytest
sys.path.insert(0, {str(TESTS)!r})
from xdist_groups import pytest_collection_modifyitems  # the hook under test

@pytest.fixture(scope="session")
def demo_run():
    with open(os.environ["BUILT_LOG"], "a") as f:
        f.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
"""

_MODULE = """
import time
import pytest

@pytest.mark.parametrize("i", range(6))
def test_uses_the_run(demo_run, i):
    time.sleep(0.05)

@pytest.mark.parametrize("i", range(6))
def test_alone(i):
    time.sleep(0.05)
"""


def test_a_whole_run_fixture_is_built_once_under_two_workers(tmp_path):
    (tmp_path / "conftest.py").write_text(_CONFTEST)
    for name in ("test_a.py", "test_b.py", "test_c.py"):
        (tmp_path / name).write_text(textwrap.dedent(_MODULE))
    log = tmp_path / "built.log"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=os.environ | {"BUILT_LOG": str(log)},
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "36 passed" in done.stdout
    built = log.read_text().split()
    assert len(built) == 1 and built[0].startswith("gw"), built  # once, on a worker
