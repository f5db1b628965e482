"""samplepipe benchmarks: checkpointing and orchestration cost, side by side.

    python bench/run.py            # the full run recorded in bench/RESULTS.md
    python bench/run.py --quick    # smaller sizes, for a smoke test
    python bench/run.py --sections 1   # sections 1 and 2 only
    python bench/run.py --sections floor   # first run / raw h5py, new processes

Every figure is measured in this one run on this machine; ratios compare
figures of the same run. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

os.environ.setdefault(
    "PREFECT_HOME", tempfile.mkdtemp(prefix="samplepipe-bench-prefect-")
)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "ERROR"

import h5py  # noqa: E402
import numpy as np  # noqa: E402

ROWS = []
ROUNDS = 3  # section 1: each case's best of this many rounds counts


def timed(fn, repeat=1):
    best = float("inf")
    result = None
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def record(section, name, seconds, n=None, note=""):
    row = {"section": section, "name": name, "seconds": seconds, "n": n, "note": note}
    ROWS.append(row)
    rate = f"{n / seconds:10.0f}/s" if n else " " * 12
    print(f"  {name:58s} {seconds:9.3f} s {rate} {note}", flush=True)
    return seconds


def ratio(label, a, b):
    value = a / b
    ROWS.append({"section": "ratio", "name": label, "ratio": value})
    print(f"  {label:58s} {value:9.2f}x", flush=True)
    return value


def print_rounds(cases):
    """One line: each case's name and the seconds of all its rounds."""
    text = "; ".join(name + "".join(f" {t:.2f}" for t in ts) for name, ts in cases)
    print(f"  all rounds (s): {text}")


def forget_validated():
    """Forget, as a new process would, which checkpoints this one validated.

    Each file is then trusted from its folder's journal on disk, or read.
    """
    from samplepipe.storage import VALIDATED
    from samplepipe.storage.journal import JOURNAL

    VALIDATED.clear()
    JOURNAL.clear()


def make_samples(n, d, prefix="s", start=0, seed=0):
    from samplepipe import Sample

    rng = np.random.default_rng(seed)
    data = rng.normal(size=(n, d))
    return [Sample(data[i], key=f"{prefix}/{start + i:06d}") for i in range(n)]


def cheap_step():
    from samplepipe import SampleWrapper
    from samplepipe.testing import CountingTransformer

    return SampleWrapper(CountingTransformer(offset=1.0, stateless=True))


def read_all(samples):
    total = 0.0
    for s in samples:
        total += float(s.data[0])
    return total


