"""`RunOptions`: the one options type of the three flows and the command line."""

import dataclasses
import inspect
import typing

import pytest

from samplepipe import cli
from samplepipe.flows import (
    RunOptions,
    fit_pipeline,
    run_pipeline,
    transform_pipeline,
)

FIELDS = [f.name for f in dataclasses.fields(RunOptions)]

# What a flow takes besides its options: its inputs.
INPUTS = {
    "fit_pipeline": {"pipeline", "samples", "pipeline_kwargs", "samples_kwargs"},
    "transform_pipeline": {"pipeline", "samples", "pipeline_kwargs", "samples_kwargs"},
    "run_pipeline": {
        "pipeline",
        "train_samples",
        "samples",
        "pipeline_kwargs",
        "train_samples_kwargs",
        "samples_kwargs",
    },
}
# Options a flow does not take: a fit computes no method.
NOT_TAKEN = {"fit_pipeline": {"method"}}


def _defaults(cls):
    signature = inspect.signature(cls)
    return {name: p.default for name, p in signature.parameters.items()}


@pytest.mark.parametrize("flow", [fit_pipeline, transform_pipeline, run_pipeline])
def test_each_flow_takes_the_options_fields_same_type_same_default(flow):
    name = flow.fn.__name__
    parameters = inspect.signature(flow.fn).parameters
    hints = typing.get_type_hints(flow.fn)
    fields = typing.get_type_hints(RunOptions)
    defaults = _defaults(RunOptions)
    taken = [f for f in FIELDS if f not in NOT_TAKEN.get(name, set())]
    assert set(parameters) == set(taken) | INPUTS[name]
    for field in taken:
        assert hints[field] == fields[field], field
        assert parameters[field].default == defaults[field], field


def test_every_option_is_documented_in_the_flows_docstring():
    doc = transform_pipeline.__doc__
    for field in FIELDS:
        assert field in doc, field


def test_parameters_are_the_fields_and_build_the_same_options(tmp_path):
    options = RunOptions(
        features_dir=str(tmp_path / "f"),
        model_dir=str(tmp_path / "m"),
        batch_size=7,
        method="predict",
        locks="file:///x",
        storage_options={"anon": True},
        layout="shards",
    )
    assert list(options.parameters()) == FIELDS
    assert RunOptions(**options.parameters()) == options
    assert "method" not in options.parameters(fit=True)
    # each flow binds exactly what parameters() gives it
    for flow, fit in ((fit_pipeline, True), (transform_pipeline, False)):
        inspect.signature(flow.fn).bind("p", "s", **options.parameters(fit=fit))
    inspect.signature(run_pipeline.fn).bind("p", "t", "s", **options.parameters())


# Where a command's option differs from the flows' default, and why.
CLI_DEFAULTS = {
    "features_dir": "the demo's folder",
    "model_dir": "the demo's folder",
    "batch_size": "200 samples: a fixed size the demo's folders were written with",
    "storage_options": "a JSON string",
}


@pytest.mark.parametrize("command", [cli.run, cli.serve])
def test_the_commands_take_every_option_with_the_flows_defaults(command):
    parameters = inspect.signature(command).parameters
    defaults = _defaults(RunOptions)
    for field in FIELDS:
        assert field in parameters, f"samplepipe {command.__name__} lacks --{field}"
        if field not in CLI_DEFAULTS:
            assert parameters[field].default == defaults[field], field
        assert f"    {field}\n" in command.__doc__, f"{field} undocumented"
