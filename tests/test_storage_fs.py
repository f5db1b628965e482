"""Checkpoints and models on any filesystem: a local path, memory://, S3, dir://.

The same behaviour tests run on each store. S3 is a real S3 API server (moto's
server mode, as s3fs's own tests use) started by these tests on 127.0.0.1,
behind a small WSGI layer that counts the requests it receives; dummy
credentials come from the environment, nothing reaches the network. fsspec's
``dir://`` (a folder of the local filesystem, through fsspec) stands for the
filesystems that write through a temporary name and a rename (SFTP, HDFS...).
"""

import errno
import io
import json
import os
import pickle
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.pipeline import Pipeline

from samplepipe import (
    CheckpointWarning,
    CheckpointWrapper,
    DelayedSample,
    SampleWrapper,
    hash_string,
    wrap,
)
from samplepipe.storage import (
    VALIDATED,
    CorruptCheckpointError,
    FilesLayout,
    TransformReport,
    UnknownFileError,
    filesystem,
    is_temporary_file,
    join_location,
    normalize_location,
    read_model_header,
    relative_location,
    stamp_of,
)
from samplepipe.testing import CountingTransformer, count_rows, random_samples

from .conftest import stop_process

BUCKET = "samplepipe-tests"

# The S3 API server: moto's WSGI application behind a layer that counts the
# requests by kind, and can read PUT bodies slowly (to kill a writer mid-PUT).
SERVER = r"""
import json, logging, sys, threading, time
from urllib.parse import parse_qs
from werkzeug.serving import make_server
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication, MotoRequestHandler, create_backend_app)

logging.getLogger("werkzeug").setLevel(logging.ERROR)
app = DomainDispatcherApplication(create_backend_app)
lock = threading.Lock()
counts = {}
state = {"slow": 0.0, "received": 0}


class Slow:
    def __init__(self, stream):
        self.stream = stream

    def read(self, n=-1):
        size = 65536 if n is None or n < 0 else min(n, 65536)
        data = self.stream.read(size)
        with lock:
            state["received"] += len(data)
        time.sleep(state["slow"])
        return data

    def readinto(self, buffer):
        size = self.stream.readinto(memoryview(buffer)[:65536])
        with lock:
            state["received"] += size or 0
        time.sleep(state["slow"])
        return size

    def __getattr__(self, name):
        return getattr(self.stream, name)


def counting(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path.startswith("/__samplepipe__/"):
        command = path.rsplit("/", 1)[-1]
        query = parse_qs(environ.get("QUERY_STRING", ""))
        with lock:
            body = json.dumps({"counts": dict(counts), "received": state["received"]})
            if command == "reset":
                counts.clear()
            elif command == "slow":
                state["slow"] = float(query["seconds"][0])
                state["received"] = 0
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body.encode()]
    kind = environ["REQUEST_METHOD"]
    if kind == "GET" and "list-type" in environ.get("QUERY_STRING", ""):
        kind = "LIST"
    with lock:
        counts[kind] = counts.get(kind, 0) + 1
    if environ["REQUEST_METHOD"] == "PUT" and state["slow"]:
        environ["wsgi.input"] = Slow(environ["wsgi.input"])
    return app(environ, start_response)


server = make_server("127.0.0.1", 0, counting, threaded=True,
                     request_handler=MotoRequestHandler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "samplepipe-test-key",
    "AWS_SECRET_ACCESS_KEY": "samplepipe-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_CONFIG_FILE": os.devnull,
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


class S3Server:
    """A running S3 API server and its request counter."""

    def __init__(self, proc, endpoint):
        self.proc = proc
        self.endpoint = endpoint
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _control(self, command):
        with self._opener.open(f"{self.endpoint}/__samplepipe__/{command}") as r:
            return json.loads(r.read())

    def requests(self):
        """Requests received since the last call, by kind (LIST, GET, PUT...)."""
        return self._control("reset")["counts"]

    def received(self):
        return self._control("state")["received"]

    def slow_puts(self, seconds):
        """Sleep ``seconds`` after each 64 KiB of every PUT body (0: off)."""
        self._control(f"slow?seconds={seconds}")


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        for name, value in S3_ENV.items():
            mp.setenv(name, value)
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True
        )
        try:
            port = int(proc.stdout.readline())
            server = S3Server(proc, f"http://127.0.0.1:{port}")
            import fsspec

            fsspec.filesystem("s3", endpoint_url=server.endpoint).mkdir(
                f"s3://{BUCKET}"
            )
            yield server
        finally:
            stop_process(proc, timeout=30)


class Store:
    """One place for checkpoints, and raw access to it (not through samplepipe)."""

    def __init__(self, name, root, options=None, server=None):
        self.name = name
        self.root = root
        self.options = options
        self.server = server

    def url(self, *parts):
        return join_location(self.root, *parts)

    def _fs(self):
        import fsspec

        protocol = self.root.split("://", 1)[0]
        return fsspec.filesystem(protocol, **(self.options or {}))

    def write(self, path, blob):
        if self.name == "local":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(blob)
        else:
            fs = self._fs()
            if self.name == "dir":
                fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            fs.pipe_file(path, blob)

    def read(self, path):
        if self.name == "local":
            return Path(path).read_bytes()
        return self._fs().cat_file(path)

    def exists(self, path):
        if self.name == "local":
            return os.path.exists(path)
        fs = self._fs()
        fs.invalidate_cache()
        return fs.exists(path)

    def files(self, *parts):
        """Relative paths of every file under ``url(*parts)``, sorted."""
        root = self.url(*parts)
        if self.name == "local":
            found = [
                os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/")
                for d, _, names in os.walk(root)
                for n in names
            ]
            return sorted(found)
        fs = self._fs()
        fs.invalidate_cache()
        base = fs._strip_protocol(root).rstrip("/") + "/"
        return sorted(p[len(base) :] for p in fs.find(root))


@pytest.fixture(params=["local", "memory", "s3", "dir"])
def store(request, tmp_path):
    if request.param == "local":
        yield Store("local", str(tmp_path / "store"))
    elif request.param == "dir":  # an fsspec filesystem that renames (not a PUT)
        options = {"path": str(tmp_path / "dir"), "target_protocol": "file"}
        os.makedirs(options["path"])
        yield Store("dir", "dir://store", options)
    elif request.param == "memory":
        root = f"memory://samplepipe-tests/{uuid.uuid4().hex}"
        yield Store("memory", root)
        import fsspec

        memory = fsspec.filesystem("memory")  # one store per process: clean up
        if memory.exists(root):
            memory.rm(root, recursive=True)
    else:
        server = request.getfixturevalue("s3_server")
        root = f"s3://{BUCKET}/{uuid.uuid4().hex}"
        options = {"endpoint_url": server.endpoint}
        server.requests()  # start counting from zero
        yield Store("s3", root, options, server)


def counting(store, log, offset=1.0, stateless=True, **kwargs):
    """A checkpointed CountingTransformer on ``store`` that logs to ``log``."""
    inner = SampleWrapper(
        CountingTransformer(offset=offset, stateless=stateless, log_path=str(log))
    )
    return CheckpointWrapper(
        inner,
        features_dir=store.url("f"),
        storage_options=store.options,
        **kwargs,
    )


def values(outputs):
    return np.stack([o.data for o in outputs])


def expected(samples, offset=1.0):
    return np.stack([s.data for s in samples]) + offset


# ---------------------------------------------------------------------------
# reuse
# ---------------------------------------------------------------------------
def test_first_transform_writes_and_second_computes_nothing(store, tmp_path):
    log = tmp_path / "calls.log"
    samples = random_samples(10)
    w = counting(store, log)
    np.testing.assert_array_equal(values(w.transform(samples)), expected(samples))
    assert count_rows(log, "transform") == 10
    assert store.files("f") == [f"s/{i:05d}.h5" for i in range(10)]
    np.testing.assert_array_equal(values(w.transform(samples)), expected(samples))
    VALIDATED.clear()  # as a new process: validate every object again
    again = counting(store, log).transform(samples)
    np.testing.assert_array_equal(values(again), expected(samples))
    assert count_rows(log, "transform") == 10


DAMAGE = {
    "truncated": lambda blob: blob[: len(blob) // 3],
    "zero bytes": lambda blob: b"",
    "random bytes": lambda blob: os.urandom(4000),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_object_is_recomputed_with_a_warning(store, tmp_path, damage):
    log = tmp_path / "calls.log"
    samples = random_samples(3)
    w = counting(store, log)
    before = w.transform(samples)
    path = w.checkpoint_path(samples[0].key)
    store.write(path, DAMAGE[damage](store.read(path)))
    with pytest.raises(CorruptCheckpointError, match="changed since it was written"):
        _ = before[0].data  # an output never loads a changed object as data
    # no cache clearing: the object's new stamp alone sends it to validation
    with pytest.warns(CheckpointWarning, match="recomputes 1 checkpoint.*1 corrupt"):
        out = w.transform(samples)
    np.testing.assert_array_equal(values(out), expected(samples))
    assert count_rows(log, "transform") == 4
    w.transform(samples)
    assert count_rows(log, "transform") == 4


def test_a_stale_object_is_recomputed(store, tmp_path):
    samples = random_samples(5)
    counting(store, tmp_path / "one.log", offset=1.0).transform(samples)
    other = counting(store, tmp_path / "two.log", offset=2.0)
    with pytest.warns(CheckpointWarning, match="recomputes 5 checkpoint.*5 stale"):
        out = other.transform(samples)
    np.testing.assert_array_equal(values(out), expected(samples, 2.0))
    assert count_rows(tmp_path / "two.log", "transform") == 5
    VALIDATED.clear()
    other.transform(samples)
    assert count_rows(tmp_path / "two.log", "transform") == 5


def test_an_object_samplepipe_did_not_write_is_never_overwritten(store, tmp_path):
    samples = random_samples(2)
    w = counting(store, tmp_path / "calls.log")
    path = w.checkpoint_path(samples[0].key)
    with h5py.File("user", "w", driver="core", backing_store=False) as f:
        f["array"] = np.zeros(3)  # the user's own HDF5 data, no samplepipe record
        f.flush()
        user_data = f.id.get_file_image()
    store.write(path, user_data)
    with pytest.raises(UnknownFileError, match="will not overwrite 1 file"):
        w.transform(samples)
    assert store.read(path) == user_data
    assert count_rows(tmp_path / "calls.log", "transform") == 0


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------
def test_fit_saves_the_model_and_a_second_fit_loads_it(store, tmp_path):
    log = tmp_path / "calls.log"
    samples = random_samples(8)
    model = store.url("models", "count.pkl")

    def step():
        return counting(store, log, stateless=False, model_path=model)

    first = step().fit(samples)
    assert count_rows(log, "fit") == 8
    assert store.files("models") == ["count.pkl"]
    header = read_model_header(model, store.options)
    assert header is not None and header["state"] == first.fitted_digest_
    second = step().fit(samples)
    assert count_rows(log, "fit") == 8  # loaded, not fitted
    np.testing.assert_array_equal(
        second.estimator.estimator.mean_, first.estimator.estimator.mean_
    )
    second.transform(samples)
    step().transform(samples)  # a new step reads the model's header to judge
    assert count_rows(log, "transform") == 8
    store.write(model, b"samplepipe-model\ntruncated")
    step().fit(samples)
    assert count_rows(log, "fit") == 16  # an unreadable model is fitted again


def test_wrap_passes_storage_options_to_every_step(store, tmp_path):
    log = tmp_path / "calls.log"
    samples = random_samples(6)

    def pipeline():
        return wrap(
            ["sample", "checkpoint"],
            Pipeline(
                [
                    ("a", CountingTransformer(offset=1.0, log_path=str(log))),
                    ("b", CountingTransformer(offset=2.0, stateless=True)),
                ]
            ),
            features_dir=store.url("f"),
            model_path=store.url("m"),
            storage_options=store.options,
        )

    first = pipeline()
    assert all(s.storage_options == store.options for _, s in first.steps)
    out = first.fit(samples).transform(samples)
    again = pipeline().fit(samples).transform(samples)
    np.testing.assert_array_equal(values(again), values(out))
    assert (count_rows(log, "fit"), count_rows(log, "transform")) == (6, 6)
    assert store.files("m") == ["a.pkl"]
    assert store.files("f") == sorted(
        f"{step}/s/{i:05d}.h5" for step in "ab" for i in range(6)
    )


# ---------------------------------------------------------------------------
# listing and removing
# ---------------------------------------------------------------------------
def test_iter_and_remove_checkpoints(store, tmp_path):
    log = tmp_path / "calls.log"
    samples = random_samples(6)
    w = counting(store, log, hash_fn=hash_string)  # keys in nested folders
    w.transform(samples)
    paths = [w.checkpoint_path(s.key) for s in samples]
    other = counting(store, tmp_path / "other.log", offset=9.0)
    other.features_dir = store.url("other")
    other.transform(samples[:1])
    store.write(paths[0], store.read(other.checkpoint_path(samples[0].key)))
    store.write(paths[1], b"not HDF5 at all")
    store.write(store.url("f", "notes.txt"), b"kept: another extension")
    found = {path: state for path, state, _ in w.iter_checkpoints()}
    assert found == {
        paths[0]: "stale",
        paths[1]: "corrupt",
        **dict.fromkeys(paths[2:], "valid"),
    }
    assert w.remove_checkpoints(dry_run=True) == w.remove_checkpoints(dry_run=True)
    removed = w.remove_checkpoints()
    assert sorted((p, s) for p, s, _ in removed) == sorted(
        [(paths[0], "stale"), (paths[1], "corrupt")]
    )
    assert not store.exists(paths[0]) and not store.exists(paths[1])
    assert all(store.exists(p) for p in paths[2:])
    assert store.exists(store.url("f", "notes.txt"))
    w.transform(samples)
    assert count_rows(log, "transform") == 8  # only the two removed


def test_remove_keeps_an_object_rewritten_since_it_was_listed(store, tmp_path):
    """Private hooks: the moment between listing and removing is made visible."""
    samples = random_samples(2)
    w = counting(store, tmp_path / "calls.log")
    w.transform(samples)
    path = w.checkpoint_path(samples[0].key)
    store.write(path, b"garbage")
    listed = {p: (state, st) for p, state, _, st in w._walk()}
    assert listed[path][0] == "corrupt"
    with pytest.warns(CheckpointWarning):
        w.transform(samples)  # a running job recomputes it in between
    step = w.step_identity()
    context = w._context()
    assert not FilesLayout().still(context, path, "corrupt", listed[path][1], step)
    assert w.remove_checkpoints() == []
    assert store.exists(path)


# ---------------------------------------------------------------------------
# lazy outputs
# ---------------------------------------------------------------------------
LOAD_SCRIPT = """
import json, pickle, sys
with open(sys.argv[1], "rb") as f:
    outputs = pickle.load(f)