# ---------------------------------------------------------------------------
def bench_checkpoint(n, d, work, flow_round=None):
    """Section 1 (a)-(e): one cheap transformer over n x d samples.

    ``flow_round`` (from `flow_rounds`), if given, runs the flow's cases of
    section 1 (f) in each round, right after the wrapper's.
    """
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    from samplepipe import CheckpointWrapper
    from samplepipe.testing import CountingTransformer

    print(f"\n1. {n} samples x {d} float64 through a cheap transformer")
    samples = make_samples(n, d)
    step = cheap_step()
    plain = record(
        "1",
        "(a) no checkpoint: SampleWrapper.transform",
        timed(lambda: step.transform(samples), repeat=3)[0],
        n,
    )

    # Raw h5py and CheckpointWrapper alternate, each into a fresh folder, three
    # rounds; the best round of each counts (page-cache write-back makes the
    # disk noisy on this machine).
    X = np.stack([s.data for s in samples]) + 1.0
    features = None
    raw_ws, raw_rs, firsts, agains, freshes = [], [], [], [], []
    flows = []
    for round_ in range(ROUNDS):
        folder = os.path.join(work, f"raw{round_}")
        os.makedirs(folder)

        def raw_write(folder=folder):
            for i in range(len(samples)):
                with h5py.File(os.path.join(folder, f"{i}.h5"), "w") as f:
                    f["array"] = X[i]

        def raw_read(folder=folder):
            total = 0.0
            for i in range(len(samples)):
                with h5py.File(os.path.join(folder, f"{i}.h5"), "r") as f:
                    total += float(f["array"][()][0])
            return total

        raw_ws.append(timed(raw_write)[0])
        raw_rs.append(timed(raw_read)[0])
        features = os.path.join(work, f"ckpt{round_}")
        wrapper = CheckpointWrapper(cheap_step(), features_dir=features)
        firsts.append(timed(lambda w=wrapper: w.transform(samples))[0])
        agains.append(timed(lambda w=wrapper: read_all(w.transform(samples)))[0])

        def rerun_fresh(features=features):
            forget_validated()
            fresh = CheckpointWrapper(cheap_step(), features_dir=features)
            return read_all(fresh.transform(samples))

        freshes.append(timed(rerun_fresh)[0])
        shutil.rmtree(folder)
        if flow_round is not None:
            flows.append(flow_round.round(samples, round_))
    raw_w = record("1", "(b) raw h5py: write one file per sample", min(raw_ws), n)
    raw_r = record("1", "(b) raw h5py: read one file per sample", min(raw_rs), n)
    first = record(
        "1", "(c) CheckpointWrapper first run (compute + write)", min(firsts), n
    )
    again = record(
        "1", "(d) CheckpointWrapper re-run, data read (same process)", min(agains), n
    )
    fresh = record(
        "1",
        "(d') re-run, data read (as a new process: journal or files read)",
        min(freshes),
        n,
    )
    print_rounds(
        [("raw write", raw_ws), ("first run", firsts), ("raw read", raw_rs)]
        + [("re-run", agains), ("re-run as a new process", freshes)]
    )

    from joblib import Memory

    memory = Memory(os.path.join(work, "joblib"), verbose=0)
    Xin = np.stack([s.data for s in samples])

    def sk_pipeline():
        return Pipeline(
            [
                ("cheap", CountingTransformer(offset=1.0, stateless=True)),
                ("last", FunctionTransformer()),
            ],
            memory=memory,
        )

    sk_first = record(
        "1",
        "(e) sklearn Pipeline(memory=...) first fit_transform",
        timed(lambda: sk_pipeline().fit_transform(Xin))[0],
        n,
    )
    sk_cached = record(
        "1",
        "(e) sklearn Pipeline(memory=...) cached fit_transform",
        timed(lambda: sk_pipeline().fit_transform(Xin))[0],
        n,
    )
    print()
    ratio("(c)/(b) CheckpointWrapper first run / raw h5py write", first, raw_w)
    ratio("(d)/(b) re-run with data read / raw h5py read", again, raw_r)
    ratio("(d')/(b) new-process re-run / raw h5py read", fresh, raw_r)
    ratio("(c)/(a) first run / no checkpoint", first, plain)
    ratio("(c)/(e) first run / sklearn memory first run", first, sk_first)
    ratio("(d)/(e) re-run / sklearn memory cached run", again, sk_cached)
    print(f"  first run: {n / first:.0f} samples/s; re-run: {n / again:.0f} samples/s")
    if flows:
        flow_ratios(n, flows, first, again, fresh)
    return {"samples": samples, "features": features}


def flow_rounds(d, work):
    """Section 1 (f): the Prefect flow, in the rounds of section 1 (c)-(d').

    Each round runs the flow into a fresh folder right after the wrapper's
    cases of the same round: its first run, its fully cached run in the same
    process (data read), and a cached run as a new process would see it (the
    in-memory caches of validated files cleared, as for (d')).

    Returns ``round(samples, round_)`` (the three seconds of one round),
    ``pipe()``, ``kw(round_)`` (the flow's folders of a round) and ``log`` (the
    step's call log), for section 2.
    """
    from sklearn.pipeline import Pipeline

    from samplepipe.flows import transform_pipeline
    from samplepipe.testing import CountingTransformer

    log = os.path.join(work, "flow.log")

    def pipe():
        return Pipeline(
            [("cheap", CountingTransformer(offset=1.0, stateless=True, log_path=log))]
        )

    def kw(round_):
        return {
            "features_dir": os.path.join(work, f"flow{round_}"),
            "model_dir": os.path.join(work, f"m{round_}"),
            "batch_size": 1000,
        }

    transform_pipeline(pipe(), make_samples(10, d, prefix="warm"), **kw("warm"))

    def run(samples, round_):
        def cached_fresh():
            forget_validated()
            return read_all(transform_pipeline(pipe(), samples, **kw(round_)))

        first = timed(lambda: transform_pipeline(pipe(), samples, **kw(round_)))[0]
        again = timed(
            lambda: read_all(transform_pipeline(pipe(), samples, **kw(round_)))
        )[0]
        return first, again, timed(cached_fresh)[0]

    return SimpleNamespace(round=run, pipe=pipe, kw=kw, log=log)


