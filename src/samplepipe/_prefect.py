"""What samplepipe's flows need from Prefect beyond its public API, in one place.

Each piece works around a cost or a limit measured on the project's machine:

* `SampleFlow` / `sample_flow`: a flow that stores only summaries of its
  in-memory parameters (`summarize_parameter`; the API refuses more than
  512 KB), runs without flow-run heartbeats when called in-process
  (`_in_process_heartbeats`: up to 1 s per run), and passes its samples in and
  out inside `quote` for a top-level call (Prefect walks every sample looking
  for futures otherwise: 3.6-8.5 ms per 1,000 samples per walk).
* `unvisited`: a task's sample parameters quoted under the thread runner;
  `unquoted` takes the quote off where a runner (Dask) leaves it on.

Nothing here is needed for correctness: each is a cost avoided. A Prefect
upgrade that changes what they rely on shows in tests/test_flows_overhead.py.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable
from typing import Any

from prefect import Flow, flow
from prefect.context import FlowRunContext
from prefect.locking.protocol import LockManager
from prefect.results import should_persist_result
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import BaseAnnotation, quote

from .locks import CrashSafeFileLocks, RedisLocks
from .wrappers import Sample, SampleSet

__all__ = [
    "SampleFlow",
    "returned",
    "sample_flow",
    "summarize_parameter",
    "tasks_share_this_process",
    "unvisited",
]


def unquoted(value: Any) -> Any:
    """``value`` without Prefect's ``quote``/``opaque`` wrapper.

    The flows quote samples and identities so that Prefect does not visit each
    of them; the thread runner unwraps them before the cache key and the task
    see them, the Dask runner does not.
    """
    return value.unwrap() if isinstance(value, BaseAnnotation) else value


def tasks_share_this_process() -> bool:
    """Whether the current flow run's tasks run in its process (thread runner)."""
    context = FlowRunContext.get()
    return context is not None and isinstance(context.task_runner, ThreadPoolTaskRunner)


def unvisited(value: Any) -> Any:
    """``quote(value)`` under Prefect's thread runner, else ``value``.

    Quoted, Prefect does not visit every sample of a task's parameters looking
    for futures (they hold none). Dask's task packing turns the quote (a
    tuple) into a plain tuple, so other runners get the value itself.
    """
    return quote(value) if tasks_share_this_process() else value


def summarize_parameter(value: Any) -> Any:
    """What the Prefect API stores of a flow parameter: JSON, and small.

    Prefect sends flow parameters to its API (which refuses more than 512 KB).
    Lists of samples become ``"<N samples: first-key ... last-key>"``,
    estimators their repr, samplepipe's lock managers their repr (a Redis
    password hidden) and other lock managers their class name; JSON values
    (import paths, dicts) pass unchanged.
    """
    if isinstance(value, quote):
        value = value.unquote()
    if (
        isinstance(value, list | tuple)
        and value
        and all(isinstance(s, Sample | SampleSet) for s in value[:1])
    ):
        first, last = (getattr(s, "key", "?") for s in (value[0], value[-1]))
        return f"<{len(value)} samples: {first} ... {last}>"
    if hasattr(value, "get_params"):
        return repr(value)[:2000]
    if _is_source(value):  # never iterated here: a stream is read once
        try:
            size = f"{len(value)} samples" if hasattr(value, "__len__") else "stream"
        except Exception:  # noqa: BLE001 - a summary, not a check
            size = "source"
        return f"<{type(value).__name__}: {size}>"
    if isinstance(value, CrashSafeFileLocks | RedisLocks):
        return repr(value)  # the folder or the URL, its password hidden
    if isinstance(value, LockManager):
        return f"<{type(value).__name__}>"  # its repr may hold credentials
    return value


