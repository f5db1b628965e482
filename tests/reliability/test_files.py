"""Corrupt and foreign files, full disks, unwritable folders, symlinks, processes."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from samplepipe import CheckpointWarning, CheckpointWrapper, SampleWrapper
from samplepipe.storage import VALIDATED, is_temporary_file
from samplepipe.testing import CountingTransformer, count_rows, random_samples

from . import _stats

pytestmark = pytest.mark.filterwarnings("ignore::samplepipe.CheckpointWarning")


def wrapper(tmp_path, offset=1.0, features=None, **kwargs):
    log = str(tmp_path / "calls.log")
    inner = SampleWrapper(
        CountingTransformer(offset=offset, stateless=True, log_path=log)
    )
    return CheckpointWrapper(
        inner, features_dir=str(features or tmp_path / "f"), **kwargs
    )


def other_step_file(path, tmp_path):
    other = wrapper(tmp_path, offset=9.0, features=tmp_path / "other")
    s = random_samples(1)[0]
    other.transform([s])
    os.replace(other.checkpoint_path(s.key), path)


def other_key_file(path, tmp_path):
    w = wrapper(tmp_path)
    samples = random_samples(2)
    os.replace(w.checkpoint_path(samples[1].key), path)


DAMAGE = {
    "truncated": lambda p, t: os.truncate(p, os.path.getsize(p) // 3),
    "zero bytes": lambda p, t: os.truncate(p, 0),
    "random bytes": lambda p, t: Path(p).write_bytes(os.urandom(4000)),
    "HDF5 of another step": other_step_file,
    "HDF5 of another key": other_key_file,
    "read-only and truncated": lambda p, t: (os.truncate(p, 10), os.chmod(p, 0o444)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_file_is_never_loaded_as_data(tmp_path, damage):
    samples = random_samples(2)
    w = wrapper(tmp_path)
    w.transform(samples)
    path = w.checkpoint_path(samples[0].key)
    DAMAGE[damage](path, tmp_path)
    VALIDATED.clear()  # as a new process would
    with pytest.warns(CheckpointWarning, match="recomputes 1 checkpoint"):
        out = w.transform(samples)
    np.testing.assert_array_equal(out[0].data, samples[0].data + 1.0)
    with h5py.File(path) as f:
        assert f.attrs["samplepipe"].endswith(":" + samples[0].key)
    _stats.add(corrupt_cases=1)


def test_a_file_changed_after_transform_is_not_loaded(tmp_path):
    samples = random_samples(2)
    w = wrapper(tmp_path)
    out = w.transform(samples)
    other_step_file(w.checkpoint_path(samples[0].key), tmp_path)
    with pytest.raises(
        RuntimeError, match="changed since it was written and is now stale"
    ):
        _ = out[0].data


def test_a_folder_where_a_file_should_be_is_a_clear_error(tmp_path):
    samples = random_samples(2)
    w = wrapper(tmp_path, attempts=3)
    os.makedirs(w.checkpoint_path(samples[0].key))
    with pytest.raises(OSError, match="a folder of that name exists") as info:
        w.transform(samples)
    assert w.checkpoint_path(samples[0].key) in str(info.value)
    assert count_rows(tmp_path / "calls.log", "transform") == 0  # raised before work


def mount_tmpfs(mount, options):
    """Make folder ``mount`` and mount a tmpfs there; False where not allowed."""
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)]
    return subprocess.run(command, capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only); None where mounting is not allowed."""
    mount = tmp_path / "disk"
    ok = mount_tmpfs(mount, "size=1m")
    yield mount if ok else None
    if ok:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_a_clear_error_and_earlier_checkpoints_survive(
    tmp_path, small_disk
):
    samples = random_samples(400, n_features=512)  # ~4 KiB each: more than 1 MiB
    if small_disk is not None:
        w = wrapper(tmp_path, features=small_disk / "f")
        w.transform(samples[:20])
        saved = {
            p: Path(p).read_bytes()
            for p in (w.checkpoint_path(s.key) for s in samples[:20])
        }
        with pytest.raises(OSError, match="could not write checkpoint") as info:
            w.transform(samples)
        assert info.value.errno == errno.ENOSPC
        assert str(small_disk) in str(info.value)
        folder = small_disk / "f"
    else:  # no mount allowed: a save_func that fails like a full disk
        calls = []

        def full(data, path):
            calls.append(path)
            if len(calls) > 20:
                raise OSError(errno.ENOSPC, "No space left on device", path)
            np.save(open(path, "wb"), data)

        w = wrapper(tmp_path, save_func=full, load_func=np.load, extension=".npy")
        w.transform(samples[:20])
        saved = {
            p: Path(p).read_bytes()
            for p in (w.checkpoint_path(s.key) for s in samples[:20])
        }
        with pytest.raises(OSError, match="could not write checkpoint"):
            w.transform(samples)
        folder = tmp_path / "f"
    for path, content in saved.items():
        assert Path(path).read_bytes() == content
    assert not [
        n for _, _, names in os.walk(folder) for n in names if is_temporary_file(n)
    ]
    _stats.add(disk_full_cases=1)


