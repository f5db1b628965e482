"""samplepipe's flows against Prefect's floor and CheckpointWrapper, side by side.

    python bench/flows.py              # the full run recorded in bench/RESULTS.md
    python bench/flows.py --quick      # smaller sizes, one round: a smoke test

One command starts a local Prefect server on 127.0.0.1 (`samplepipe.server`,
its own PREFECT_HOME) and measures, alternating the cases round by round
(A B A B) so that a busy machine slows both sides alike:

1. the flow-run heartbeat: a bare ``@flow`` with Prefect's defaults and
   without heartbeats;
2. Prefect's floor: a bare ``@flow`` submitting the same number of trivial
   cached ``@task`` runs (persisted JSON results, a cache key hashed from the
   batch's keys, SERIALIZABLE isolation with Prefect's file lock manager, at
   most two batches in flight, samples passed quoted as samplepipe passes
   them) against `transform_pipeline` with the same
   batches, first run and fully cached run; samplepipe's own functions are
   timed in extra metered runs;
3. `transform_pipeline` and `fit_pipeline` against `CheckpointWrapper`, each
   case in a new process (timed inside it, after a warm-up), first run and
   re-run;
4. peak RSS of a 10,000 x 4096 transform flow against the same flow with
   tiny samples, each in a new process.

Every ratio compares figures of this one run. Each timed case starts and ends
with the server idle: its CPU time includes the server's work on the case's
task-run events (recorded seconds after the run returns), none of another's.
Nothing here is a test.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault(
    "PREFECT_HOME", tempfile.mkdtemp(prefix="samplepipe-bench-prefect-")
)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "ERROR"
os.environ["DO_NOT_TRACK"] = "1"

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve()
RESULTS: dict = {}


def say(*args):
    print(*args, flush=True)


def seconds_since(t0):
    return time.perf_counter() - t0


def server_cpu():
    """CPU seconds used so far by the local Prefect server (a child process)."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            if "uvicorn" in " ".join(child.cmdline()):
                cpu = child.cpu_times()
                total += cpu.user + cpu.system
        except psutil.Error:
            continue
    return total


def server_idle(limit=60.0, window=0.5, busy=0.05):
    """Wait until the server uses less than ``busy`` of a CPU over ``window`` s.

    The server records a run's task-run events after the run has returned
    (its task-run recorder drains them in batches, several seconds for 100
    task runs): without this wait that CPU time is counted in the next case.
    """
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        before = server_cpu()
        time.sleep(window)
        if server_cpu() - before < busy * window:
            return


class Clock:
    """Wall time, this process's CPU time and the server's CPU time of a block.

    CPU seconds are what the work itself costs: other jobs on a busy machine
    stretch the wall time, much less the CPU time. The server's CPU time runs
    until it is idle again after the block (`server_idle`): it includes its
    work on the block's events, and none of the previous block's.
    """

    def __enter__(self):
        server_idle()
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        self.s0 = server_cpu()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        server_idle()
        self.server = server_cpu() - self.s0


# ---------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------
def cheap_pipeline():
    from sklearn.pipeline import Pipeline

    from samplepipe.testing import CountingTransformer

    return Pipeline([("cheap", CountingTransformer(offset=1.0, stateless=True))])


def fit_pipeline_spec():
    """A cheap stateless step, then a PCA fitted on its output."""
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline

    from samplepipe.testing import CountingTransformer

    return Pipeline(
        [
            ("cheap", CountingTransformer(offset=1.0, stateless=True)),
            ("pca", PCA(n_components=8, random_state=0)),
        ]
    )


def wrapped(pipeline, features_dir, model_dir):
    """The same pipeline as CheckpointWrapper steps, as the flows lay them out."""
    from sklearn.pipeline import Pipeline

    from samplepipe import CheckpointWrapper, SampleWrapper
    from samplepipe.wrappers._base import estimator_requires_fit

    steps = []
    for name, est in pipeline.steps:
        model = (
            os.path.join(model_dir, f"{name}.pkl")
            if estimator_requires_fit(est)
            else None
        )
        steps.append(
            (
                name,
                CheckpointWrapper(
                    SampleWrapper(est),
                    features_dir=os.path.join(features_dir, name),
                    model_path=model,
                ),
            )
        )
    return Pipeline(steps)


def make_samples(n, d, prefix="s"):
    from samplepipe.testing import random_samples

    return random_samples(n, n_features=d, seed=0, prefix=prefix)


def read_all(samples):
    total = 0.0
    for s in samples:
        total += float(s.data[0])
    return total


