"""The journal of validated files (storage/journal.py) and the loader's checksum.

A new process trusts a checkpoint from one stat when the journal of its folder
holds a line with the file's stamp; every test here shows what must never be
trusted that way, each against a deliberately broken variant.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
import zlib

import h5py
import numpy as np
import pytest

import samplepipe.storage.hdf5 as hdf5_module
import samplepipe.storage.journal as journal_module
from samplepipe import CheckpointWarning, CheckpointWrapper, Sample, SampleWrapper
from samplepipe.storage import VALIDATED, CorruptCheckpointError, Stamp, stamp
from samplepipe.storage.journal import ENV, JOURNAL, Journals, encode_line
from samplepipe.testing import CountingTransformer, read_calls

from .conftest import make_samples


@pytest.fixture(autouse=True)
def journal_dir(tmp_path, monkeypatch):
    """Journals of this test in a folder of its own (the variable is read per call)."""
    folder = tmp_path / "journals"
    monkeypatch.setenv(ENV, str(folder))
    JOURNAL.clear()
    yield folder
    JOURNAL.clear()


def new_process():
    """What a new process knows: nothing cached in memory, the files on disk."""
    VALIDATED.clear()
    JOURNAL.clear()


def counting(folder, log):
    return CheckpointWrapper(
        SampleWrapper(
            CountingTransformer(offset=1.0, stateless=True, log_path=str(log))
        ),
        features_dir=str(folder),
    )


def journaled_step(tmp_path, n):
    """A step that checkpointed ``n`` samples in ``tmp_path / "f"``.

    Returns ``(step, samples, checkpoint paths, the folder's journal)``.
    """
    samples = make_samples(n)
    step = counting(tmp_path / "f", tmp_path / "calls.log")
    step.transform(samples)
    paths = [step.checkpoint_path(s.key) for s in samples]
    journal = JOURNAL.file_of(os.path.dirname(paths[0]))
    assert journal is not None
    return step, samples, paths, journal


def stack(samples):
    return np.stack([s.data for s in samples])


@pytest.fixture
def opened(monkeypatch):
    """Paths HDF5 opens (every h5py open goes through ``h5f.open``)."""
    paths = []
    real = h5py.h5f.open

    def spy(name, *args, **kwargs):
        paths.append(os.fsdecode(name))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(h5py.h5f, "open", spy)
    return paths


def transform(wrapper, samples):
    """``(values, [CheckpointWarning messages])``; a value that cannot load fails."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        out = wrapper.transform(samples)
    try:
        values = stack(out)
    except CorruptCheckpointError as exc:
        raise AssertionError(f"a damaged checkpoint was trusted: {exc}") from exc
    messages = [
        str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)
    ]
    return values, messages


