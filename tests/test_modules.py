"""The source tree: modules of one concern, a few hundred lines each (issue 23)."""

from pathlib import Path

import pytest

import samplepipe

SRC = Path(samplepipe.__file__).parent
MAX_LINES = 800

# The flow layer's modules (storage and wrappers are held to the same rule
# by their own refactoring, issue 23 items 1-3).
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


@pytest.mark.parametrize("module", FLOW_LAYER)
def test_flow_layer_modules_stay_under_800_lines(module):
    n = len((SRC / module).read_text().splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines; split it by concern"


def test_the_flows_import_no_private_flag_of_the_wrappers():
    # the step a prediction uses is a typed field (PlannedStep.fitted)
    for module in ("flows.py", "_schedule.py"):
        assert "_predicts_for" not in (SRC / module).read_text()


def test_no_options_object_is_built_from_locals():
    for module in FLOW_LAYER:
        assert "locals()" not in (SRC / module).read_text(), module