def flow_kwargs(work, batch_size):
    return {
        "features_dir": os.path.join(work, "features"),
        "model_dir": os.path.join(work, "models"),
        "batch_size": batch_size,
    }


# ---------------------------------------------------------------------------
# Prefect's floor: a bare flow with the same task runs
# ---------------------------------------------------------------------------
def floor_flow():
    """``(flow, task)``: Prefect alone, with samplepipe's task options."""
    from prefect import flow, task
    from prefect.cache_policies import CachePolicy
    from prefect.futures import as_completed
    from prefect.locking.filesystem import FileSystemLockManager
    from prefect.transactions import IsolationLevel
    from prefect.utilities.annotations import quote

    from samplepipe.storage import keys_digest
    from samplepipe.tasks import unquoted

    class KeysPolicy(CachePolicy):
        """A digest of the batch's keys and a salt: the same style of key."""

        def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
            samples = unquoted(inputs["samples"])
            return keys_digest([f"salt={inputs['salt']}", *(s.key for s in samples)])

    policy = KeysPolicy(
        isolation_level=IsolationLevel.SERIALIZABLE,
        lock_manager=FileSystemLockManager(
            Path(tempfile.gettempdir()) / "samplepipe-bench-floor-locks"
        ),
    )

    @task(
        name="floor",
        task_run_name="floor[{start}:{stop}]",
        cache_policy=policy,
        persist_result=True,
        result_serializer="json",
        cache_result_in_memory=False,
        retries=2,
        retry_delay_seconds=1.0,
    )
    def trivial(samples, salt, start, stop):
        return {"start": start, "stop": stop, "n": len(unquoted(samples))}

    @flow(name="prefect-floor", validate_parameters=False)
    def bare(samples, salt, batch_size, in_flight=2):
        pending = [
            (a, min(a + batch_size, len(samples)))
            for a in range(0, len(samples), batch_size)
        ]
        running = []
        done = 0

        def submit():
            start, stop = pending.pop(0)
            # quoted, as samplepipe's flows pass them (Prefect does not visit
            # each sample looking for futures)
            running.append(
                trivial.submit(
                    samples=quote(samples[start:stop]),
                    salt=salt,
                    start=start,
                    stop=stop,
                )
            )

        while pending and len(running) < in_flight:
            submit()
        while running:
            future = next(as_completed(list(running)))
            running.remove(future)
            done += future.result()["n"]
            if pending:
                submit()
        return done

    return bare


def no_heartbeats():
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