def _in_process_heartbeats() -> contextlib.AbstractContextManager[Any]:
    """No flow-run heartbeats for a flow called in this process, by default.

    Prefect's flow engine runs a heartbeat thread that sleeps in 1 s steps and
    is joined when the run ends: every run paid up to 1 s (0.5 s on average)
    for heartbeats that only Prefect's zombie-run automation reads. A flow
    called in-process (a script, a notebook, ``samplepipe run``) reports its own
    end, so a top-level call runs without them; deployment runs (workers,
    ``serve``: the engine runs them without calling the flow object) keep
    Prefect's heartbeats, and so does a samplepipe flow called as a subflow.
    Setting ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` (environment or profile)
    keeps heartbeats for in-process calls too.
    """
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    context = get_settings_context()
    explicit = "heartbeat_frequency" in context.settings.flows.model_fields_set
    if explicit or FlowRunContext.get() is not None:
        return contextlib.nullcontext()
    # What `prefect.settings.temporary_settings` does, with the copy of these
    # settings kept: building one costs tens of milliseconds per run.
    source, quiet = _NO_HEARTBEATS.get("settings", (None, None))
    if source is not context.settings:
        source = context.settings
        quiet = source.copy_with_update(
            updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
        )
        _NO_HEARTBEATS["settings"] = (source, quiet)
    return SettingsContext(profile=context.profile, settings=quiet)


# The settings a top-level call last ran under, and their copy without heartbeats.
_NO_HEARTBEATS: dict[str, tuple[Any, Any]] = {}

# Set by `SampleFlow.__call__` for a top-level call in this process: the flow
# hands its samples back inside `quote` (see `returned`).
_CALLED_IN_PROCESS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "samplepipe_called_in_process", default=False
)


def returned(value: Any) -> Any:
    """What a flow returns: ``value``, quoted for a top-level in-process call.

    Prefect walks a flow's return value twice (to resolve futures, then to
    link each item to the run's state for later tasks), 3.6-7.5 ms per 1,000
    samples each on the project's machine. Neither applies to the outputs of
    a top-level call, which `SampleFlow.__call__` unquotes. Deployment runs,
    subflows, calls with ``return_state=True`` and runs that persist their
    result return ``value``.
    """
    if _CALLED_IN_PROCESS.get() and not should_persist_result():
        return quote(value)
    return value


# `Flow.__call__`'s own keyword arguments, given to Prefect as they are.
_CALL_OPTIONS = frozenset({"return_state", "wait_for"})


def _quoted(value: Any) -> Any:
    """A samples argument of a top-level call, quoted (see below).

    Lists and tuples, and sample sources (an iterable Prefect would consume
    or walk: a stream is read once, by the flow).
    """
    if isinstance(value, list | tuple):
        return quote(value) if value else value
    if _is_source(value):
        return quote(value)
    return value


def _is_source(value: Any) -> bool:
    """A sample source other than a list: iterable, or with ``batch``."""
    if isinstance(value, str | bytes | dict | quote) or hasattr(value, "get_params"):
        return False
    return callable(getattr(value, "batch", None)) or isinstance(value, Iterable)


class SampleFlow(Flow):
    """A Prefect flow that stores only summaries of in-memory parameters.

    Called in-process, it runs without flow-run heartbeats unless they are
    configured (see `_in_process_heartbeats`). A top-level call passes its
    list arguments (the samples) in `quote`, so that Prefect does not walk
    them looking for futures (a top-level call has none; 3.8-8.5 ms per
    1,000 samples on the project's machine), and gets the flow's outputs back
    the same way (see `returned`).
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        top = FlowRunContext.get() is None
        if top:
            args = tuple(_quoted(a) for a in args)
            kwargs = {
                k: v if k in _CALL_OPTIONS else _quoted(v) for k, v in kwargs.items()
            }
        token = _CALLED_IN_PROCESS.set(top and not kwargs.get("return_state"))
        try:
            with _in_process_heartbeats():
                result = super().__call__(*args, **kwargs)
        finally:
            _CALLED_IN_PROCESS.reset(token)
        return result.unquote() if isinstance(result, quote) else result

    def serialize_parameters(self, parameters):
        return super().serialize_parameters(
            {k: summarize_parameter(v) for k, v in parameters.items()}
        )

    def with_options(self, **kwargs):
        new = super().with_options(**kwargs)
        new.__class__ = SampleFlow
        return new


def sample_flow(**kwargs: Any) -> Callable[[Callable[..., Any]], SampleFlow]:
    """``@flow`` for samplepipe's flows (see `SampleFlow`)."""

    def decorate(fn):
        new = flow(**kwargs)(fn)
        new.__class__ = SampleFlow
        return new

    return decorate
