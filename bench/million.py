"""A million lazily generated samples through a sharded flow: time and peak RSS.

    python bench/million.py                       # 100,000 x 64, then 1,000,000 x 64
    python bench/million.py --n 100000 --small 10000   # smaller, for a smoke test

One command starts a local Prefect server on 127.0.0.1 (`samplepipe.server`,
its own PREFECT_HOME, analytics off) and, for each size (``--small`` first,
then ``--n``), runs a child process that

1. makes an indexed source (`GeneratedSource`, `samplepipe.sources`) of
   `DelayedSample` objects whose data (``--features`` float64) is generated
   from the sample's index by a seeded numpy generator on each load, so the
   data set is never in memory at once; the source fingerprints its
   batches, so a cached batch is never read (``--no-fingerprint``: every
   batch is read and its samples' identities hashed; ``--list``: a list of
   them, as before sources existed);
2. runs `run_pipeline` (``StandardScaler`` then ``PCA(n_components=16)``,
   ``layout="shards"``), fitted on the first ``--train`` samples and
   transforming all of them in batches of ``--batch-size`` (default: the
   flows' own, about 32 MiB): the first run;
3. runs it again into the same folders: the cached run;
4. (a source) runs it once more with 1,000 samples added to the source: a
   data set that grew.

Each child reports its RSS after imports and after building the sample list
(the metadata's fixed cost), its peak RSS over the first run
(``getrusage(RUSAGE_SELF).ru_maxrss``) and over the cached run (``VmHWM``
reset before it), and the files and bytes written. The parent reports the
largest peak RSS of its children (``RUSAGE_CHILDREN``: the flow processes and
the Prefect server) and the server's RSS at the end. Everything is written
under temporary folders (PREFECT_HOME too, unless set), removed at the end.
Nothing here is a test.
"""

from __future__ import annotations

import argparse
import functools
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
from pathlib import Path

OWN_PREFECT_HOME = "PREFECT_HOME" not in os.environ  # removed at the end if ours
if OWN_PREFECT_HOME:  # children inherit the parent's
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="samplepipe-bench-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "ERROR"
os.environ["DO_NOT_TRACK"] = "1"

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve()
MIB = 2**20


def say(*args):
    print(*args, flush=True)


def generate(index, n_features):
    """The data of sample ``index``: the same on every call, never kept."""
    return np.random.default_rng(index).standard_normal(n_features)


def lazy_samples(n, n_features, start=0):
    from samplepipe import DelayedSample

    return [
        DelayedSample(functools.partial(generate, i, n_features), key=f"s/{i:07d}")
        for i in range(start, n)
    ]


class GeneratedSource:
    """An indexed source (`samplepipe.sources`): samples made when asked for.

    ``version`` is the lazy samples' ``data_version``: their identity is the
    loader and the version, the data is not read to know it.
    """

    version = "1"

    def __init__(self, n, n_features):
        self.n, self.n_features = n, n_features

    def __len__(self):
        return self.n

    def batch(self, start, stop):
        return lazy_samples(stop, self.n_features, start)


class FingerprintedSource(GeneratedSource):
    """`GeneratedSource` that fingerprints its batches (`samplepipe.sources`).

    Sample ``i`` is a function of ``i``, the number of features and the
    version alone: that, and the positions, is the batch's fingerprint. A
    cached batch is then recognised without building its samples.
    """

    def fingerprint(self, start, stop):
        return f"generated/{self.n_features}/{self.version}/{start}:{stop}"


SOURCES = {1: GeneratedSource, 2: FingerprintedSource}
SOURCE_NAMES = {0: "list", 1: "indexed source", 2: "fingerprinted indexed source"}


def pipeline():
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline(
        [("scale", StandardScaler()), ("pca", PCA(n_components=16, random_state=0))]
    )


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def disk_use(folder):
    """(files, apparent bytes, allocated bytes) under ``folder``."""
    files = size = blocks = 0
    for d, _, names in os.walk(folder):
        for name in names:
            st = os.stat(os.path.join(d, name))
            files += 1
            size += st.st_size
            blocks += st.st_blocks * 512
    return files, size, blocks


