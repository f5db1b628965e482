"""Reading what Prefect recorded, through its client API."""

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)


def task_runs(flow_run_id):
    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


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
