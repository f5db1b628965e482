from ._stats import dump


def pytest_sessionfinish(session, exitstatus):
    dump()