def child(work, n, n_features, batch_size, train, indexed):
    """In a new process: build the samples, run the flow twice, print JSON.

    With ``indexed`` the samples come from a `GeneratedSource` (never a list);
    a third run then adds 1,000 samples to the source (a data set that grew).
    """
    from samplepipe.flows import run_pipeline

    gc.collect()
    rss_start = status_kib("VmRSS")
    t0 = time.perf_counter()
    if indexed:
        make = SOURCES[indexed]
        samples = make(n, n_features)
        # the first samples of the same source: the same identities (its version)
        train_samples = make(train, n_features)
    else:
        samples = lazy_samples(n, n_features)
        train_samples = samples[:train]
    build_seconds = time.perf_counter() - t0
    gc.collect()
    rss_samples = status_kib("VmRSS")
    kwargs = {
        "features_dir": os.path.join(work, "features"),
        "model_dir": os.path.join(work, "models"),
        "batch_size": batch_size or None,
        "layout": "shards",
    }
    runs = {}
    for phase in ("first", "cached", "grown") if indexed else ("first", "cached"):
        if phase != "first":
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak (VmHWM) to the current RSS
        if phase == "grown":
            samples = make(n + 1000, n_features)
        rss_before = status_kib("VmRSS")
        t0, c0 = time.perf_counter(), time.process_time()
        rows = run_pipeline(pipeline(), train_samples, samples, **kwargs)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if phase == "first"
            else status_kib("VmHWM")
        )
        runs[phase] = {
            "seconds": wall,
            "cpu": cpu,
            "rss_before_kib": rss_before,
            "peak_kib": peak,
            "rows": rows,
        }
    files, size, blocks = disk_use(work)
    print(
        json.dumps(
            {
                "n": n,
                "source": SOURCE_NAMES[indexed],
                "build_seconds": build_seconds,
                "rss_start_kib": rss_start,
                "rss_samples_kib": rss_samples,
                "runs": runs,
                "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "disk": {"files": files, "bytes": size, "allocated": blocks},
            }
        )
    )


def run_child(work, n, n_features, batch_size, train, indexed):
    out = subprocess.run(
        [sys.executable, str(HERE), "--child", work]
        + [str(v) for v in (n, n_features, batch_size, train, int(indexed))],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"child for n={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def server_rss_mib():
    import psutil

    total = 0
    for proc in psutil.Process().children(recursive=True):
        try:
            if "uvicorn" in " ".join(proc.cmdline()):
                total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total / MIB


def machine():
    import prefect
    import sklearn

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "prefect": prefect.__version__,
        "scikit-learn": sklearn.__version__,
    }


