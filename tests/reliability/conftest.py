"""Hands the figures of tests/reliability/README.md to whoever writes them.

Alone, this process writes them at its end. In a pytest-xdist worker, they go
to the controller, which adds up every worker's and writes them (root
conftest.py): each worker runs only a share of the tests.
"""

from ._stats import STATS, dump


def pytest_sessionfinish(session, exitstatus):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is None:
        dump()
    else:
        workeroutput["reliability_stats"] = dict(STATS)