def flow_ratios(n, flows, first, again, fresh):
    """Record section 1 (f) and its ratios to the wrapper's best rounds."""
    firsts, agains, freshes = zip(*flows, strict=True)
    print("\n1 (f). transform_pipeline flow, batches of 1000, in the same rounds")
    f_first = record("1", "(f) flow first run (compute + write)", min(firsts), n)
    f_again = record(
        "1", "(f) flow fully cached run, data read (same process)", min(agains), n
    )
    f_fresh = record(
        "1",
        "(f') flow fully cached run, data read (as a new process)",
        min(freshes),
        n,
    )
    print_rounds(
        [("first run", firsts), ("cached", agains)]
        + [("cached as a new process", freshes)]
    )
    print()
    ratio("(f)/(c) flow first run / CheckpointWrapper first run", f_first, first)
    ratio("(f)/(d) flow cached run / CheckpointWrapper re-run", f_again, again)
    ratio("(f')/(d') the same, as new processes", f_fresh, fresh)


def bench_incremental(n, d, ckpt, flow):
    """Section 2: 100 new samples among n checkpointed ones."""
    from samplepipe.flows import transform_pipeline
    from samplepipe.testing import count_rows

    samples = ckpt["samples"]
    # the flow's folders of the last round, as ``ckpt["features"]`` for the wrapper
    pipe, kw, log = flow.pipe, flow.kw(ROUNDS - 1), flow.log
    print(f"\n2. incremental: {n} checkpointed, 100 new")
    more = samples + make_samples(100, d, start=n, seed=1)
    before = count_rows(log, "transform")
    t = record(
        "2",
        "flow: 100 new samples among the rest",
        timed(lambda: transform_pipeline(pipe(), more, **kw))[0],
        len(more),
    )
    computed = count_rows(log, "transform") - before
    print(f"  computed {computed} samples")
    ROWS.append({"section": "2", "name": "computed", "value": computed})
    from samplepipe import CheckpointWrapper

    wrapper = CheckpointWrapper(cheap_step(), features_dir=ckpt["features"])
    record(
        "2",
        "CheckpointWrapper: 100 new samples among the rest",
        timed(lambda: wrapper.transform(more))[0],
        len(more),
    )
    return t


def bench_cache_key(sizes):
    """Section 3: cost of the cache key of a batch given no identities.

    For in-memory samples that includes a content digest of each sample's data
    (exact identities, issue 12): the flows hash each batch once and give the
    task the identities; checkpoint-backed samples are never read.
    """
    from samplepipe import CheckpointWrapper, Sample
    from samplepipe.tasks import STEP_CACHE

    print("\n3. cache key cost")
    step = CheckpointWrapper(cheap_step(), features_dir="unused")

    class Ctx:  # what compute_key reads of Prefect's task run context
        class task:
            name = "transform"

    tiny = np.zeros(4)
    big = np.zeros(1024 * 1024 // 8)  # 1 MB, shared: memory stays small
    for n in sizes:
        for label, data in (("tiny", tiny), ("1 MB", big)):
            samples = [Sample(data, key=f"subject/{i:07d}") for i in range(n)]
            seconds, _ = timed(
                lambda s=samples: STEP_CACHE.compute_key(
                    Ctx, {"step": step, "samples": s}, {}
                ),
                repeat=3,
            )
            record("3", f"cache key, {n} keys, {label} samples", seconds, n)


def scale_child(n, d, batch_size, work):
    """Run in a subprocess: one flow over n lazily generated samples; print JSON."""
    from prefect.testing.utilities import prefect_test_harness
    from sklearn.pipeline import Pipeline

    from samplepipe import DelayedSample
    from samplepipe.flows import transform_pipeline
    from samplepipe.testing import CountingTransformer

    def loader(i):
        def load():
            return np.random.default_rng(i).normal(size=d)

        return load

    samples = [DelayedSample(loader(i), key=f"s/{i:06d}") for i in range(n)]
    pipe = Pipeline([("cheap", CountingTransformer(offset=1.0, stateless=True))])
    kw = {
        "features_dir": os.path.join(work, "f"),
        "model_dir": os.path.join(work, "m"),
        "batch_size": batch_size,
    }
    with prefect_test_harness(server_startup_timeout=90):
        transform_pipeline(pipe, samples[:10], **kw)  # warm-up (and server start)
        gc.collect()
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_now = _rss()
        t0 = time.perf_counter()
        out = transform_pipeline(pipe, samples, **kw)
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "n": n,
                "d": d,
                "seconds": seconds,
                "outputs": len(out),
                "peak_kib": peak,
                "baseline_peak_kib": baseline,
                "rss_before_kib": rss_now,
            }
        )
    )