# ---------------------------------------------------------------------------
# a new process opens each file once
# ---------------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import json, os, sys
    from h5py import h5f
    opened = []
    real = h5f.open
    def spy(name, *args, **kwargs):
        opened.append(os.fsdecode(name))
        return real(name, *args, **kwargs)
    h5f.open = spy  # every HDF5 open of h5py and samplepipe
    def hook(event, args):  # every open() and os.open() of Python
        if event == "open" and isinstance(args[0], (str, bytes)):
            opened.append(os.fsdecode(args[0]))
    sys.addaudithook(hook)
    from samplepipe import CheckpointWrapper, SampleWrapper
    from samplepipe.testing import CountingTransformer, random_samples
    features, log = sys.argv[1:]
    step = CheckpointWrapper(
        SampleWrapper(CountingTransformer(offset=1.0, stateless=True, log_path=log)),
        features_dir=features,
    )
    out = step.transform(random_samples(12, n_features=4, seed=0))
    total = float(sum(s.data.sum() for s in out))
    print(json.dumps({"opened": [p for p in opened if p.endswith(".h5")],
                      "total": total}))
    """
)


def rerun_in_a_new_process(features, log, env):
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(features), str(log)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_a_new_process_opens_each_checkpoint_once(tmp_path, env):
    tmp_path.mkdir()
    samples = make_samples(12)
    log = tmp_path / "calls.log"
    features = tmp_path / "f"
    counting(features, log).transform(samples)
    expected = float(sum((s.data + 1.0).sum() for s in samples))
    paths = [str(features / f"{s.key}.h5") for s in samples]
    result = rerun_in_a_new_process(features, log, env)
    assert read_calls(log, "transform") == [("transform", 12)], "recomputed"
    assert result["total"] == pytest.approx(expected)
    counts = {p: result["opened"].count(p) for p in paths}
    assert counts == dict.fromkeys(paths, 1), f"opens per file: {counts}"


def test_a_new_process_opens_each_checkpoint_once(tmp_path, journal_dir):
    env = {**os.environ, ENV: str(journal_dir)}
    check_a_new_process_opens_each_checkpoint_once(tmp_path / "on", env)
    # broken variant: no journal, each file is read to validate it, then to load it
    env_off = {**os.environ, ENV: "off"}
    with pytest.raises(AssertionError, match="opens per file"):
        check_a_new_process_opens_each_checkpoint_once(tmp_path / "off", env_off)


def test_the_first_run_journals_what_it_writes_and_a_rerun_adds_nothing(
    tmp_path, journal_dir
):
    samples = make_samples(5)
    step = counting(tmp_path / "f", tmp_path / "log")
    step.transform(samples)
    folder = str(tmp_path / "f" / "s")
    path = JOURNAL.file_of(folder)
    assert path is not None and os.path.dirname(path) == str(journal_dir)
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    assert len(lines) == 1 + 5  # a header, one line per file
    size = os.path.getsize(path)
    new_process()
    step.transform(samples)
    assert os.path.getsize(path) == size  # validated from the journal: no new line
    assert sorted(os.listdir(folder)) == [f"{s.key[2:]}.h5" for s in samples]


# ---------------------------------------------------------------------------
# what a journal line never vouches for
# ---------------------------------------------------------------------------
def damage(paths, samples):
    """Swap one file for another checkpoint, truncate one, flip a byte of one."""
    st = os.stat(paths[0])
    shutil.copyfile(paths[1], paths[0] + ".new")  # same size, other content
    os.utime(paths[0] + ".new", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(paths[0] + ".new", paths[0])
    assert (os.path.getsize(paths[0]), os.stat(paths[0]).st_mtime_ns) == (
        st.st_size,
        st.st_mtime_ns,
    )
    os.truncate(paths[2], os.path.getsize(paths[2]) // 2)
    needle = (samples[3].data + 1.0).tobytes()
    with open(paths[3], "r+b") as f:
        blob = f.read()
        at = blob.index(needle) + 3
        f.seek(at)
        f.write(bytes([blob[at] ^ 0x10]))


def check_a_changed_file_under_its_journal_line_is_not_trusted(tmp_path):
    tmp_path.mkdir()
    samples = make_samples(5)
    log = tmp_path / "calls.log"
    step = counting(tmp_path / "f", log)
    step.transform(samples)
    paths = [step.checkpoint_path(s.key) for s in samples]
    damage(paths, samples)
    new_process()
    values, messages = transform(counting(tmp_path / "f", log), samples)
    np.testing.assert_array_equal(values, stack(samples) + 1.0)
    assert messages and "1 foreign" in messages[0] and "2 corrupt" in messages[0]
    assert read_calls(log, "transform") == [("transform", 5), ("transform", 3)]


def lookup_by_name_only(self, path, st):
    """Broken on purpose: trusts the journal's line for a name, whatever the file."""
    folder, name = os.path.split(path)
    with self._lock:
        view = self._view(folder)
        entry = None if view is None else view.entries.get(name)
    return None if entry is None else entry[1]


def test_a_changed_file_under_its_journal_line_is_not_trusted(tmp_path, monkeypatch):
    check_a_changed_file_under_its_journal_line_is_not_trusted(tmp_path / "ok")
    monkeypatch.setattr(Journals, "lookup", lookup_by_name_only)
    with pytest.raises(AssertionError, match="a damaged checkpoint was trusted"):
        check_a_changed_file_under_its_journal_line_is_not_trusted(tmp_path / "bad")


