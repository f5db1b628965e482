"""Reading what Prefect recorded, through its client API."""

import time

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)


def task_runs(flow_run_id, timeout=60):
    """The flow run's task runs, once the API has recorded them all.

    Task run states reach the API through events, a little after the flow run
    returns: poll until every task run is final and their number is stable.
    """
    deadline = time.monotonic() + timeout
    previous = None
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            final = runs and all(
                r.state is not None and r.state.is_final() for r in runs
            )
            if (final and len(runs) == previous) or time.monotonic() > deadline:
                return runs
            previous = len(runs) if final else None
            time.sleep(0.5)


def artifacts(flow_run_id):
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )


def run(flow, *args, **kwargs):
    """Run a flow; return (final state, flow run id)."""
    state = flow(*args, return_state=True, **kwargs)
    return state, state.state_details.flow_run_id