def test_an_unwritable_folder_is_a_clear_error(tmp_path):
    mount = tmp_path / "ro"
    ok = mount_tmpfs(mount, "ro,size=1m")
    if not ok:
        os.chmod(mount, 0o555)
        if os.access(mount, os.W_OK):
            pytest.skip("root without mount: no folder is unwritable here")
    try:
        w = wrapper(tmp_path, features=mount / "f")
        with pytest.raises(OSError) as info:
            w.transform(random_samples(3))
        assert info.value.errno in (errno.EROFS, errno.EACCES)
        assert str(mount / "f") in str(info.value) or str(mount) in str(info.value)
    finally:
        if ok:
            subprocess.run(["umount", str(mount)], check=True)


def test_a_symlink_out_of_features_dir_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    features = tmp_path / "f"
    features.mkdir()
    os.symlink(outside, features / "link")
    w = wrapper(tmp_path)
    s = random_samples(1)[0]
    s.key = "link/x"
    with pytest.raises(ValueError, match="outside features_dir"):
        w.transform([s])
    assert list(outside.iterdir()) == []


SCRIPT = """
import sys
import numpy as np
from samplepipe import CheckpointWrapper, SampleWrapper
from samplepipe.testing import CountingTransformer, random_samples
samples = random_samples(1500, n_features=16, seed=5)[int(sys.argv[2]):int(sys.argv[3])]
w = CheckpointWrapper(SampleWrapper(CountingTransformer(offset=1.0, stateless=True,
                      log_path=sys.argv[4])), features_dir=sys.argv[1])
out = w.transform(samples)
np.save(sys.argv[5], np.stack([o.data for o in out]))
"""


@pytest.mark.slow
def test_two_processes_on_overlapping_samples(tmp_path):
    features = tmp_path / "f"
    args = [(0, 1000), (500, 1500)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                SCRIPT,
                str(features),
                str(a),
                str(b),
                str(tmp_path / "calls.log"),
                str(tmp_path / f"out{i}.npy"),
            ]
        )
        for i, (a, b) in enumerate(args)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    samples = random_samples(1500, n_features=16, seed=5)
    expected = np.stack([s.data for s in samples]) + 1.0
    np.testing.assert_array_equal(np.load(tmp_path / "out0.npy"), expected[:1000])
    np.testing.assert_array_equal(np.load(tmp_path / "out1.npy"), expected[500:])
    w = wrapper(tmp_path, features=features)
    statuses = [status for _, status, _ in w.iter_checkpoints()]
    assert statuses == ["valid"] * 1500
    before = count_rows(tmp_path / "calls.log", "transform")
    w.transform(samples)
    assert count_rows(tmp_path / "calls.log", "transform") == before  # nothing lost
    _stats.add(concurrent_files_checked=1500, concurrent_lost=0)
