"""Per-run costs: flow-run heartbeats and the checks of cached manifests.

Prefect's flow engine joins its heartbeat thread at the end of every run (up
to 1 s); samplepipe's flows called in-process run without it unless heartbeats
are configured. A probe step counts the heartbeat threads alive while it runs.
A cached batch's manifest is checked once per cache lookup. A top-level call
passes its samples to Prefect, and gets them back, without Prefect walking them.
"""

import threading

import numpy as np
import pytest
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline

from .conftest import make_samples

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def _is_heartbeat(thread):
    # Prefect starts it as Thread(target=context.run, args=(heartbeat_loop,))
    args = getattr(thread, "_args", ())
    return bool(args) and getattr(args[0], "__name__", "") == "heartbeat_loop"


class HeartbeatProbe(TransformerMixin, BaseEstimator):
    """Writes, per transform call, how many heartbeat threads are alive."""

    def __init__(self, log_path=None):
        self.log_path = log_path

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        alive = sum(_is_heartbeat(t) for t in threading.enumerate())
        with open(self.log_path, "a") as f:
            f.write(f"{alive}\n")
        return np.asarray(X, dtype=float) + 1.0

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags


def _parameters(tmp_path):
    return {
        "pipeline": Pipeline([("probe", HeartbeatProbe(str(tmp_path / "probe.log")))]),
        "samples": make_samples(6),
        "features_dir": str(tmp_path / "features"),
        "model_dir": str(tmp_path / "models"),
        "batch_size": 3,
    }


def _seen(tmp_path):
    return [int(n) for n in (tmp_path / "probe.log").read_text().split()]


def test_an_in_process_call_runs_without_a_heartbeat_thread(tmp_path):
    from samplepipe.flows import transform_pipeline

    out = transform_pipeline(**_parameters(tmp_path))
    assert [s.key for s in out] == [s.key for s in make_samples(6)]
    assert _seen(tmp_path) == [0, 0]


def test_an_engine_run_as_deployments_run_keeps_its_heartbeat(tmp_path):
    # Workers and `serve` run a deployment's flow with run_flow, not __call__.
    from prefect.flow_engine import run_flow

    from samplepipe.flows import transform_pipeline

    out = run_flow(transform_pipeline, parameters=_parameters(tmp_path))
    assert len(out) == 6
    assert _seen(tmp_path) == [1, 1]


def test_configured_heartbeats_are_kept_in_process(tmp_path):
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from samplepipe.flows import transform_pipeline

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}):
        transform_pipeline(**_parameters(tmp_path))
    assert _seen(tmp_path) == [1, 1]


def test_a_subflow_keeps_its_heartbeat(tmp_path):
    from prefect import flow

    from samplepipe.flows import transform_pipeline

    @flow
    def parent():
        return len(transform_pipeline(**_parameters(tmp_path)))

    assert parent() == 6
    assert _seen(tmp_path) == [2, 2]  # the parent's and the subflow's


def test_a_cached_batch_checks_its_manifest_once(tmp_path, monkeypatch):
    # Prefect reads a cached result twice per lookup (exists, then read): the
    # files a manifest names are checked (one os.stat each) on the first read.
    from samplepipe import tasks
    from samplepipe.flows import transform_pipeline

    from ._prefect_helpers import run, task_runs

    transform_pipeline(**_parameters(tmp_path))
    checked = []
    real = tasks.check_manifest

    def counting(manifest, *args, **kwargs):
        checked.append(manifest.start)
        return real(manifest, *args, **kwargs)

    monkeypatch.setattr(tasks, "check_manifest", counting)
    state, flow_run_id = run(transform_pipeline, **_parameters(tmp_path))
    assert [s.key for s in state.result()] == [s.key for s in make_samples(6)]
    assert sorted(r.state.name for r in task_runs(flow_run_id)) == ["Cached"] * 2
    assert sorted(checked) == [0, 3]  # once per batch, not twice
    assert _seen(tmp_path) == [0, 0]  # computed once, by the first run


def _count_sample_visits(monkeypatch):
    """How many samples Prefect's collection walks see (the real walks run)."""
    import prefect.flow_engine
    import prefect.futures
    import prefect.utilities.engine

    from samplepipe import Sample

    seen = []
    real = prefect.utilities.engine.visit_collection

    def counting(expr, visit_fn, *args, **kwargs):
        def visit(x, *context):
            if isinstance(x, Sample):
                seen.append(getattr(x, "key", None))
            return visit_fn(x, *context)

        return real(expr, visit, *args, **kwargs)

    for module in (prefect.flow_engine, prefect.futures, prefect.utilities.engine):
        monkeypatch.setattr(module, "visit_collection", counting)
    return seen


def test_a_top_level_call_passes_its_samples_without_a_walk(tmp_path, monkeypatch):
    from samplepipe.flows import transform_pipeline
    from samplepipe.outputs import PipelineOutputs

    seen = _count_sample_visits(monkeypatch)
    out = transform_pipeline(**_parameters(tmp_path))
    assert type(out) is PipelineOutputs
    assert [s.key for s in out] == [s.key for s in make_samples(6)]
    np.testing.assert_array_equal(out[0].data, make_samples(6)[0].data + 1.0)
    assert seen == []
    # with return_state=True the flow returns its samples as Prefect expects
    state = transform_pipeline(**_parameters(tmp_path), return_state=True)
    assert state.is_completed()
    assert [s.key for s in state.result()] == [s.key for s in make_samples(6)]
    assert seen == []  # a view over manifests: nothing in it for Prefect to walk


def test_a_subflow_returns_its_samples_as_prefect_expects(tmp_path, monkeypatch):
    from prefect import flow

    from samplepipe.flows import transform_pipeline

    @flow
    def parent():
        out = transform_pipeline(**_parameters(tmp_path))
        return type(out).__name__, [s.key for s in out]

    seen = _count_sample_visits(monkeypatch)
    assert parent() == ("PipelineOutputs", [s.key for s in make_samples(6)])
    # Prefect walks a subflow's parameters (the samples) as for any subflow
    assert len(seen) >= 6


@pytest.mark.parametrize(("interval", "updates"), [(3600.0, 0), (0.0, 1)])
def test_the_progress_artifact_is_one_request_for_a_short_run(
    tmp_path, monkeypatch, interval, updates
):
    # created at the first update (``interval`` s into the run, or at its end)
    from samplepipe import _schedule, flows

    from ._prefect_helpers import artifacts, run

    sent = []
    real = _schedule.update_progress_artifact

    def counting(*args, **kwargs):
        sent.append(kwargs.get("progress"))
        return real(*args, **kwargs)

    monkeypatch.setattr(_schedule, "update_progress_artifact", counting)
    monkeypatch.setattr(_schedule.Progress, "interval", interval)
    _, flow_run_id = run(flows.transform_pipeline, **_parameters(tmp_path))
    found = [a for a in artifacts(flow_run_id) if a.type == "progress"]
    assert len(found) == 1 and found[0].data == 100.0
    assert sent == [100.0] * updates  # 2 batches: created at 50 %, then updated
