"""Figures the reliability tests add up for tests/reliability/README.md."""

import json
import os
from collections import Counter

STATS = Counter()
# True in pytest-xdist's controller once a worker's figures were added
FROM_WORKERS = False


def add(**counts):
    STATS.update(counts)


def dump():
    path = os.environ.get("SAMPLEPIPE_RELIABILITY_STATS")
    if path:
        with open(path, "w") as f:
            json.dump(dict(STATS), f, indent=1, sort_keys=True)
