"""The flow layer's source: no private flags, no options from ``locals()`` (issue 23).

Module sizes are checked for the whole package in ``test_layouts.py``.
"""

from pathlib import Path

import samplepipe

SRC = Path(samplepipe.__file__).parent

FLOW_LAYER = [
    "_cli_common.py",
    "_cli_explain.py",
    "_cli_folders.py",
    "_manifest.py",
    "_options.py",
    "_prefect.py",
    "_schedule.py",
    "_summary.py",
    "cli.py",
    "flows.py",
    "outputs.py",
    "tasks.py",
]


def test_the_flows_import_no_private_flag_of_the_wrappers():
    # the step a prediction uses is a typed field (PlannedStep.fitted)
    for module in ("flows.py", "_schedule.py"):
        assert "_predicts_for" not in (SRC / module).read_text()


def test_no_options_object_is_built_from_locals():
    for module in FLOW_LAYER:
        assert "locals()" not in (SRC / module).read_text(), module
