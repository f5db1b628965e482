"""Root pytest configuration: Prefect settings fixed before prefect is imported.

Applies to the tests, the module doctests and the doctests of README.md and docs/ alike.
"""

import os
import shutil
import sys
import tempfile

import pytest

# Keep Prefect's home (and SQLite database) in a throw-away folder, and never
# phone home. Prefect reads these when it is first imported.
_PREFECT_HOME = tempfile.mkdtemp(prefix="samplepipe-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["DO_NOT_TRACK"] = "1"
# The doctests of docs/concepts/flows.md run flows on Prefect's embedded
# server: on a busy machine it needs longer than Prefect's default 20 s to start.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Step descriptions (for `explain`) in a throw-away folder too, not ~/.cache.
_DESCRIPTIONS = tempfile.mkdtemp(prefix="samplepipe-descriptions-")
os.environ["SAMPLEPIPE_DESCRIPTIONS"] = _DESCRIPTIONS
for _name in [n for n in os.environ if n in ("PREFECT_API_URL", "PREFECT_API_KEY")]:
    del os.environ[_name]


# Doctest files whose examples run flows: a Prefect server starts (~30 s).
_SLOW_DOCTEST_FILES = ("docs/concepts/flows.md",)


def pytest_collection_modifyitems(items):
    for item in items:
        if item.nodeid.split("::")[0] in _SLOW_DOCTEST_FILES:
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist's controller: add up a worker's reliability figures."""
    stats = getattr(node, "workeroutput", {}).get("reliability_stats")
    if stats:
        from tests.reliability import _stats

        _stats.add(**stats)
        _stats.FROM_WORKERS = True


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)
    shutil.rmtree(_DESCRIPTIONS, ignore_errors=True)
    if "tests.reliability._stats" in sys.modules:
        from tests.reliability import _stats

        if _stats.FROM_WORKERS:
            _stats.dump()