# ---------------------------------------------------------------------------
# timing samplepipe's own functions (metered runs only)
# ---------------------------------------------------------------------------
class Meter:
    """Wall time and calls of named functions, across threads."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()
        self.undo = []

    def wrap(self, owner, attribute, label):
        original = getattr(owner, attribute)
        meter = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                dt, dc = time.perf_counter() - t0, time.thread_time() - c0
                with meter.lock:
                    meter.seconds[label] = meter.seconds.get(label, 0.0) + dt
                    meter.cpu[label] = meter.cpu.get(label, 0.0) + dc
                    meter.calls[label] = meter.calls.get(label, 0) + 1

        setattr(owner, attribute, timed)
        self.undo.append((owner, attribute, original))

    def __enter__(self):
        from samplepipe import CheckpointWrapper, _schedule, _summary, flows, tasks

        lock_cls = type(tasks.STEP_CACHE.lock_manager)
        # per flow run
        self.wrap(flows, "_prepare", "flow: check inputs, wrap steps (_prepare)")
        self.wrap(flows, "_load_models", "flow: load models (_load_models)")
        self.wrap(_schedule.Progress, "__init__", "flow: progress artifact created")
        self.wrap(_summary, "_summary", "flow: summary artifact and log")
        # per task run / per batch
        self.wrap(tasks.StepCachePolicy, "compute_key", "task: cache key")
        self.wrap(tasks.ManifestSerializer, "loads", "task: manifest read and checked")
        self.wrap(tasks.ManifestSerializer, "dumps", "task: manifest written")
        self.wrap(tasks.BatchManifest, "validate", "flow: manifest validated")
        self.wrap(tasks.BatchManifest, "samples", "outputs built from manifests")
        self.wrap(tasks, "batch_identity", "flow: batch identity (cache key input)")
        self.wrap(_schedule.Progress, "advance", "flow: progress update")
        self.wrap(tasks, "_transform_isolating", "task: transform (the work)")
        self.wrap(lock_cls, "acquire_lock", "task: lock acquired")
        self.wrap(lock_cls, "release_lock", "task: lock released")
        self.wrap(lock_cls, "is_locked", "task: lock checked")
        self.wrap(lock_cls, "is_lock_holder", "task: lock holder checked")
        self.wrap(lock_cls, "wait_for_lock", "task: lock waited")
        # parts of the above
        self.wrap(CheckpointWrapper, "step_identity", "  (in the above) step identity")
        self.wrap(
            CheckpointWrapper, "input_identities", "  (in the above) input identities"
        )
        return self

    def __exit__(self, *exc):
        for owner, attribute, original in reversed(self.undo):
            setattr(owner, attribute, original)

    def table(self):
        return {
            k: {"seconds": self.seconds[k], "cpu": self.cpu[k], "calls": self.calls[k]}
            for k in self.seconds
        }


# ---------------------------------------------------------------------------
# 1 and 2: in this process, against the server
# ---------------------------------------------------------------------------
def bench_heartbeat(rounds):
    from prefect import flow

    @flow(name="bare-empty")
    def empty():
        return 1

    empty()  # warm-up
    times = {"on": [], "off": []}
    for r in range(rounds):
        for case in ("on", "off") if r % 2 == 0 else ("off", "on"):
            with Clock() as clock:
                if case == "on":
                    empty()
                else:
                    with no_heartbeats():
                        empty()
            times[case].append(clock.wall)
    on, off = times["on"], times["off"]
    say(
        f"  bare flow, no task: heartbeats on {fmt(on)} s; off {fmt(off)} s; "
        f"join cost {statistics.median(on) - statistics.median(off):+.3f} s (median), "
        f"{min(on) - min(off):+.3f} s (best)"
    )
    RESULTS["heartbeat"] = times


def bench_floor(configs, rounds, work):
    from samplepipe.flows import transform_pipeline

    bare = floor_flow()
    for label, n, d, batch in configs:
        samples = make_samples(n, d)
        n_tasks = -(-n // batch)
        say(f"\n  {label}: {n} x {d}, batch_size={batch}: {n_tasks} task runs")
        cases = ("floor first", "sp first", "floor cached", "sp cached")
        walls: dict[str, list[float]] = {k: [] for k in cases}
        cpus: dict[str, list[float]] = {k: [] for k in cases}
        # warm-up both (imports, connections, the step's code identity)
        with no_heartbeats():
            bare(make_samples(4, d, prefix="warm"), f"warm-{label}", batch)
        transform_pipeline(
            cheap_pipeline(),
            make_samples(4, d, prefix="warm"),
            **flow_kwargs(os.path.join(work, f"warm-{label}"), batch),
        )
        for r in range(rounds):
            salt = f"{label}-{r}-{time.time_ns()}"
            kw = flow_kwargs(os.path.join(work, f"{label}-{r}"), batch)

            def floor(salt=salt, samples=samples, batch=batch, n=n):
                with no_heartbeats():
                    assert bare(samples, salt, batch) == n

            def sp(kw=kw, samples=samples, n=n):
                assert len(transform_pipeline(cheap_pipeline(), samples, **kw)) == n

            order = [("floor", floor), ("sp", sp)]
            if r % 2:
                order.reverse()
            for phase in ("first", "cached"):
                for who, fn in order:
                    with Clock() as clock:
                        fn()
                    walls[f"{who} {phase}"].append(clock.wall)
                    cpus[f"{who} {phase}"].append(clock.cpu + clock.server)
        # one metered pair of samplepipe runs (not in the timings above)
        kw = flow_kwargs(os.path.join(work, f"{label}-metered"), batch)
        metered = {}
        for phase in ("first", "cached"):
            with Meter() as meter, Clock() as clock:
                transform_pipeline(cheap_pipeline(), samples, **kw)
            metered[phase] = {"total": clock.wall, **meter.table()}
        for k in cases:
            say(
                f"    {k:14s} wall {fmt(walls[k])} s; "
                f"CPU (flow + server) {fmt(cpus[k])} s"
            )
        RESULTS.setdefault("floor", {})[label] = {
            "n": n,
            "d": d,
            "batch_size": batch,
            "tasks": n_tasks,
            "wall": walls,
            "cpu": cpus,
            "metered": metered,
        }
        for phase in ("first", "cached"):
            a, b = f"sp {phase}", f"floor {phase}"
            for what, values, pick in (
                ("wall, medians", walls, statistics.median),
                ("wall, best", walls, min),
                ("CPU, medians", cpus, statistics.median),
            ):
                extra = pick(values[a]) - pick(values[b])
                say(
                    f"    {phase}: samplepipe - floor ({what}) = {extra:+.3f} s per "
                    f"flow run, {1000 * extra / n_tasks:+.1f} ms per task run"
                )
        for phase in ("first", "cached"):
            say(
                f"    metered {phase} run: {metered[phase]['total']:.3f} s "
                "(wall and CPU of the calling thread, per function)"
            )
            for k, v in metered[phase].items():
                if k != "total":
                    say(
                        f"      {k:44s} {v['seconds']:7.3f} s {v['cpu']:7.3f} s CPU "
                        f"{v['calls']:5d} calls {1000 * v['seconds'] / v['calls']:8.2f}"
                        f" / {1000 * v['cpu'] / v['calls']:.2f} ms/call"
                    )


def fmt(values):
    return "/".join(f"{v:.3f}" for v in values)


# ---------------------------------------------------------------------------
# 3: flows against CheckpointWrapper, each in a new process
# ---------------------------------------------------------------------------
def child_run(mode, work, n, d, batch):
    """In a new process: warm up, then time one case; print JSON."""
    from samplepipe.flows import fit_pipeline, transform_pipeline

    samples = make_samples(n, d)
    warm = make_samples(8, d, prefix="warm")
    spec = fit_pipeline_spec if mode.startswith("fit") else cheap_pipeline
    kw = flow_kwargs(work, batch)
    warm_kw = flow_kwargs(os.path.join(work, "warm"), batch)
    flow = fit_pipeline if mode.startswith("fit") else transform_pipeline
    if "flow" in mode:
        flow(spec(), warm, **warm_kw)

        def case():
            out = flow(spec(), samples, **kw)
            if mode.startswith("transform"):
                read_all(out)
    else:
        warm_pipe = wrapped(spec(), warm_kw["features_dir"], warm_kw["model_dir"])
        warm_pipe.fit(warm) if mode.startswith("fit") else warm_pipe.transform(warm)

        def case():
            pipe = wrapped(spec(), kw["features_dir"], kw["model_dir"])
            if mode.startswith("fit"):
                pipe.fit(samples)
            else:
                read_all(pipe.transform(samples))

    t0, c0 = time.perf_counter(), time.process_time()
    case()
    wall, cpu = seconds_since(t0), time.process_time() - c0
    print(json.dumps({"mode": mode, "seconds": wall, "cpu": cpu}))


def run_child(*args):
    out = subprocess.run(
        [sys.executable, str(HERE), "--child", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_wrapper(rounds, work, n, d, batch):
    say(f"\n3. flows against CheckpointWrapper, {n} x {d}, batches of {batch}")
    say("   (each case in a new process, timed inside it after a warm-up;")
    say("   CPU: the process's, plus the server's while a flow's process ran)")
    walls: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    for kind in ("transform", "fit"):
        for r in range(rounds):
            dirs = {
                who: os.path.join(work, f"{kind}-{who}-{r}")
                for who in ("wrapper", "flow")
            }
            order = ["wrapper", "flow"] if r % 2 == 0 else ["flow", "wrapper"]
            for phase in ("first", "rerun"):
                for who in order:
                    mode = f"{kind}-{who}-{phase}"
                    server_idle()
                    s0 = server_cpu()
                    result = run_child("run", mode, dirs[who], n, d, batch)
                    server_idle()
                    server = server_cpu() - s0 if who == "flow" else 0.0
                    walls.setdefault(mode, []).append(result["seconds"])
                    cpus.setdefault(mode, []).append(result["cpu"] + server)
                    say(
                        f"    {mode:28s} {result['seconds']:7.3f} s, CPU "
                        f"{result['cpu']:.3f} s + server {server:.3f} s"
                    )
            for folder in dirs.values():
                shutil.rmtree(folder, ignore_errors=True)
    RESULTS["wrapper"] = {
        "n": n,
        "d": d,
        "batch_size": batch,
        "wall": walls,
        "cpu": cpus,
    }
    for kind in ("transform", "fit"):
        for phase in ("first", "rerun"):
            flow_t = walls[f"{kind}-flow-{phase}"]
            wrap_t = walls[f"{kind}-wrapper-{phase}"]
            pairs = [f / w for f, w in zip(flow_t, wrap_t, strict=True)]
            cpu_pairs = [
                f / w
                for f, w in zip(
                    cpus[f"{kind}-flow-{phase}"],
                    cpus[f"{kind}-wrapper-{phase}"],
                    strict=True,
                )
            ]
            say(
                f"    {kind} {phase}: flow {fmt(flow_t)} s, wrapper {fmt(wrap_t)} s; "
                f"ratio per round {fmt(pairs)}, "
                f"median {statistics.median(pairs):.2f}x, "
                f"best/best {min(flow_t) / min(wrap_t):.2f}x; CPU ratio median "
                f"{statistics.median(cpu_pairs):.2f}x"
            )


# ---------------------------------------------------------------------------
# 4: memory, each in a new process
# ---------------------------------------------------------------------------
def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child_memory(work, n, d, batch):
    """In a new process: peak RSS of one transform flow over lazy samples."""
    import gc

    from samplepipe import DelayedSample
    from samplepipe.flows import transform_pipeline

    def loader(i):
        def load():
            return np.random.default_rng(i).normal(size=d)

        return load

    samples = [DelayedSample(loader(i), key=f"s/{i:06d}") for i in range(n)]
    transform_pipeline(
        cheap_pipeline(),
        [DelayedSample(loader(i), key=f"w/{i}") for i in range(10)],
        **flow_kwargs(os.path.join(work, "warm"), batch),
    )
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = transform_pipeline(cheap_pipeline(), samples, **flow_kwargs(work, batch))
    seconds = seconds_since(t0)
    assert len(out) == n
    peak = _status_kib("VmHWM")
    print(json.dumps({"before_kib": before, "peak_kib": peak, "seconds": seconds}))


def bench_memory(rounds, work, n, d_big, d_tiny, batch):
    say(f"\n4. peak RSS of a transform flow, {n} samples, batches of {batch}")
    growth = {d_tiny: [], d_big: []}
    for r in range(rounds):
        for d in (d_tiny, d_big) if r % 2 == 0 else (d_big, d_tiny):
            folder = os.path.join(work, f"mem-{d}-{r}")
            result = run_child("memory", folder, n, d, batch)
            mib = (result["peak_kib"] - result["before_kib"]) / 1024
            growth[d].append(mib)
            say(
                f"    {n} x {d}: peak RSS +{mib:.0f} MiB over the start "
                f"({result['seconds']:.1f} s)"
            )
            shutil.rmtree(folder, ignore_errors=True)
    batch_mib = batch * d_big * 8 / 2**20
    data = statistics.median(growth[d_big]) - statistics.median(growth[d_tiny])
    say(
        f"    data's share: {data:.0f} MiB = {data / batch_mib:.2f} batches of "
        f"{batch_mib:.1f} MiB (target <= 3)"
    )
    RESULTS["memory"] = {
        "n": n,
        "batch_size": batch,
        "growth_mib": {str(k): v for k, v in growth.items()},
        "batch_mib": batch_mib,
    }


# ---------------------------------------------------------------------------
def machine():
    import prefect
    import sklearn

    load = os.getloadavg()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "prefect": prefect.__version__,
        "scikit-learn": sklearn.__version__,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--only", nargs="*", help="heartbeat floor wrapper memory")
    parser.add_argument("--json", help="also write all figures to this file")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "run":
            mode, work, n, d, batch = rest
            child_run(mode, work, int(n), int(d), int(batch))
        else:
            work, n, d, batch = rest
            child_memory(work, int(n), int(d), int(batch))
        return

    import samplepipe
    from samplepipe.server import prefect_api

    rounds = args.rounds or (1 if args.quick else 3)
    only = set(args.only or ["heartbeat", "floor", "wrapper", "memory"])
    say(f"samplepipe flows benchmark: {json.dumps(machine())}")
    say(f"samplepipe from {os.path.dirname(samplepipe.__file__)}")
    work = tempfile.mkdtemp(prefix="samplepipe-bench-flows-")
    t0 = time.perf_counter()
    try:
        with prefect_api() as url:
            say(f"local Prefect server {url} ready in {seconds_since(t0):.1f} s")
            if "heartbeat" in only:
                say("\n1. flow-run heartbeat join")
                bench_heartbeat(3 if args.quick else 7)
            if "floor" in only:
                say("\n2. Prefect's floor against transform_pipeline")
                configs = (
                    [("large", 2000, 128, 200), ("small", 400, 4, 20)]
                    if args.quick
                    else [
                        ("large", 10_000, 128, 1000),
                        ("small", 2000, 4, 20),
                        ("one batch", 20, 4, 20),
                    ]
                )
                bench_floor(configs, rounds, work)
            if "wrapper" in only:
                n = 2000 if args.quick else 10_000
                bench_wrapper(rounds, work, n, 128, 1000)
            if "memory" in only:
                n = 2000 if args.quick else 10_000
                bench_memory(
                    args.rounds or (1 if args.quick else 2),
                    work,
                    n,
                    4096,
                    4,
                    200 if args.quick else 1000,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS["machine"] = machine()
    say(f"\nload average at the end: {RESULTS['machine']['load_average']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