def check_damaged_journal_lines_are_ignored(tmp_path, opened):
    tmp_path.mkdir()
    step, samples, paths, journal = journaled_step(tmp_path, 4)
    with open(journal, "rb") as f:
        header, *lines = f.read().splitlines(keepends=True)
    by_name = {json.loads(line.split(b" ", 1)[1])[0]: line for line in lines}
    good = by_name[os.path.basename(paths[0])]

    def lying(line):
        """The line with another payload checksum in its record, digest kept."""
        digest, body = line.split(b" ", 1)
        item = json.loads(body)
        parts = item[5].split(":")
        parts[3] = "0" * len(parts[3])
        item[5] = ":".join(parts)
        return digest + b" " + json.dumps(item).encode() + b"\n"

    edited = lying(by_name[os.path.basename(paths[1])])
    torn = lying(by_name[os.path.basename(paths[2])])[:-30]
    not_json = b"%08x {not json\n" % zlib.crc32(b"{not json")  # a good digest
    with open(journal, "wb") as f:
        f.write(header + good + edited + torn + b"\n" + not_json + b"\xff\x00\n")
    new_process()
    opened.clear()
    values, messages = transform(step, samples)
    np.testing.assert_array_equal(values, stack(samples) + 1.0)
    assert messages == []
    counts = [opened.count(p) for p in paths]
    # from the journal: opened once to load; the others read to validate, too
    assert counts == [1, 2, 2, 2], counts


def decode_without_digest(lines):
    """Broken on purpose: reads lines without checking their digest."""
    found = []
    for line in lines:
        try:
            name, size, mtime_ns, ino, ctime_ns, record = json.loads(
                line.partition(b" ")[2]
            )
        except (ValueError, TypeError):
            continue
        found.append((name, Stamp(size, mtime_ns, ino, ctime_ns), record))
    return found


def test_damaged_journal_lines_are_ignored(tmp_path, opened, monkeypatch):
    check_damaged_journal_lines_are_ignored(tmp_path / "ok", opened)
    monkeypatch.setattr(journal_module, "decode_lines", decode_without_digest)
    with pytest.raises(AssertionError, match="a damaged checkpoint was trusted"):
        check_damaged_journal_lines_are_ignored(tmp_path / "bad", opened)


# ---------------------------------------------------------------------------
# the loader checks the payload it reads
# ---------------------------------------------------------------------------
def check_a_payload_changed_under_the_loader_is_never_returned(tmp_path, monkeypatch):
    tmp_path.mkdir()
    samples = make_samples(3)
    log = tmp_path / "calls.log"
    step = counting(tmp_path / "f", log)
    out = step.transform(samples)
    target = step.checkpoint_path(samples[1].key)
    before = stamp(target)
    real = hdf5_module.read_payload

    def changed_right_before_the_read(path, at=None):
        """The file changes after the loader's stat (another writer, bit rot)."""
        if os.fspath(path) == target:
            with h5py.File(path, "r+") as f:
                raw = f["array"][()].view(np.uint8).copy()
                raw[5] ^= 0x01
                f["array"][...] = raw.view(np.float64)
        return real(path, at)

    with monkeypatch.context() as m:
        m.setattr(hdf5_module, "read_payload", changed_right_before_the_read)
        np.testing.assert_array_equal(out[0].data, samples[0].data + 1.0)
        try:
            value = out[1].data
        except CorruptCheckpointError as exc:
            assert "now corrupt" in str(exc)
        else:
            raise AssertionError(f"a damaged payload was returned: {value}")
    # no longer trusted at the stamp it had, here or in a new process
    assert JOURNAL.lookup(target, before) is None
    new_process()
    assert JOURNAL.lookup(target, before) is None
    values, messages = transform(counting(tmp_path / "f", log), samples)
    np.testing.assert_array_equal(values, stack(samples) + 1.0)
    assert messages and "1 corrupt" in messages[0]
    assert read_calls(log, "transform") == [("transform", 3), ("transform", 1)]


def load_verified_without_checksum(path, record, at=None):
    """Broken on purpose: decodes the payload without checking it."""
    payload = hdf5_module.read_payload(path, at)
    return hdf5_module.decode(payload, record.split(":")[4])


def test_a_payload_changed_under_the_loader_is_never_returned(tmp_path, monkeypatch):
    check_a_payload_changed_under_the_loader_is_never_returned(
        tmp_path / "ok", monkeypatch
    )
    monkeypatch.setattr(hdf5_module, "load_verified", load_verified_without_checksum)
    with pytest.raises(AssertionError, match="a damaged payload was returned"):
        check_a_payload_changed_under_the_loader_is_never_returned(
            tmp_path / "bad", monkeypatch
        )


def test_a_revoked_stamp_stays_revoked(tmp_path):
    path = str(tmp_path / "x.h5")
    open(path, "wb").close()
    st = stamp(path)
    JOURNAL.add([(path, st, "record")])
    assert JOURNAL.lookup(path, st) == "record"
    JOURNAL.revoke(path, st)
    JOURNAL.add([(path, st, "record")])  # a later line for the same stamp
    assert JOURNAL.lookup(path, st) is None
    new_process()
    assert JOURNAL.lookup(path, st) is None
    other = st._replace(ctime_ns=st.ctime_ns + 1)  # a new version of the file
    JOURNAL.add([(path, other, "new")])
    assert JOURNAL.lookup(path, other) == "new"


