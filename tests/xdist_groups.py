"""Groups of tests for pytest-xdist (`make test`: two workers, --dist loadgroup)."""

from __future__ import annotations

import pytest

# The session fixtures that build a whole run (1-4 minutes each): under pytest-xdist, every test
# module that uses one runs on the same worker, so the run is built once. Other modules are
# groups of their own, so module fixtures are built once too (`make test`: --dist loadgroup).
SHARED_RUNS = ("demo_run", "s3_pipeline")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks into the test ids
def pytest_collection_modifyitems(config, items):
    group = {}
    for item in items:
        shared = next((name for name in SHARED_RUNS if name in item.fixturenames), None)
        if shared or item.module.__name__ not in group:
            group[item.module.__name__] = shared or item.module.__name__
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group[item.module.__name__]))