def _rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def bench_scale(points, work):
    """Section 4: time per sample and peak memory of the flow, in child processes."""
    print("\n4. scale: transform_pipeline over lazily generated samples")
    for n, d, batch in points:
        folder = tempfile.mkdtemp(dir=work)
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--scale-child",
                str(n),
                str(d),
                str(batch),
                folder,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        grew = (result["peak_kib"] - result["rss_before_kib"]) / 1024
        batch_mb = batch * d * 8 / 2**20
        record(
            "4",
            f"{n} x {d}, batches of {batch}",
            result["seconds"],
            n,
            f"{1e6 * result['seconds'] / n:.0f} us/sample; peak RSS +{grew:.0f} MiB "
            f"over the start (one batch of data: {batch_mb:.0f} MiB)",
        )
        ROWS.append(
            {
                "section": "4",
                "name": f"memory {n}x{d}",
                "peak_growth_mib": grew,
                "batch_mib": batch_mb,
            }
        )
        shutil.rmtree(folder, ignore_errors=True)


def bench_dask(n, d, work):
    """Section 5: the same checkpointed transform on a 2-worker cluster."""
    from samplepipe import ToDaskBag, wrap
    from samplepipe.testing import local_cluster

    print(f"\n5. Dask: checkpointed transform of {n} x {d}")
    samples = make_samples(n, d)
    single = wrap(["checkpoint"], cheap_step(), features_dir=os.path.join(work, "d1"))
    one = record(
        "5",
        "one process (CheckpointWrapper)",
        timed(lambda: single.transform(samples))[0],
        n,
    )
    with local_cluster() as client:
        dasked = wrap(
            ["checkpoint", "dask"], cheap_step(), features_dir=os.path.join(work, "d2")
        )

        def run():
            bag = ToDaskBag(npartitions=8).transform(samples)
            return dasked.transform(bag).compute(scheduler=client)

        two = record(
            "5", "2-worker LocalCluster (incl. shipping samples)", timed(run)[0], n
        )
    ratio("2 workers / one process", two, one)


# ---------------------------------------------------------------------------
# section floor: the files layout's first run against a raw h5py write loop,
# each case timed in a process of its own (issue 25)
# ---------------------------------------------------------------------------
def _double(X):
    return np.asarray(X) * 2