# ---------------------------------------------------------------------------
# where journals live
# ---------------------------------------------------------------------------
def test_a_journal_others_can_write_is_not_used(tmp_path, opened):
    step, samples, paths, journal = journaled_step(tmp_path, 3)
    os.chmod(journal, 0o666)
    new_process()
    opened.clear()
    values, _ = transform(step, samples)
    np.testing.assert_array_equal(values, stack(samples) + 1.0)
    assert [opened.count(p) for p in paths] == [2, 2, 2]  # validated by reading
    assert os.stat(journal).st_mode & 0o777 == 0o666  # and never written to


def test_the_journal_folder_is_private(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    os.chmod(mine, 0o755)
    monkeypatch.setenv(ENV, str(mine))
    assert Journals().root() == str(mine)
    assert os.stat(mine).st_mode & 0o777 == 0o700  # made private
    link = tmp_path / "link"
    link.symlink_to(mine)
    monkeypatch.setenv(ENV, str(link))
    assert Journals().root() is None  # a planted link is not followed
    monkeypatch.setenv(ENV, "off")
    assert Journals().root() is None


def test_journals_are_not_kept_inside_features_dir(tmp_path):
    samples = [Sample(np.zeros(4), key=str(i)) for i in range(3)]
    step = counting(tmp_path / "f", tmp_path / "log")
    step.transform(samples)
    assert sorted(os.listdir(tmp_path / "f")) == sorted(f"{s.key}.h5" for s in samples)


def test_journals_of_removed_folders_are_collected(tmp_path, journal_dir):
    samples = make_samples(2)
    for name in ("a", "b"):
        counting(tmp_path / name, tmp_path / "log").transform(samples)
    gone = JOURNAL.file_of(str(tmp_path / "a" / "s"))
    kept = JOURNAL.file_of(str(tmp_path / "b" / "s"))
    assert gone and kept and os.path.exists(gone) and os.path.exists(kept)
    shutil.rmtree(tmp_path / "a")
    marker = journal_dir / ".collected"
    day_ago = time.time() - journal_module.GC_EVERY - 60
    os.utime(marker, (day_ago, day_ago))
    fresh = Journals()  # a new process
    path = str(tmp_path / "b" / "s" / "x.h5")
    open(path, "wb").close()
    fresh.add([(path, stamp(path), "r")])
    assert not os.path.exists(gone)
    assert os.path.exists(kept)


def test_a_journal_of_superseded_lines_is_rewritten(tmp_path, journal_dir):
    path = str(tmp_path / "x.h5")
    open(path, "wb").close()
    st = stamp(path)
    old = [(path, st._replace(ctime_ns=i), f"r{i}") for i in range(1, 1500)]
    JOURNAL.add(old)
    JOURNAL.add([(path, st, "current")])
    journal = JOURNAL.file_of(str(tmp_path))
    assert journal is not None
    with open(journal, "rb") as f:
        assert len(f.read().splitlines()) == 1501
    fresh = Journals()
    assert fresh.lookup(path, st) == "current"
    with open(journal, "rb") as f:
        lines = f.read().splitlines()
    assert len(lines) == 2  # the header and the one line that counts
    assert lines[1] + b"\n" == encode_line("x.h5", st, "current")


def test_status_reads_no_journaled_file_and_clean_judges_from_the_files(
    tmp_path, opened
):
    samples = make_samples(4)
    step = counting(tmp_path / "f", tmp_path / "log")
    step.transform(samples)
    other = CheckpointWrapper(
        SampleWrapper(CountingTransformer(offset=2.0, stateless=True)),
        features_dir=str(tmp_path / "f"),
    )
    new_process()
    opened.clear()
    assert {s for _, s, _ in step.iter_checkpoints()} == {"valid"}
    assert opened == []  # each file trusted from its journal line
    # for another step the files are stale: judged, and removed, from the files
    paths = [step.checkpoint_path(s.key) for s in samples]
    removed = other.remove_checkpoints()
    assert sorted(p for p, s, _ in removed if s == "stale") == sorted(paths)
    assert all(p in opened for p in paths)  # each file read to judge it
    assert os.listdir(tmp_path / "f" / "s") == []