print(json.dumps([float(o.data.sum()) for o in outputs]))
"""


def test_outputs_load_lazily_and_survive_pickling(store, tmp_path):
    samples = random_samples(5)
    out = counting(store, tmp_path / "calls.log").transform(samples)
    assert all(isinstance(o, DelayedSample) and "data" not in vars(o) for o in out)
    blob = pickle.dumps(out)
    assert b"s3fs" not in blob and b"MemoryFileSystem" not in blob  # URLs only
    sums = [float(s) for s in expected(samples).sum(axis=1)]
    if store.name == "memory":  # one process's memory: load here
        restored = pickle.loads(blob)
        assert [float(o.data.sum()) for o in restored] == sums
        return
    if store.server is not None:
        store.server.requests()
    (tmp_path / "outputs.pkl").write_bytes(blob)
    result = subprocess.run(  # another process, as a Dask worker
        [sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "outputs.pkl")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout) == pytest.approx(sums)
    if store.server is not None:
        assert store.server.requests() == {"GET": 5}  # one GET per output


# ---------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------
BROKEN_SAVE = "SAMPLEPIPE_TEST_BROKEN_SAVE"


def write_npy(data, f):
    """Write ``data`` to open file ``f``; with $SAMPLEPIPE_TEST_BROKEN_SAVE,
    fail after half of it (a full disk, a lost connection)."""
    buffer = io.BytesIO()
    np.save(buffer, data)
    raw = buffer.getvalue()
    if os.environ.get(BROKEN_SAVE):
        f.write(raw[: len(raw) // 2])
        f.flush()
        raise OSError(errno.ENOSPC, "disk full half-way (test)")
    f.write(raw)


def save_npy(data, path):
    """A custom format for CheckpointWrapper(save_func=...)."""
    with open(path, "wb") as f:
        write_npy(data, f)


def load_npy(path):
    return np.load(path)


def test_a_save_that_fails_half_way_leaves_the_old_object(store, tmp_path, monkeypatch):
    samples = random_samples(3)
    log = tmp_path / "calls.log"
    old = counting(store, log, save_func=save_npy, load_func=load_npy)
    old.transform(samples)
    path = old.checkpoint_path(samples[0].key)
    before = {p: store.read(p) for p in (path, path + ".meta.json")}
    new = counting(store, log, offset=2.0, save_func=save_npy, load_func=load_npy)
    monkeypatch.setenv(BROKEN_SAVE, "1")
    with (
        pytest.warns(CheckpointWarning, match="3 stale"),
        pytest.raises(OSError, match="could not write checkpoint.*half-way"),
    ):
        new.transform(samples)
    monkeypatch.delenv(BROKEN_SAVE)
    assert {p: store.read(p) for p in before} == before
    assert not any(is_temporary_file(os.path.basename(f)) for f in store.files("f"))
    VALIDATED.clear()
    out = old.transform(samples)
    np.testing.assert_array_equal(values(out), expected(samples))
    assert count_rows(log, "transform") == 6  # 3 + 3 computed by the failed run


def test_a_non_atomic_writer_is_caught(store, tmp_path, monkeypatch):
    """The broken variant of the test above: the same failing save, streamed
    into the final name (``fsspec.open(path, "wb")``), leaves half an object
    on every store (s3fs commits the upload when the file closes, even on an
    exception), and the check catches it."""
    import fsspec

    samples = random_samples(1)
    log = tmp_path / "calls.log"
    w = counting(store, log, save_func=save_npy, load_func=load_npy)
    w.transform(samples)
    path = w.checkpoint_path(samples[0].key)
    before = store.read(path)
    monkeypatch.setenv(BROKEN_SAVE, "1")
    target = path if store.name != "local" else "file://" + path
    with (
        pytest.raises(OSError, match="half-way"),
        fsspec.open(target, "wb", **(store.options or {})) as f,
    ):
        write_npy(samples[0].data + 2.0, f)
    monkeypatch.delenv(BROKEN_SAVE)
    assert store.read(path) != before  # the old object is gone
    VALIDATED.clear()
    with pytest.warns(CheckpointWarning, match="1 corrupt"):  # and the check sees it
        w.transform(samples)


KILL_SCRIPT = """
import os, sys, time
from samplepipe.storage import filesystem
path, size, options, pause = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
options = eval(options)
if pause == "before-rename":
    real = os.replace
    def replace(src, dst):
        print("written", flush=True)
        time.sleep(600)
    os.replace = replace