def floor_child(case, n, d, folder):
    """Run in a subprocess: one case of section floor; print JSON.

    Imports and data generation come before the clock; ``folder`` is empty
    (``-`` on the command line: a new temporary folder, removed after; for
    ``farm-bench --vs``, which starts each run the same way).
    ``raw``: the loop a user writes with h5py. ``wrapper``: the default
    one-file-per-sample layout, every output's ``data`` read. ``promises``:
    what each promise of the wrapper costs alone, per sample.
    """
    from sklearn.preprocessing import FunctionTransformer

    from samplepipe import Sample, wrap

    X = np.random.default_rng(0).normal(size=(n, d))
    samples = [Sample(X[i], key=f"{i:06d}") for i in range(n)]
    gc.collect()
    if case == "promises":
        print(json.dumps(promise_costs(X, folder)))
        return
    t0 = time.perf_counter()
    if case == "raw":
        for i in range(n):
            with h5py.File(f"{folder}/{i:06d}.h5", "w") as h:
                h["array"] = X[i] * 2
    else:
        step = wrap(["sample", "checkpoint"], FunctionTransformer(_double))
        step.set_params(features_dir=folder)
        out = step.transform(samples)
        for s in out:
            s.data  # noqa: B018 - reading is the point
    seconds = time.perf_counter() - t0
    print(json.dumps({"case": case, "seconds": seconds}))


def promise_costs(X, folder):
    """Microseconds per sample of each promise of a first run, measured alone.

    Each loop does one promise's work for every sample of ``X`` (as
    `CheckpointWrapper` does it for a payload of this size) and nothing else.
    """
    from samplepipe.storage import hdf5
    from samplepipe.storage.files import Stamp, remove_stale_temporaries, temporary_name
    from samplepipe.storage.journal import JOURNAL

    n = len(X)
    record = "1:" + "s" * 32 + ":" + "v" * 33 + ":" + "c" * 32 + ":a:000000"
    blob = hdf5.image(X[0], record)
    paths = [f"{folder}/{i:06d}.h5" for i in range(n)]

    def per_sample(fn):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t0) / n

    def write(name):
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        os.write(fd, blob)
        os.close(fd)

    def writes():
        for path in moves:
            write(path)

    def names():
        for path in paths:
            temporary_name(path)

    def replaces():
        for tmp, path in zip(moves, paths):
            os.replace(tmp, path)

    def images():
        for x in X:
            hdf5.image(x, record)

    def hdf5_images():  # what the templates save
        for x in X:
            hdf5.build_image(x, record)

    def checksums():  # one when written, one when loaded
        for x in X:
            hdf5.checksum(x, "a")
            hdf5.checksum(x, "a")

    def stats():  # the stamp after writing, the stamp check before loading
        for path in paths:
            os.stat(path)
            os.stat(path)

    def journaled():  # a line per file written, appended once per call
        JOURNAL.add([(path, Stamp.of(st), record) for path, st in found])

    moves = [temporary_name(path) for path in paths]
    costs = {"write a file (os.open, os.write, os.close)": per_sample(writes)}
    costs["temporary name"] = per_sample(names)
    costs["os.replace"] = per_sample(replaces)
    costs["file image (template)"] = per_sample(images)
    costs["file image built by HDF5 (replaced)"] = per_sample(hdf5_images)
    costs["checksums (write + load)"] = per_sample(checksums)
    costs["stamps (write + load)"] = per_sample(stats)
    # once per folder and call, here over a folder of n checkpoints
    costs["stale-temporary listing (one per call)"] = per_sample(
        lambda: remove_stale_temporaries(folder)
    )
    os.environ["SAMPLEPIPE_JOURNAL"] = os.path.join(folder, "journal")
    found = [(path, os.stat(path)) for path in paths]
    costs["journal line"] = per_sample(journaled)
    return costs