def report(r, n_features, batch_size):
    n = r["n"]
    first, cached = r["runs"]["first"], r["runs"]["cached"]
    data_mib = n * n_features * 8 / MIB
    samples_mib = (r["rss_samples_kib"] - r["rss_start_kib"]) / 1024
    say(
        f"\n  {n:,} x {n_features} float64 (data {data_mib:,.0f} MiB), "
        f"batches of {batch_size or 'about 32 MiB'}, samples from a {r['source']}"
    )
    say(f"    RSS after imports            {r['rss_start_kib'] / 1024:8.0f} MiB")
    say(
        f"    RSS after the samples        {r['rss_samples_kib'] / 1024:8.0f} MiB "
        f"(+{samples_mib:.0f} MiB, {samples_mib * MIB / n:.0f} B per sample, "
        f"built in {r['build_seconds']:.1f} s)"
    )
    phases = [("first run", first), ("cached run", cached)]
    if "grown" in r["runs"]:
        phases.append(("+1,000 run", r["runs"]["grown"]))
    for phase, run in phases:
        say(
            f"    {phase:11s} wall {run['seconds']:8.1f} s, CPU {run['cpu']:7.1f} s "
            f"({1e6 * run['seconds'] / n:.0f} us per sample); peak RSS "
            f"{run['peak_kib'] / 1024:,.0f} MiB "
            f"(+{(run['peak_kib'] - run['rss_before_kib']) / 1024:,.0f} MiB over "
            "its start)"
        )
        for row in run["rows"]:
            say(
                f"      {row['task']:9s} {row['step']:5s} {row['samples']:>9,} "
                f"computed {row['computed']:>9,} loaded {row['loaded']:>9,} "
                f"batches {row['cached batches']}/{row['batches']} cached, "
                f"{row['seconds']:.1f} s"
            )
    disk = r["disk"]
    say(
        f"    on disk: {disk['files']:,} files, {disk['bytes'] / MIB:,.0f} MiB "
        f"({disk['allocated'] / MIB:,.0f} MiB allocated)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="samples")
    parser.add_argument("--features", type=int, default=64, help="floats per sample")
    parser.add_argument(
        "--batch-size", type=int, default=0, help="0: the flows' default (32 MiB)"
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="a list of DelayedSample (as before sources) instead of an indexed source",
    )
    parser.add_argument(
        "--no-fingerprint",
        action="store_true",
        help="an indexed source without fingerprint(start, stop): every batch read",
    )
    parser.add_argument("--train", type=int, default=10_000, help="training samples")
    parser.add_argument(
        "--small", type=int, default=100_000, help="a smaller size, run first (0: none)"
    )
    parser.add_argument("--json", help="also write all figures to this file")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        work, *numbers = args.child
        child(work, *map(int, numbers))
        return

    import samplepipe
    from samplepipe.server import prefect_api

    say(f"samplepipe million-sample benchmark: {json.dumps(machine())}")
    say(f"samplepipe from {os.path.dirname(samplepipe.__file__)}")
    sizes = [n for n in (args.small, args.n) if n]
    work = tempfile.mkdtemp(prefix="samplepipe-bench-million-")
    results = {"sizes": [], "batch_size": args.batch_size, "train": args.train}
    t0 = time.perf_counter()
    try:
        with prefect_api() as url:
            say(f"local Prefect server {url} ready in {time.perf_counter() - t0:.1f} s")
            for n in sizes:
                say(
                    f"\n{n:,} samples: started {time.strftime('%H:%M:%S')}, "
                    f"load average {os.getloadavg()[0]:.2f}"
                )
                folder = os.path.join(work, f"n{n}")
                r = run_child(
                    folder,
                    n,
                    args.features,
                    args.batch_size,
                    min(args.train, n),
                    0 if args.list else 1 if args.no_fingerprint else 2,
                )
                results["sizes"].append(r)
                report(r, args.features, args.batch_size)
                shutil.rmtree(folder, ignore_errors=True)
            results["server_rss_mib"] = server_rss_mib()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if OWN_PREFECT_HOME:
            shutil.rmtree(os.environ["PREFECT_HOME"], ignore_errors=True)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    say(f"\nPrefect server RSS at the end: {results['server_rss_mib']:,.0f} MiB")
    say(
        "largest child peak RSS (RUSAGE_CHILDREN, with the server): "
        f"{children:,.0f} MiB"
    )
    if len(results["sizes"]) == 2:
        a, b = results["sizes"]
        dn = b["n"] - a["n"]
        for phase in ("first", "cached"):
            dp = (b["runs"][phase]["peak_kib"] - a["runs"][phase]["peak_kib"]) * 1024
            say(
                f"{phase} run peak RSS growth {a['n']:,} -> {b['n']:,}: "
                f"{dp / MIB:+,.0f} MiB = {dp / dn:,.0f} B per added sample "
                f"(data: {args.features * 8} B per sample)"
            )
    results["machine"] = machine()
    say(f"load average at the end: {results['machine']['load_average']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