print("start", flush=True)
filesystem(path, options).write_bytes(path, b"n" * size)
print("done", flush=True)
"""


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_writer_killed_mid_write_leaves_the_old_object(where, tmp_path, request):
    """SIGKILL a writer: locally after its temporary file, before the rename; on
    S3 while the server is receiving its PUT body. (memory:// lives in one
    process; its broken variant is the streaming writer above.)"""
    if where == "local":
        store = Store("local", str(tmp_path / "store"))
    else:
        server = request.getfixturevalue("s3_server")
        store = Store(
            "s3",
            f"s3://{BUCKET}/{uuid.uuid4().hex}",
            {"endpoint_url": server.endpoint},
            server,
        )
    path = store.url("x.h5")
    old = b"o" * (4 << 20)
    fs = filesystem(path, store.options)
    fs.makedirs(fs.dirname(path))
    fs.write_bytes(path, old)
    pause = "before-rename" if where == "local" else "-"
    if where == "s3":
        store.server.slow_puts(0.05)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILL_SCRIPT,
            path,
            str(8 << 20),
            repr(store.options),
            pause,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "start"
        deadline = time.monotonic() + 60
        if where == "local":
            assert child.stdout.readline().strip() == "written"  # before the rename
        else:
            while store.server.received() < (1 << 20):  # part of the body arrived
                assert time.monotonic() < deadline
                time.sleep(0.02)
        child.kill()
        child.wait()
        if where == "s3":
            assert store.server.received() < (8 << 20)  # killed mid-PUT
    finally:
        if where == "s3":
            store.server.slow_puts(0)
    time.sleep(0.5)  # let the server finish with the broken request
    assert store.read(path) == old
    if where == "local":
        names = os.listdir(os.path.dirname(path))
        assert any(is_temporary_file(n) for n in names)  # the dead writer's
        assert len(filesystem(path).remove_stale_temporaries(os.path.dirname(path)))
        assert os.listdir(os.path.dirname(path)) == ["x.h5"]


# ---------------------------------------------------------------------------
# stamps for the flows' manifests
# ---------------------------------------------------------------------------
def test_stamp_of_follows_the_object(store, tmp_path):
    samples = random_samples(2)
    w = counting(store, tmp_path / "calls.log")
    report = TransformReport()
    w.transform_samples(samples, report=report)
    path, recorded = report.paths[0], report.stamps[0]
    assert path == w.checkpoint_path(samples[0].key)
    assert stamp_of(path, store.options) == recorded
    store.write(path, store.read(report.paths[1]))  # another object's bytes
    assert stamp_of(path, store.options) != recorded
    assert stamp_of(store.url("f", "missing.h5"), store.options) is None


# ---------------------------------------------------------------------------
# request counts on S3
# ---------------------------------------------------------------------------
def requests_by_phase(s3_server, step, samples, forget):
    """S3 requests of each phase of checkpointing ``samples`` with ``step()``.

    ``forget()`` stands for a new process (clears what this one knows).
    """
    s3_server.requests()  # start counting from zero
    seen = {}
    step().transform(samples)
    seen["first transform (compute + write)"] = s3_server.requests()
    step().transform(samples)
    seen["second transform, same process"] = s3_server.requests()
    forget()
    out = step().transform(samples)
    seen["second transform, new process"] = s3_server.requests()
    values(out)
    seen["loading the outputs"] = s3_server.requests()
    list(step().iter_checkpoints())
    seen["iter_checkpoints (validated before)"] = s3_server.requests()
    forget()
    list(step().iter_checkpoints())
    seen["iter_checkpoints, new process"] = s3_server.requests()
    print(f"\nS3 requests for {len(samples)} samples:")
    for phase, counts in seen.items():
        print(f"  {phase:40s} {sum(counts.values()):4d}  {counts}")
    return seen


def s3_store(s3_server):
    """A fresh folder on the S3 server."""
    root = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    return Store("s3", root, {"endpoint_url": s3_server.endpoint}, s3_server)


@pytest.mark.slow  # 600 requests to the S3 server
def test_s3_requests_for_100_samples(s3_server, tmp_path):
    store, log = s3_store(s3_server), tmp_path / "calls.log"
    seen = requests_by_phase(
        s3_server, lambda: counting(store, log), random_samples(100), VALIDATED.clear
    )
    assert count_rows(log, "transform") == 100
    assert seen["first transform (compute + write)"] == {"GET": 100, "PUT": 100}
    assert seen["second transform, same process"] == {"HEAD": 100}
    assert seen["second transform, new process"] == {"GET": 100, "HEAD": 100}
    assert seen["loading the outputs"] == {"GET": 100}
    assert seen["iter_checkpoints (validated before)"] == {"LIST": 1}
    assert seen["iter_checkpoints, new process"] == {"LIST": 1, "GET": 100}


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------
def test_a_missing_bucket_is_a_clear_error_without_retries(s3_server, tmp_path):
    w = CheckpointWrapper(
        SampleWrapper(CountingTransformer(stateless=True)),
        features_dir="s3://no-such-bucket-samplepipe/f",
        storage_options={"endpoint_url": s3_server.endpoint},
    )
    s3_server.requests()
    with pytest.raises(OSError, match="the bucket or folder does not exist"):
        w.transform(random_samples(1))
    assert s3_server.requests().get("PUT") == 1


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ("endpoint=x", TypeError, "storage_options='endpoint=x'; it must be a dict"),
        ({1: "x"}, TypeError, "storage_options={1: 'x'}; it must be a dict"),
    ],
)
def test_storage_options_must_be_a_dict(tmp_path, options, error, message):
    w = CheckpointWrapper(
        SampleWrapper(CountingTransformer(stateless=True)),
        features_dir=str(tmp_path / "f"),
        storage_options=options,
    )
    with pytest.raises(error, match=message.replace("(", r"\(").replace("{", r"\{")):
        w.transform(random_samples(1))


def test_bad_urls_are_clear_errors_and_write_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = [
        ("nosuchprotocol://b/x", ValueError, "fsspec does not know protocol"),
        ("simplecache::s3://b/x", ValueError, "chained fsspec URLs"),
    ]
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        cases.append(("gs://b/x", ImportError, "needs a package that is not"))
    for url, error, message in cases:
        w = CheckpointWrapper(
            SampleWrapper(CountingTransformer(stateless=True)), features_dir=url
        )
        with pytest.raises(error, match=message):
            w.transform(random_samples(1))
    assert os.listdir(tmp_path) == []


def test_a_file_url_is_a_local_path(tmp_path):
    w = CheckpointWrapper(
        SampleWrapper(CountingTransformer(offset=1.0, stateless=True)),
        features_dir=f"file://{tmp_path}/f",
        model_path=f"file://{tmp_path}/m.pkl",
    )
    samples = random_samples(2)
    out = w.transform(samples)
    path = w.checkpoint_path(samples[0].key)
    assert path == os.path.join(str(tmp_path), "f", "s", "00000.h5")
    assert os.path.isfile(path)
    assert out[0]._load.storage_options is None and out[0]._load.path == path
    np.testing.assert_array_equal(values(out), expected(samples))


def test_location_helpers():
    assert join_location("s3://b/x/", "s", "k.h5") == "s3://b/x/s/k.h5"
    assert join_location("/data", "s", "k.h5") == os.path.join("/data", "s", "k.h5")
    assert normalize_location("s3://b//x/") == "s3://b/x"
    assert normalize_location("file:///tmp/a/../b") == "/tmp/b"
    assert relative_location("s3://b/x/s/k.h5", "s3://b/x/") == "s/k.h5"
    with pytest.raises(ValueError, match="is not inside"):
        relative_location("s3://b/y/k.h5", "s3://b/x")


@pytest.mark.parametrize(
    ("path", "root"),
    [
        ("/a/b/c.h5", "/a"),
        ("/a/b/c.h5", "/a/"),
        ("/a/./b/c.h5", "/a"),
        ("/a/b/../../c.h5", "/a"),
        ("/ab/c.h5", "/a"),
        ("/a/b.h5", "/"),
        ("/a//b.h5", "/a"),
        ("/a/b.h5", "/x/../a"),
        ("a/b/c.h5", "a"),
    ],
)
def test_relative_location_of_a_local_path_is_relpaths(path, root):
    # local paths take a shortcut (a prefix cut) when the path is normalised
    assert relative_location(path, root) == os.path.relpath(path, root)