def bench_floor(n, d, work, rounds=ROUNDS):
    """Section floor: first run of the files layout / raw h5py write loop.

    Each case runs in a new process (imports and data generation excluded),
    the two cases alternating, ``rounds`` rounds; each side's best round
    counts; the ratio of each round's pair is printed too (on a loaded machine
    one lucky round decides a best of 3). The load average is printed beside
    each round: this machine is shared, and a round run beside other work is
    slower.
    """
    print(f"\nfloor. {n} x {d} float64, first run, each case in its own process")
    times: dict[str, list[float]] = {"raw": [], "wrapper": []}
    for round_ in range(rounds):
        for case in ("raw", "wrapper"):
            folder = tempfile.mkdtemp(dir=work, prefix=f"floor-{case}-")
            load = os.getloadavg()[0]
            out = subprocess.run(
                [sys.executable, __file__, "--floor-child", case, str(n), str(d)]
                + [folder],
                capture_output=True,
                text=True,
                check=True,
            )
            seconds = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
            times[case].append(seconds)
            print(
                f"  round {round_ + 1} {case:8s} {seconds:7.3f} s "
                f"{n / seconds:7.0f}/s  load average {load:.2f} "
                f"(after: {os.getloadavg()[0]:.2f})",
                flush=True,
            )
            shutil.rmtree(folder, ignore_errors=True)
    raw = record("floor", "raw h5py write loop, new process", min(times["raw"]), n)
    first = record(
        "floor",
        "files layout first run + data read, new process",
        min(times["wrapper"]),
        n,
    )
    ratio("first run / raw h5py write loop (best of each)", first, raw)
    paired = sorted(w / r for w, r in zip(times["wrapper"], times["raw"]))
    print(
        "  the same, round by round (each after its raw loop): "
        + " ".join(f"{x:.2f}x" for x in paired)
        + f"; median {paired[len(paired) // 2]:.2f}x"
    )
    folder = tempfile.mkdtemp(dir=work, prefix="floor-promises-")
    out = subprocess.run(
        [sys.executable, __file__, "--floor-child", "promises", str(n), str(d)]
        + [folder],
        capture_output=True,
        text=True,
        check=True,
    )
    shutil.rmtree(folder, ignore_errors=True)
    print("  each promise alone, us per sample:")
    for name, us in json.loads(out.stdout.strip().splitlines()[-1]).items():
        ROWS.append({"section": "floor", "name": name, "us_per_sample": us})
        print(f"    {name:40s} {us:8.1f} us")


def versions():
    import cloudpickle
    import dask
    import joblib
    import prefect
    import sklearn

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "scikit-learn": sklearn.__version__,
        "prefect": prefect.__version__,
        "dask": dask.__version__,
        "joblib": joblib.__version__,
        "cloudpickle": cloudpickle.__version__,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--json", help="also write all rows to this file")
    parser.add_argument(
        "--sections",
        default="floor,1,3,4,5",
        help="comma-separated sections to run (1 includes 2; floor: the first "
        "run against a raw h5py loop, each in its own process); default all",
    )
    parser.add_argument("--scale-child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--floor-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scale_child:
        n, d, batch, folder = args.scale_child
        scale_child(int(n), int(d), int(batch), folder)
        return
    if args.floor_child:
        case, n, d, folder = args.floor_child
        if folder != "-":
            floor_child(case, int(n), int(d), folder)
            return
        folder = tempfile.mkdtemp(prefix="samplepipe-floor-")  # for farm-bench
        try:
            floor_child(case, int(n), int(d), folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    n = 2000 if args.quick else 10_000
    print(
        f"samplepipe benchmarks, {time.strftime('%Y-%m-%d %H:%M')} UTC, "
        f"{platform.machine()}, {os.cpu_count()} cores"
    )
    print(json.dumps(versions()))
    print(
        "load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    work = tempfile.mkdtemp(prefix="samplepipe-bench-")
    try:
        sections = set(args.sections.split(","))
        if "floor" in sections:
            bench_floor(n, 128, work)
        if "1" in sections:
            from prefect.testing.utilities import prefect_test_harness

            t0 = time.perf_counter()
            with prefect_test_harness(server_startup_timeout=90):
                record(
                    "1",
                    "Prefect embedded server start (one-off, excluded)",
                    time.perf_counter() - t0,
                )
                flow = flow_rounds(128, work)
                ckpt = bench_checkpoint(n, 128, work, flow)
                bench_incremental(n, 128, ckpt, flow)
        if "3" in sections:
            bench_cache_key([1000, 10_000] if args.quick else [1000, 10_000, 100_000])
        points = (
            [(1000, 128, 500), (2000, 4096, 500)]
            if args.quick
            else [
                (1000, 128, 1000),
                (10_000, 128, 1000),
                (100_000, 128, 1000),
                (10_000, 4096, 1000),
            ]
        )
        if "4" in sections:
            bench_scale(points, work)
        if "5" in sections:
            bench_dask(n, 128, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": versions(), "rows": ROWS}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
