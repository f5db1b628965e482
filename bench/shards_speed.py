"""Sharded `CheckpointWrapper` and flow against Hugging Face `datasets` map.

    pip install -e ".[bench]"                     # HF datasets, py-spy, psutil
    python bench/shards_speed.py                  # 10,000 x 128 float64
    python bench/shards_speed.py --n 1000000 --d 64 --rounds 1 --flow --prefect-share
    python bench/shards_speed.py --profile samplepipe-first  # cProfile of one case

Each case runs in its own process; imports, building the input samples and
saving the HF input (``save_to_disk``) are not timed. One step doubles the
data (a module function in a `FunctionTransformer`), samples in memory:

* samplepipe first run: ``CheckpointWrapper(..., layout="shards")`` transform
  into an empty folder (compute + write), then every output's ``.data`` read;
* samplepipe re-run: the same in a new process over the same folder (find,
  verify, load);
* flow first run (``--flow``): ``transform_pipeline`` of a one-step
  ``Pipeline`` (``layout="shards"``, the flows' default batch size of about
  32 MiB) into an empty folder, through a local Prefect server started by the
  parent (untimed), then every output read with ``PipelineOutputs.arrays()``;
* flow cached run: the same in a new process (every batch's Prefect cache hit,
  its checkpoints verified and read);
* ``--prefect-share``: the flow cases' timed part sampled with py-spy (200
  Hz, busy threads only): the share of samples whose innermost library frame
  is Prefect's (or the HTTP and validation libraries it calls) against
  samplepipe's, scikit-learn's, numpy's and h5py's (the work itself);
* HF first run: ``Dataset.map(batched=True)`` of the saved input (its cache
  file written), then the output column read as one float64 array (a tiny
  map before, untimed, does the imports);
* HF cached run: the same map in a new process (its fingerprint cache found
  and reloaded), the column read.

Each child also reports its peak RSS (``ru_maxrss``). The re-run's first
`step_identity` (once per process, whatever the layout) is
timed apart and not included. Nothing here is a test: the figures depend on
the machine and its load, printed with them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np


def peak_mib():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def double(X):
    return np.asarray(X) * 2.0


def make_samples(n, d):
    from samplepipe import Sample

    data = np.random.default_rng(0).normal(size=(n, d))
    return [Sample(data[i], key=f"s/{i:07d}") for i in range(n)]


def step(features, shard_size, shard_bytes):
    from sklearn.preprocessing import FunctionTransformer

    from samplepipe import CheckpointWrapper, SampleWrapper

    options = {}
    if shard_size is not None:
        options["shard_size"] = shard_size
    if shard_bytes is not None:
        options["shard_bytes"] = shard_bytes
    return CheckpointWrapper(
        SampleWrapper(FunctionTransformer(double)),
        features_dir=features,
        layout="shards",
        **options,
    )


def samplepipe_case(args):
    samples = make_samples(args.n, args.d)
    wrapper = step(args.features, args.shard_size, args.shard_bytes)
    t0 = time.perf_counter()
    wrapper.step_identity()
    startup = time.perf_counter() - t0
    gc.collect()
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    out = wrapper.transform(samples)
    total = 0.0
    for s in out:
        total += float(s.data[0])
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    return {
        "seconds": seconds,
        "cpu": cpu,
        "startup": startup,
        "total": total,
        "peak_mib": peak_mib(),
    }


def flow_case(args):
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    from samplepipe.flows import transform_pipeline

    samples = make_samples(args.n, args.d)
    pipeline = Pipeline([("double", FunctionTransformer(double))])
    options = {
        "features_dir": os.path.join(args.features, "features"),
        "model_dir": os.path.join(args.features, "models"),
        "layout": "shards",
    }
    warm = os.path.join(args.features, "warm")  # imports, the flow's first call
    transform_pipeline(
        pipeline,
        make_samples(4, 3),
        features_dir=os.path.join(warm, "f"),
        model_dir=os.path.join(warm, "m"),
        layout="shards",
    )
    gc.collect()
    stacks = os.path.join(args.features, "stacks.txt")
    with sampled(stacks, args.prefect_share):
        t0, c0 = time.perf_counter(), time.process_time()
        out = transform_pipeline(pipeline, samples, **options)
        total = 0.0
        for block in out.arrays():
            total += float(block[:, 0].sum())
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    result = {"seconds": seconds, "cpu": cpu, "total": total, "peak_mib": peak_mib()}
    if args.prefect_share:
        result["shares"] = shares(stacks)
    return result


@contextlib.contextmanager
def sampled(path, on):
    """Sample this process's busy threads with py-spy (``--prefect-share``)."""
    if not on:
        yield
        return
    spy = shutil.which("py-spy") or os.path.join(
        os.path.dirname(sys.executable), "py-spy"
    )
    command = [spy, "record", "--pid", str(os.getpid()), "--rate", "200"]
    command += ["--format", "raw", "--output", path, "--nonblocking"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # attached
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if not os.path.exists(path):
            raise RuntimeError(f"py-spy wrote nothing: {err.decode()[-500:]}")


OURS = ("samplepipe/", "shards_speed.py", "sklearn/", "numpy/", "h5py/")
PREFECT = ("prefect/", "pydantic", "httpx/", "httpcore/", "anyio/", "websockets/")


def shares(path):
    """Busy-thread samples by whose code ran: the innermost frame of a library.

    A stack counts for samplepipe (with scikit-learn, numpy, h5py: the work
    itself) or for Prefect (with the clients it calls) by its innermost frame
    in one of them; stacks in neither (the interpreter's own threading,
    selectors) are "other".
    """
    counts = {"samplepipe": 0, "prefect": 0, "other": 0}
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            owner = "other"
            for frame in reversed(stack.split(";")):
                if any(part in frame for part in OURS):
                    owner = "samplepipe"
                    break
                if any(part in frame for part in PREFECT):
                    owner = "prefect"
                    break
            counts[owner] += int(n)
    return counts


def hf_prepare(args):
    import datasets

    datasets.disable_progress_bars()
    data = np.random.default_rng(0).normal(size=(args.n, args.d))
    ds = datasets.Dataset.from_dict({"x": data})
    ds.save_to_disk(args.features)
    return {}


def hf_double(batch):
    return {"y": batch["x"] * 2.0}


def hf_case(args):
    import datasets

    datasets.disable_progress_bars()
    numpy = {"dtype": np.float64}  # its numpy format makes float32 otherwise
    ds = datasets.load_from_disk(args.features).with_format("numpy", **numpy)
    warm = datasets.Dataset.from_dict({"x": np.zeros((4, 3))})
    warm.with_format("numpy", **numpy).map(hf_double, batched=True)  # imports
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    out = ds.map(hf_double, batched=True, remove_columns=["x"])
    y = out.with_format("numpy", **numpy)[:]["y"]
    total = float(y[:, 0].sum())
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert y.shape == (args.n, args.d) and y.dtype == np.float64
    return {"seconds": seconds, "cpu": cpu, "total": total, "peak_mib": peak_mib()}


def child(case, args, folder, env=None):
    command = [
        sys.executable,
        __file__,
        "--child",
        case,
        "--features",
        folder,
        "--n",
        str(args.n),
        "--d",
        str(args.d),
    ]
    if args.shard_size is not None:
        command += ["--shard-size", str(args.shard_size)]
    if args.shard_bytes is not None:
        command += ["--shard-bytes", str(args.shard_bytes)]
    if args.prefect_share and case.startswith("flow"):
        command += ["--prefect-share"]
    if args.profile and case.startswith(args.profile):
        command += ["--profile", args.profile]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"{case} failed")
    if args.profile:
        sys.stderr.write(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_rounds(args, env):
    cases = ["samplepipe-first", "samplepipe-rerun"]
    if args.flow:
        cases += ["flow-first", "flow-cached"]
    if not args.no_hf:
        cases += ["hf-first", "hf-cached"]
    seconds = {case: [] for case in cases}
    cpu = {case: [] for case in cases}
    peak = {case: [] for case in cases}
    for r in range(args.rounds):
        work = tempfile.mkdtemp(prefix="samplepipe-bench-speed-")
        try:
            ours = os.path.join(work, "features")
            got = {
                "samplepipe-first": child("samplepipe-first", args, ours),
                "samplepipe-rerun": child("samplepipe-rerun", args, ours),
            }
            if args.flow:
                flow = os.path.join(work, "flow")
                got["flow-first"] = child("flow-first", args, flow, env)
                got["flow-cached"] = child("flow-cached", args, flow, env)
            expected = got["samplepipe-first"]["total"]
            for case, result in got.items():  # every case read the same outputs
                assert abs(result["total"] - expected) < 1e-6 * abs(expected), case
            if not args.no_hf:
                hf = os.path.join(work, "hf")
                child("hf-prepare", args, hf)
                got["hf-first"] = child("hf-first", args, hf)
                got["hf-cached"] = child("hf-cached", args, hf)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for case, result in got.items():
            seconds[case].append(result["seconds"])
            cpu[case].append(result["cpu"])
            peak[case].append(result["peak_mib"])
            if "shares" in result:
                n = result["shares"]
                busy = sum(n.values()) or 1
                print(
                    f"  {case}: busy-thread samples {busy}: "
                    + ", ".join(f"{k} {100 * v / busy:.1f}%" for k, v in n.items()),
                    flush=True,
                )
        print(
            f"  round {r + 1} (load {os.getloadavg()[0]:.2f}): "
            + ", ".join(
                f"{k} {v[-1]:.3f} s (cpu {cpu[k][-1]:.3f})" for k, v in seconds.items()
            ),
            flush=True,
        )
    return seconds, cpu, peak


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shard-size", type=int, default=None)
    parser.add_argument("--shard-bytes", type=int, default=None)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--flow", action="store_true", help="also transform_pipeline")
    parser.add_argument(
        "--prefect-share",
        action="store_true",
        help="sample the flow cases with py-spy: the share of Prefect's code",
    )
    parser.add_argument(
        "--profile",
        choices=["samplepipe-first", "samplepipe-rerun", "flow-first", "flow-cached"],
    )
    parser.add_argument("--child")
    parser.add_argument("--features")
    args = parser.parse_args()
    if args.child:
        run = {
            "samplepipe-first": samplepipe_case,
            "samplepipe-rerun": samplepipe_case,
            "flow-first": flow_case,
            "flow-cached": flow_case,
            "hf-prepare": hf_prepare,
            "hf-first": hf_case,
            "hf-cached": hf_case,
        }[args.child]
        print(json.dumps(run(args)))
        return
    load = os.getloadavg()[0]
    print(
        f"{args.n} x {args.d} float64, {args.rounds} round(s), load {load:.2f}, "
        f"shard_size={args.shard_size}, shard_bytes={args.shard_bytes}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        env = None
        if args.flow:  # one local Prefect server for the flow cases, untimed
            os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
            home = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="samplepipe-bench-prefect-")
            )
            os.environ.setdefault("PREFECT_HOME", home)
            from samplepipe.server import prefect_api

            url = stack.enter_context(prefect_api())
            env = {
                **os.environ,
                "PREFECT_API_URL": url,
                "PREFECT_LOGGING_LEVEL": "ERROR",
            }
        seconds, cpu, peak = run_rounds(args, env)
    best = {k: min(v) for k, v in seconds.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    print(
        "best:",
        ", ".join(f"{k} {v:.3f} s (cpu {best_cpu[k]:.3f})" for k, v in best.items()),
    )
    print("peak RSS:", ", ".join(f"{k} {max(v):,.0f} MiB" for k, v in peak.items()))
    if not args.no_hf:
        ours = [("wrapper", "samplepipe-first", "samplepipe-rerun")]
        if args.flow:
            ours.append(("flow", "flow-first", "flow-cached"))
        for name, table in (("wall", best), ("cpu", best_cpu)):
            for label, first, again in ours:
                print(
                    f"samplepipe {label} / HF, {name}: first "
                    f"{table[first] / table['hf-first']:.2f}x, re-run "
                    f"{table[again] / table['hf-cached']:.2f}x"
                )
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
