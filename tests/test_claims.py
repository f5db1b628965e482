"""Each reliability claim of the README, against samplepipe and a broken variant.

A *check* below exercises samplepipe's real code on real files and asserts one
claim of README.md. Each test runs its check twice (the ``variant`` parameter):
on samplepipe as it is, where the check must pass, and on a deliberately
broken variant installed with ``monkeypatch`` (a writer that writes in place,
a status that skips the checksum, a key rule that lets ``..`` through, ...),
where the check must fail with an ``AssertionError`` saying what broke. A check
that cannot fail proves nothing.

Claims (README.md unless said otherwise), each with its tests and, in
brackets, the broken variants they catch; tests in this file unless a file is
named.

Atomic writes and crashes
- "every file (features and models) is written to a temporary name in the
  same folder and moved into place with os.replace; a failed write removes its
  temporary file":
    test_an_interrupted_write_keeps_the_old_checkpoint
        [writes-in-place, leaves-its-temporary]
    test_checkpoint.py::test_model_is_written_atomically [in_place]
    test_storage_fs.py::test_a_non_atomic_writer_is_caught (object stores)
- "temporary files left by crashed processes are removed on the next write
  into their folder":
    test_temporaries_of_dead_writers_only_are_removed
        [judges-by-age-only, removes-live-writers-files]
- "Model files are also fsynced":
    test_model_files_are_fsynced [no-fsync]
- custom formats: "a <file>.meta.json record holding the file's SHA-256" (a
  crash between the file and its record never loads as valid):
    test_a_custom_write_interrupted_between_its_two_files_is_recomputed
        [sidecar-checksum-unchecked]
- real kills (SIGKILL mid-write): tests/reliability/test_crash.py; "Checkpoints
  written by many workers into one folder stay valid": test_dask.py::
  test_many_workers_write_one_features_dir, tests/reliability/test_files.py::
  test_two_processes_on_overlapping_samples (the write path checked above).

"When is a checkpoint reused?" ... "recomputed when any of them changed"
- the step's code:
    test_edited_code_recomputes [code-by-name-only]
- its parameters:
    test_other_parameters_recompute [identity-without-parameters]
- its fitted state:
    test_a_refit_on_other_data_recomputes [constant-fitted-digest]
- the input, in memory:
    test_new_data_under_the_same_keys_recomputes [digest-of-shape-only]
- the input, loaded from a samplepipe checkpoint ("a change anywhere upstream
  reaches every later step"):
    test_an_upstream_change_reaches_the_next_step [lineage-of-key-only]
- the input, loaded by another loader: its data_version; "The file behind a
  loader is never read just to be hashed":
    test_lazy_inputs_are_not_read_to_be_hashed_and_declare_a_version
        [hashes-by-loading, ignores-data_version]
- the metadata the step reads:
    test_metadata_the_step_reads_recomputes [reads-only-the-input-attribute]
- the file format (the code of save_func/load_func):
    test_another_save_func_recomputes [one-format-identity]
    (HDF5 -> save_func: FALSE, see the end)
- the key ("holds another key ... is recomputed"):
    test_a_checkpoint_of_another_key_is_recomputed [judge-ignores-the-key]

Damaged files and files samplepipe did not write
- "truncated, empty, not HDF5, fails its checksum ... recomputed and
  overwritten, with one CheckpointWarning giving the counts. Only those
  samples go to the estimator, in one call":
    test_damaged_checkpoints_are_recomputed_alone
        [skips-the-checksum, recomputes-the-whole-batch]
- "A readable file samplepipe did not write ... is never overwritten:
  transform raises UnknownFileError naming it, before any work":
    test_a_file_samplepipe_did_not_write_is_never_overwritten
        [other-layout-is-corrupt, record-less-file-is-corrupt]
- "a file replaced after transform raises on load" (tests/reliability/
  README.md); stamps hold "inode and change time" (a swapped file is noticed):
    test_a_file_swapped_after_transform_is_not_loaded
        [stamp-of-size-and-mtime]
    (the loader also checks each payload against its record, so the variants
    that let a damaged or swapped file through also skip that check; the
    check itself: test_journal.py::
    test_a_payload_changed_under_the_loader_is_never_returned)
- "Re-runs in a new process open each checkpoint once ... a replaced,
  rewritten or truncated file does not match and is read again" (the journal):
    test_journal.py::test_a_new_process_opens_each_checkpoint_once [journal off]
    test_journal.py::test_a_changed_file_under_its_journal_line_is_not_trusted
        [lookup-by-name-only]
    test_journal.py::test_damaged_journal_lines_are_ignored [no line digest]
    the same stamps in cached Prefect manifests (flow runs, no broken variant):
    test_flows_trust.py::test_a_swapped_file_behind_a_cached_manifest_is_noticed
    test_flows_trust.py::test_a_reordered_cached_manifest_is_not_used
- "a symlink out of features_dir refused" (tests/reliability/README.md):
    test_a_link_out_of_features_dir_is_refused [follows-links]

Cleaning
- remove_checkpoints removes "the stale, corrupt and foreign checkpoints and
  the temporary files of dead writers. It never removes a file the step would
  reuse, a readable file samplepipe did not write":
    test_remove_checkpoints_removes_only_what_it_may
        [other-layout-is-corrupt, live-writers-count-as-dead]
- "... the files of a step whose fitted model cannot be read":
    test_remove_checkpoints_keeps_the_files_of_a_step_without_its_model
        [judges-without-a-model]
- "... or a file that changed since it was listed":
    test_trust.py::test_remove_judges_each_file_again_right_before_removing_it
        [NoRecheck]
- "samplepipe status reads the JSON header only and never unpickles":
    test_listing_checkpoints_never_unpickles_the_model [loads-the-model]

Keys, outputs, errors
- "Keys are checked before anything is computed or written ... an absolute
  path, ..../. components, a backslash, NUL ... `a..b` and `a:b` are valid
  keys. Step names follow the same rules":
    test_bad_keys_are_refused_before_any_work
        [lax-key-rule, refuses-any-dot-dot]
- "... and duplicate keys in one call raise ValueError":
    test_duplicate_keys_are_refused_before_any_work [no-duplicate-check]
- "any other output raises TypeError before a file of its batch is written":
    test_an_unsupported_output_writes_nothing [writes-as-it-encodes]
- "Errors that a retry cannot fix (a full disk, ...) are never retried";
  transient OSErrors are:
    test_only_transient_io_errors_are_retried
        [retries-every-error, retries-nothing]
    the flows' rule is the same one:
    test_flows_predict.py::test_the_retry_rule_is_the_wrappers_rule

Models
- "fit loads it when the header matches this step and these training samples
  and the payload is intact; otherwise it refits and overwrites":
    test_a_model_is_reused_only_for_the_same_step_and_training_samples
        [training-digest-of-keys-only, identity-without-parameters]
    test_a_damaged_model_payload_is_refitted [skips-size-and-sha256]
- "A model that cannot be unpickled any more ... is refitted, with a
  ModelWarning":
    test_a_model_that_cannot_be_unpickled_is_refitted
        [lets-unpickling-errors-through]
- "transform_pipeline refuses a model fitted after other versions of them"
  (a flow run, no broken variant): test_flows_trust.py::
    test_transform_refuses_a_model_fitted_after_other_upstream_models

Locks
- "two flow runs never compute the same batch at once":
    test_two_managers_never_hold_one_key [judges-holders-dead-without-flock]
    test_flows.py::test_two_concurrent_flow_runs_do_not_compute_a_batch_twice
- "Neither a reused process ID ... nor a clock that steps back can keep a
  dead run's lock":
    test_locks.py::test_lock_naming_a_reused_pid_is_dead [TrustsPid]
    test_locks.py::test_clock_stepping_back_keeps_no_dead_lock [TrustsAge]
- Redis: "a holder that dies ... frees its locks at most lease_seconds later":
    test_locks.py::test_killed_holder_on_another_host_releases_within_lease
        [broken-no-lease]
- "The lock folder is private ... one that others can write, is refused":
    test_a_lock_folder_others_can_write_is_refused [ignores-unsafe-folders]
- "A lock file that is a symbolic link ... is refused, never followed" and
  "No wait is endless" (no broken variant: a wait without end could only be
  caught by a wall-clock bound):
    test_locks.py::test_planted_lock_path_is_refused_and_not_followed
    test_locks.py::test_waits_are_bounded

Claims found false, then mended
- "the file format" row ("recomputed when any of them changed"): switching from
  HDF5 to a save_func with the same extension raised UnknownFileError (the HDF5
  checkpoints have no .meta.json record); they are now judged stale and
  recomputed: test_switching_from_hdf5_to_a_custom_format_recomputes
- "a URL is refused": the README now documents URLs (fsspec), tested in
  test_storage_fs.py and test_flows_storage.py
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import cloudpickle
import h5py
import numpy as np
import pytest
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline

import samplepipe.storage.checkpoints as ckpt
import samplepipe.storage.files as files
import samplepipe.storage.hdf5 as hdf5_module
import samplepipe.storage.identity as identity_module
import samplepipe.storage.keys as keys_module
import samplepipe.storage.layouts.files as files_layout
import samplepipe.storage.models as models
import samplepipe.wrappers._checkpoint as checkpoint_module
import samplepipe.wrappers._inputs as inputs_module
import samplepipe.wrappers._model as model_module
from samplepipe import (
    CheckpointWarning,
    CheckpointWrapper,
    DelayedSample,
    Sample,
    SampleWrapper,
    wrap,
)
from samplepipe.locks import CrashSafeFileLocks, UnsafeLockFolderError
from samplepipe.storage import (
    VALIDATED,
    CorruptCheckpointError,
    FilesLayout,
    Identity,
    ModelWarning,
    UnknownFileError,
    code_identity,
    combine,
    is_temporary_file,
    keys_digest,
    read_model_header,
)
from samplepipe.storage.files import HOST_TAG
from samplepipe.testing import CountingTransformer, count_rows, read_calls

from .conftest import counting_checkpoint as counting
from .conftest import make_samples

# ---------------------------------------------------------------------------
# running a check on samplepipe and on a broken variant
# ---------------------------------------------------------------------------
# What a failing check raises: an assert, or pytest.raises/warns not satisfied.
CHECK_FAILED = (AssertionError, pytest.fail.Exception)


@dataclass(frozen=True)
class Variant:
    """An implementation to run a check on.

    ``install`` (None for samplepipe as it is) breaks samplepipe on purpose
    through ``monkeypatch``; ``caught`` is a regex of the failure the check
    must report for it, so that it fails for the right reason.
    """

    name: str
    install: Callable[[pytest.MonkeyPatch], None] | None = None
    caught: str = ""


SAMPLEPIPE = Variant("samplepipe")


def broken(name: str, caught: str, **patches: tuple) -> Variant:
    """A variant setting ``patches`` = ``{label: ((owner, attribute), value)}``."""

    def install(monkeypatch: pytest.MonkeyPatch) -> None:
        for (owner, attribute), value in patches.values():
            monkeypatch.setattr(owner, attribute, value)

    return Variant(name, install, caught)


def variants(*broken_variants: Variant) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(
        "variant", [SAMPLEPIPE, *broken_variants], ids=lambda v: v.name
    )


@pytest.fixture
def claim(variant, monkeypatch):
    """Install ``variant``; return ``claim(check, *args)``.

    On samplepipe the check must pass; on a broken variant it must fail with
    the variant's expected failure.
    """
    if variant.install is not None:
        variant.install(monkeypatch)

    def run(check, *args, **kwargs):
        if variant.install is None:
            check(*args, **kwargs)
            return
        with pytest.raises(CHECK_FAILED) as failure:
            check(*args, **kwargs)
        assert re.search(variant.caught, str(failure.value)), (
            f"the check failed, but not as expected ({variant.caught!r}): "
            f"{failure.value}"
        )

    return run


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
class Interrupted(BaseException):
    """A write stopped half way (not an Exception: nothing handles it)."""


def stack(samples):
    return np.stack([s.data for s in samples])


def transform(wrapper, samples):
    """``(outputs stacked, [CheckpointWarning messages])``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        values = stack(wrapper.transform(samples))
    return values, [
        str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)
    ]


def snapshot(folder):
    """``{relative path: bytes}`` of every file under ``folder``."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def dead_pid():
    """The PID of a process of this host that has exited."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def user_hdf5(path, dataset="raw"):
    """A readable HDF5 file that samplepipe did not write."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as f:
        f[dataset] = np.arange(5.0)
    with open(path, "rb") as f:
        return f.read()


def flip_byte(path, needle):
    """Flip the lowest bit of the first byte of ``needle`` inside ``path``."""
    with open(path, "r+b") as f:
        blob = f.read()
        at = blob.find(needle)
        assert at >= 0, "setup: the bytes to damage are not in the file"
        f.seek(at)
        f.write(bytes([blob[at] ^ 1]))


def rewrite_payload(path, payload):
    """Replace a model file's payload, with a header whose size and SHA-256 fit."""
    with open(path, "rb") as f:
        assert f.read(len(models.MODEL_MAGIC)) == models.MODEL_MAGIC
        header = json.loads(f.readline())
    header.update(size=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    with open(path, "wb") as f:
        f.write(models.MODEL_MAGIC)
        f.write(json.dumps(header, sort_keys=True).encode() + b"\n")
        f.write(payload)


def save_npy(data, path):
    with open(path, "wb") as f:
        np.save(f, data)


def save_npy_edited(data, path):
    with open(path, "wb") as f:
        np.save(f, data, allow_pickle=False)


def load_counted(path, log):
    """A loader of a lazy input that logs each read."""
    with open(log, "a") as f:
        f.write(path + "\n")
    return np.load(path)


def touch(path):
    """What unpickling a `Tripwire` runs."""
    with open(path, "w"):
        pass


class Tripwire:
    """Unpickling it creates a file: shows whether a payload was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return touch, (self.path,)


class AddAge(TransformerMixin, BaseEstimator):
    """Adds each sample's ``age`` (a transform_extra_argument) to its data."""

    def __samplepipe_tags__(self):
        return {"transform_extra_arguments": [("offset", "age")]}

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags

    def fit(self, X, y=None):
        return self

    def transform(self, X, offset):
        return np.asarray(X) + np.asarray(offset)[:, None]


class LastUnstorable(TransformerMixin, BaseEstimator):
    """Returns a dict, which HDF5 cannot hold, for the last sample."""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        out = list(np.asarray(X))
        out[-1] = {"not": "storable"}
        return out


PLUS = """
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

class Plus(TransformerMixin, BaseEstimator):
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return np.asarray(X) + {n}
"""


def plus_class(n):
    """Class ``Plus`` of a user's script, whose transform adds ``n``."""
    namespace = {"__name__": "user_script"}
    exec(textwrap.dedent(PLUS.format(n=float(n))), namespace)
    return namespace["Plus"]


# ---------------------------------------------------------------------------
# broken variants
# ---------------------------------------------------------------------------
_real_atomic_write = files.atomic_write


def feature_writer(label, writer):
    """Patches making ``writer`` the atomic writer of checkpoints and records.

    Feature files and their records reach `files.atomic_write` either through
    `files.write_bytes` or through the name `checkpoints` imports: both.
    """
    return {
        f"{label}-files": ((files, "atomic_write"), writer),
        f"{label}-checkpoints": ((ckpt, "atomic_write"), writer),
    }


def install_feature_writer(monkeypatch, writer):
    for (owner, attribute), value in feature_writer("w", writer).values():
        monkeypatch.setattr(owner, attribute, value)


def writes_in_place(path, write, *, fsync=False):
    """Broken on purpose: writes where readers look."""
    write(path)


def atomic_write_without_cleanup(path, write, *, fsync=False):
    """Broken on purpose: a temporary name, but left behind when writing fails."""
    tmp = files.temporary_name(path)
    write(tmp)
    os.replace(tmp, path)


def atomic_write_without_fsync(path, write, *, fsync=False):
    """Broken on purpose: drops the fsync it is asked for."""
    _real_atomic_write(path, write)


def _read_model(path):
    with open(path, "rb") as f:
        if f.read(len(models.MODEL_MAGIC)) != models.MODEL_MAGIC:
            return None, b""
        return json.loads(f.readline()), f.read()


def load_model_skipping_digest(path, storage_options=None):
    """Broken on purpose: unpickles without checking size and SHA-256."""
    header, payload = _read_model(path)
    if header is None:
        return None
    try:
        return header, cloudpickle.loads(payload)
    except Exception:  # noqa: BLE001 - as the real one: unpicklable means refit
        return None


def load_model_letting_errors_through(path, storage_options=None):
    """Broken on purpose: checks the digest, but an unpickling error escapes."""
    header, payload = _read_model(path)
    if header is None or hashlib.sha256(payload).hexdigest() != header["sha256"]:
        return None
    return header, cloudpickle.loads(payload)


def header_by_loading(path, storage_options=None):
    """Broken on purpose: reads a model's header by loading the whole model."""
    loaded = models.load_model(path, storage_options)
    return None if loaded is None else loaded[0]


def verified_without_checksum(record, payload):
    """Broken on purpose: trusts a record without checking the payload."""
    if record is None:
        return "unknown", None
    try:
        Identity.parse(record)
    except ValueError:
        return "unknown", None
    return "ok", record


def load_verified_without_checksum(path, record, at=None):
    """Broken on purpose: a loader that decodes a payload without checking it.

    (The loader checks the payload against its record as it reads it, so a
    variant that lets a damaged or swapped file through validation must skip
    that check too for the damage to reach the caller.)
    """
    payload = hdf5_module.read_payload(path, at)
    return hdf5_module.decode(payload, record.split(":")[4])


_real_verified = ckpt._verified


def verified_recordless_is_corrupt(record, payload):
    """Broken on purpose: an HDF5 file without a record counts as damaged."""
    if record is None:
        return "corrupt", None
    return _real_verified(record, payload)


_real_judge = ckpt.judge


def judge_ignoring_the_key(record, wanted, any_inputs=False):
    """Broken on purpose: a checkpoint of any key will do."""
    found, _, _ = Identity.parse(record)
    return _real_judge(record, replace(wanted, key=found.key), any_inputs)


_real_compute = CheckpointWrapper._compute


def compute_the_whole_batch(self, samples, todo, attribute):
    """Broken on purpose: one bad file recomputes every sample of the batch."""
    return _real_compute(
        self, samples, list(range(len(samples))) if todo else todo, attribute
    )


_real_stamp = files.stamp


def stamp_of_size_and_mtime(path):
    """Broken on purpose: a file's stamp without its inode and change time."""
    st = _real_stamp(path)
    return None if st is None else st._replace(ino=0, ctime_ns=0)


_real_key_rule = keys_module._key_rule


def lax_key_rule(key):
    """Broken on purpose: any non-empty string is a key."""
    return None if isinstance(key, str) and key else "keys must be strings"


def key_rule_refusing_dot_dot(key):
    """Broken on purpose: also refuses '..' inside a name ('a..b')."""
    rule = _real_key_rule(key)
    if rule is None and ".." in key:
        return "keys must not contain '..'"
    return rule


def sample_keys_without_duplicates_check(samples, owner="CheckpointWrapper"):
    """Broken on purpose: checks each key, not that they are unique."""
    return [keys_module.check_key(s.key, i, owner) for i, s in enumerate(samples)]


_real_encode = FilesLayout.encode
_real_save_one = FilesLayout.save_one


def encode_later(self, context, value, identity, check=False):
    """Broken on purpose (with `save_encoding_first`): no check before writing."""
    return None


def save_encoding_first(self, context, path, encoded, identity, value):
    encoded = _real_encode(self, context, value, identity)
    return _real_save_one(self, context, path, encoded, identity, value)


def prepare_folder_following_links(self, context, folder, seen):
    """Broken on purpose: writes into wherever the folder's links lead."""
    os.makedirs(folder, exist_ok=True)
    files.remove_stale_temporaries(folder)


def refuse_nothing(self, path, problem, fix):
    """Broken on purpose: an unsafe lock folder is used anyway."""


# ---------------------------------------------------------------------------
# atomic writes, crashes
# ---------------------------------------------------------------------------
def dies_half_way(write):
    """``write``, stopped after half of the file is on disk."""

    def write_half(target):
        write(target)
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) // 2)
        raise Interrupted(target)

    return write_half


def check_an_interrupted_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    samples = make_samples(4)
    old, _ = counting(tmp_path, offset=1.0)
    old.transform(samples)
    before = snapshot(tmp_path / "features")
    writer = files.atomic_write  # whichever writer is installed
    with monkeypatch.context() as m:
        install_feature_writer(
            m, lambda path, write, **kw: writer(path, dies_half_way(write), **kw)
        )
        new, _ = counting(tmp_path, offset=2.0, force=True)
        with pytest.raises(Interrupted):
            new.transform(samples)
    after = snapshot(tmp_path / "features")
    left = [p for p in after if is_temporary_file(os.path.basename(p))]
    assert not left, f"a failed write left its temporary file: {left}"
    assert after == before, "a write stopped half way damaged the old checkpoint"
    VALIDATED.clear()
    for ident in old.identities(samples):
        assert ckpt.check(old.checkpoint_path(ident.key), ident)[0] == "valid"


@variants(
    broken(
        "writes-in-place",
        "damaged the old checkpoint",
        **feature_writer("writer", writes_in_place),
    ),
    broken(
        "leaves-its-temporary",
        "left its temporary file",
        **feature_writer("writer", atomic_write_without_cleanup),
    ),
)
def test_an_interrupted_write_keeps_the_old_checkpoint(tmp_path, monkeypatch, claim):
    claim(check_an_interrupted_write_keeps_the_old_checkpoint, tmp_path, monkeypatch)


def check_temporaries_of_dead_writers_only_are_removed(tmp_path):
    wrapper, _ = counting(tmp_path)
    folder = tmp_path / "features" / "s"
    folder.mkdir(parents=True)
    dead = folder / f".00000.h5.{HOST_TAG}-{dead_pid()}-0badc0de.tmp"
    live = folder / f".00001.h5.{HOST_TAG}-{os.getppid()}-0badc0de.tmp"
    for tmp in (dead, live):
        tmp.write_bytes(b"half a checkpoint")
    wrapper.transform(make_samples(2))
    assert not dead.exists(), "the temporary file of a dead writer was left"
    assert live.exists(), "the temporary file of a live writer was removed"
    assert live.read_bytes() == b"half a checkpoint"


@variants(
    broken(
        "judges-by-age-only",
        "dead writer was left",
        alive=((files, "_owner_alive"), lambda name: True),
    ),
    broken(
        "removes-live-writers-files",
        "live writer was removed",
        alive=((files, "_owner_alive"), lambda name: False),
    ),
)
def test_temporaries_of_dead_writers_only_are_removed(tmp_path, claim):
    claim(check_temporaries_of_dead_writers_only_are_removed, tmp_path)


def check_model_files_are_fsynced(tmp_path, monkeypatch):
    model = tmp_path / "models" / "m.pkl"
    folder = os.path.realpath(model.parent)
    wrapper, _ = counting(
        tmp_path, stateless=False, features_dir=None, model_path=str(model)
    )
    synced = []
    fsync = os.fsync

    def spy(fd):  # calls through: the file is really synced
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", spy)
        wrapper.fit(make_samples(4))
    assert read_model_header(model) is not None
    temporaries = [
        i
        for i, p in enumerate(synced)
        if os.path.dirname(p) == folder and is_temporary_file(os.path.basename(p))
    ]
    assert temporaries, f"the model's bytes were not fsynced: fsync on {synced}"
    assert folder in synced[temporaries[0] + 1 :], (
        f"the model's folder was not fsynced after the move: fsync on {synced}"
    )


@variants(
    broken(
        "no-fsync",
        "not fsynced",
        writer=((models, "atomic_write"), atomic_write_without_fsync),
    )
)
def test_model_files_are_fsynced(tmp_path, monkeypatch, claim):
    claim(check_model_files_are_fsynced, tmp_path, monkeypatch)


def check_a_custom_write_interrupted_between_its_two_files_is_recomputed(
    tmp_path, monkeypatch
):
    samples = make_samples(1)

    def step(offset):
        return counting(tmp_path, offset=offset, save_func=save_npy, load_func=np.load)[
            0
        ]

    step(1.0).transform(samples)
    writer = files.atomic_write

    def dies_after_the_record(path, write, **kw):
        writer(path, write, **kw)
        if path.endswith(".meta.json"):
            raise Interrupted(path)

    with monkeypatch.context() as m, warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)  # 1 stale: recomputed
        install_feature_writer(m, dies_after_the_record)
        with pytest.raises(Interrupted):
            step(2.0).transform(samples)
    # the new record is in place, the old file still behind it; judged as a
    # new process judges it (this one remembers the old file's record)
    VALIDATED.clear()
    values, messages = transform(step(2.0), samples)
    np.testing.assert_array_equal(
        values,
        stack(samples) + 2.0,
        err_msg="an old file behind a new record was loaded as valid",
    )
    assert len(messages) == 1 and "1 corrupt" in messages[0], messages


@variants(
    broken(
        "sidecar-checksum-unchecked",
        "loaded as valid",
        checksum=((ckpt, "_file_checksum"), lambda path: "unchecked"),
    )
)
def test_a_custom_write_interrupted_between_its_two_files_is_recomputed(
    tmp_path, monkeypatch, claim
):
    claim(
        check_a_custom_write_interrupted_between_its_two_files_is_recomputed,
        tmp_path,
        monkeypatch,
    )


# ---------------------------------------------------------------------------
# when is a checkpoint reused?
# ---------------------------------------------------------------------------
def assert_recomputed(wrapper, samples, expected, n, log=None, before=0):
    """``wrapper`` recomputes all ``n`` samples (one warning, stale) to ``expected``."""
    values, messages = transform(wrapper, samples)
    np.testing.assert_allclose(
        values, expected, err_msg="an out-of-date checkpoint was reused"
    )
    assert len(messages) == 1 and f"{n} stale" in messages[0], (
        f"expected one warning of {n} stale checkpoints, got {messages}"
    )
    if log is not None:
        assert count_rows(log, "transform") == before + n


def check_edited_code_recomputes(tmp_path):
    samples = make_samples(4)
    features = str(tmp_path / "features")
    CheckpointWrapper(SampleWrapper(plus_class(1)()), features_dir=features).transform(
        samples
    )
    edited = CheckpointWrapper(SampleWrapper(plus_class(2)()), features_dir=features)
    assert_recomputed(edited, samples, stack(samples) + 2.0, 4)


@variants(
    broken(
        "code-by-name-only",
        "out-of-date checkpoint was reused",
        function=(
            (identity_module._Hasher, "_function"),
            lambda self, fn, qualname: self.tag(f"function:{qualname}"),
        ),
    )
)
def test_edited_code_recomputes(tmp_path, claim):
    claim(check_edited_code_recomputes, tmp_path)


IDENTITY_WITHOUT_PARAMETERS = broken(
    "identity-without-parameters",
    "out-of-date checkpoint was reused|loaded the model",
    identity=(
        (checkpoint_module, "estimator_identity"),
        lambda est: code_identity(type(est)),
    ),
    model_identity=(
        (model_module, "estimator_identity"),
        lambda est: code_identity(type(est)),
    ),
)


def check_other_parameters_recompute(tmp_path):
    samples = make_samples(4)
    counting(tmp_path, offset=1.0)[0].transform(samples)
    wrapper, log = counting(tmp_path, offset=2.0)
    assert_recomputed(wrapper, samples, stack(samples) + 2.0, 4, log, before=4)


@variants(IDENTITY_WITHOUT_PARAMETERS)
def test_other_parameters_recompute(tmp_path, claim):
    claim(check_other_parameters_recompute, tmp_path)


def check_a_refit_on_other_data_recomputes(tmp_path):
    samples = make_samples(4)
    wrapper, log = counting(tmp_path, offset=0.0, stateless=False)
    wrapper.fit(samples).transform(samples)
    other = make_samples(4, seed=1)
    wrapper.fit(other)
    expected = stack(samples) + stack(other).mean(axis=0)
    assert_recomputed(wrapper, samples, expected, 4, log, before=4)


@variants(
    broken(
        "constant-fitted-digest",
        "out-of-date checkpoint was reused",
        digest=((model_module, "fitted_digest"), lambda est: "fitted"),
    )
)
def test_a_refit_on_other_data_recomputes(tmp_path, claim):
    claim(check_a_refit_on_other_data_recomputes, tmp_path)


def check_new_data_under_the_same_keys_recomputes(tmp_path):
    counting(tmp_path)[0].transform(make_samples(4))
    new = make_samples(4, seed=1)
    wrapper, log = counting(tmp_path)
    assert_recomputed(wrapper, new, stack(new) + 1.0, 4, log, before=4)


@variants(
    broken(
        "digest-of-shape-only",
        "out-of-date checkpoint was reused",
        digest=(
            (inputs_module, "value_digest"),
            lambda value: f"shape{np.shape(value)}",
        ),
        batch_digest=(
            (checkpoint_module, "value_digests"),
            lambda values: [f"shape{np.shape(value)}" for value in values],
        ),
    )
)
def test_new_data_under_the_same_keys_recomputes(tmp_path, claim):
    claim(check_new_data_under_the_same_keys_recomputes, tmp_path)


def check_an_upstream_change_reaches_the_next_step(tmp_path):
    samples = make_samples(4)

    def first(offset):
        return counting(tmp_path, offset, features_dir=str(tmp_path / "first"))[0]

    second = counting(tmp_path, 0.0, features_dir=str(tmp_path / "second"))[0]
    second.transform(first(1.0).transform(samples))
    upstream = first(2.0).transform(samples)  # recomputed, warned
    assert_recomputed(second, upstream, stack(samples) + 2.0, 4)


@variants(
    broken(
        "lineage-of-key-only",
        "out-of-date checkpoint was reused",
        lineage=((Identity, "lineage"), lambda self: combine(self.key)),
    )
)
def test_an_upstream_change_reaches_the_next_step(tmp_path, claim):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)  # the first step's
        claim(check_an_upstream_change_reaches_the_next_step, tmp_path)


def check_lazy_inputs_are_not_read_to_be_hashed_and_declare_a_version(tmp_path):
    reads = str(tmp_path / "reads.log")
    arrays = make_samples(3)
    paths = [str(tmp_path / f"raw{i}.npy") for i in range(3)]

    def lazy(version):
        return [
            DelayedSample(
                functools.partial(load_counted, p, reads),
                key=f"k{i}",
                data_version=version,
            )
            for i, p in enumerate(paths)
        ]

    def n_reads():
        return len(read_calls_lines(reads))

    for s, p in zip(arrays, paths):
        np.save(p, s.data)
    wrapper, log = counting(tmp_path)
    wrapper.transform(lazy("v1"))
    assert n_reads() == 3, "lazy inputs were read more than once to compute"
    wrapper.transform(lazy("v1"))
    assert n_reads() == 3, "lazy inputs were read again just to be hashed"
    for s, p in zip(arrays, paths):
        np.save(p, s.data * 10)  # the files behind the loaders change...
    # ... and so does their declared version
    assert_recomputed(wrapper, lazy("v2"), stack(arrays) * 10 + 1.0, 3, log, 3)


def read_calls_lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.readlines()


def identity_by_loading(sample, attribute):
    """Broken on purpose: hashes a lazy input by loading it."""
    return "v" + identity_module.value_digest(getattr(sample, attribute))


@variants(
    broken(
        "hashes-by-loading",
        "lazy inputs were read (more than once|again)",
        attribute=((inputs_module, "attribute_identity"), identity_by_loading),
        batch=((checkpoint_module, "attribute_identity"), identity_by_loading),
    ),
    broken(
        "ignores-data_version",
        "out-of-date checkpoint was reused",
        version=((inputs_module, "DATA_VERSION_ATTRIBUTE"), "no_such_attribute"),
    ),
)
def test_lazy_inputs_are_not_read_to_be_hashed_and_declare_a_version(tmp_path, claim):
    claim(check_lazy_inputs_are_not_read_to_be_hashed_and_declare_a_version, tmp_path)


def check_metadata_the_step_reads_recomputes(tmp_path):
    def aged(ages):
        return [
            Sample(np.arange(3.0), key=f"k{i}", age=age) for i, age in enumerate(ages)
        ]

    features = str(tmp_path / "features")
    CheckpointWrapper(SampleWrapper(AddAge()), features_dir=features).transform(
        aged([20, 30])
    )
    wrapper = CheckpointWrapper(SampleWrapper(AddAge()), features_dir=features)
    expected = np.arange(3.0) + np.array([[21.0], [31.0]])
    assert_recomputed(wrapper, aged([21, 31]), expected, 2)


@variants(
    broken(
        "reads-only-the-input-attribute",
        "out-of-date checkpoint was reused",
        attributes=(
            (CheckpointWrapper, "read_attributes"),
            lambda self, fit=False: [self._sample_wrapper_option("input_attribute")],
        ),
    )
)
def test_metadata_the_step_reads_recomputes(tmp_path, claim):
    claim(check_metadata_the_step_reads_recomputes, tmp_path)


def check_another_save_func_recomputes(tmp_path):
    samples = make_samples(3)
    counting(tmp_path, save_func=save_npy, load_func=np.load)[0].transform(samples)
    edited, log = counting(tmp_path, save_func=save_npy_edited, load_func=np.load)
    assert_recomputed(edited, samples, stack(samples) + 1.0, 3, log, before=3)


@variants(
    broken(
        "one-format-identity",
        "one warning of 3 stale checkpoints, got \\[\\]",
        format=((CheckpointWrapper, "_format_identity"), lambda self: "a format"),
    )
)
def test_another_save_func_recomputes(tmp_path, claim):
    claim(check_another_save_func_recomputes, tmp_path)


def check_a_checkpoint_of_another_key_is_recomputed(tmp_path):
    samples = make_samples(2)
    samples[1].data = samples[0].data.copy()  # same input, other key
    wrapper, _ = counting(tmp_path)
    wrapper.transform(samples)
    first, second = (wrapper.checkpoint_path(s.key) for s in samples)
    shutil.copyfile(first, second)
    values, messages = transform(counting(tmp_path)[0], samples)
    assert messages and "1 foreign" in messages[0], (
        f"a checkpoint holding another key was reused: {messages}"
    )
    np.testing.assert_array_equal(values, stack(samples) + 1.0)
    with h5py.File(second) as f:
        assert Identity.parse(f.attrs["samplepipe"])[0].key == samples[1].key


@variants(
    broken(
        "judge-ignores-the-key",
        "holding another key was reused",
        judge=((ckpt, "judge"), judge_ignoring_the_key),
    )
)
def test_a_checkpoint_of_another_key_is_recomputed(tmp_path, claim):
    claim(check_a_checkpoint_of_another_key_is_recomputed, tmp_path)


# ---------------------------------------------------------------------------
# damaged files, files samplepipe did not write
# ---------------------------------------------------------------------------
def check_damaged_checkpoints_are_recomputed_alone(tmp_path):
    samples = make_samples(6)
    wrapper, log = counting(tmp_path)
    wrapper.transform(samples)
    paths = [wrapper.checkpoint_path(s.key) for s in samples]
    os.truncate(paths[0], os.path.getsize(paths[0]) // 2)  # truncated
    os.truncate(paths[2], 0)  # empty
    with open(paths[3], "wb") as f:  # not HDF5
        f.write(np.random.default_rng(0).bytes(2048))
    flip_byte(paths[4], (samples[4].data + 1.0).tobytes())  # fails its checksum
    values, messages = transform(counting(tmp_path)[0], samples)
    np.testing.assert_array_equal(
        values, stack(samples) + 1.0, err_msg="a damaged checkpoint was loaded"
    )
    assert len(messages) == 1 and "4 corrupt" in messages[0], messages
    assert read_calls(log, "transform") == [("transform", 6), ("transform", 4)], (
        "the damaged samples were not recomputed alone, in one call: "
        f"{read_calls(log, 'transform')}"
    )


@variants(
    broken(
        "skips-the-checksum",
        "damaged checkpoint was loaded",
        verified=((ckpt, "_verified"), verified_without_checksum),
        load=((hdf5_module, "load_verified"), load_verified_without_checksum),
    ),
    broken(
        "recomputes-the-whole-batch",
        "not recomputed alone",
        compute=((CheckpointWrapper, "_compute"), compute_the_whole_batch),
    ),
)
def test_damaged_checkpoints_are_recomputed_alone(tmp_path, claim):
    claim(check_damaged_checkpoints_are_recomputed_alone, tmp_path)


def check_a_file_samplepipe_did_not_write_is_never_overwritten(tmp_path):
    samples = make_samples(3)
    for layout in ("raw", "array"):  # another layout; samplepipe's, no record
        wrapper, log = counting(tmp_path, features_dir=str(tmp_path / layout))
        path = wrapper.checkpoint_path(samples[1].key)
        before = user_hdf5(path, dataset=layout)
        with pytest.raises(UnknownFileError, match=re.escape(repr(path))):
            wrapper.transform(samples)
        assert snapshot(tmp_path / layout) == {"s/00001.h5": before}
        assert read_calls(log) == [], "work was done before the error"


@variants(
    broken(
        "other-layout-is-corrupt",
        "DID NOT RAISE",
        readable=((ckpt, "_is_readable_hdf5"), lambda path: False),
    ),
    broken(
        "record-less-file-is-corrupt",
        "DID NOT RAISE",
        verified=((ckpt, "_verified"), verified_recordless_is_corrupt),
    ),
)
def test_a_file_samplepipe_did_not_write_is_never_overwritten(tmp_path, claim):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)  # the broken variants'
        claim(check_a_file_samplepipe_did_not_write_is_never_overwritten, tmp_path)


def check_a_file_swapped_after_transform_is_not_loaded(tmp_path):
    samples = make_samples(2)
    wrapper, _ = counting(tmp_path)
    out = wrapper.transform(samples)
    mine, other = (wrapper.checkpoint_path(s.key) for s in samples)
    st = os.stat(mine)
    assert os.path.getsize(other) == st.st_size  # setup: same size
    shutil.copyfile(other, mine + ".new")
    os.replace(mine + ".new", mine)  # another file, same size ...
    os.utime(mine, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and mtime
    with pytest.raises(CorruptCheckpointError, match="now foreign"):
        out[0].data  # noqa: B018 - loading is the point


@variants(
    broken(
        "stamp-of-size-and-mtime",
        "DID NOT RAISE",
        stamp=((ckpt, "stamp"), stamp_of_size_and_mtime),
        load=((hdf5_module, "load_verified"), load_verified_without_checksum),
    )
)
def test_a_file_swapped_after_transform_is_not_loaded(tmp_path, claim):
    claim(check_a_file_swapped_after_transform_is_not_loaded, tmp_path)


def check_a_link_out_of_features_dir_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "s").symlink_to(outside)
    wrapper, _ = counting(tmp_path)
    with pytest.raises(ValueError, match="outside features_dir"):
        wrapper.transform(make_samples(2))
    assert list(outside.iterdir()) == []


@variants(
    broken(
        "follows-links",
        "DID NOT RAISE",
        prepare=(
            (FilesLayout, "prepare_folder"),
            prepare_folder_following_links,
        ),
    )
)
def test_a_link_out_of_features_dir_is_refused(tmp_path, claim):
    claim(check_a_link_out_of_features_dir_is_refused, tmp_path)


# ---------------------------------------------------------------------------
# cleaning
# ---------------------------------------------------------------------------
def check_remove_checkpoints_removes_only_what_it_may(tmp_path):
    samples = make_samples(7)
    wrapper, _ = counting(tmp_path, offset=1.0)
    wrapper.transform(samples[:3])  # valid
    counting(tmp_path, offset=2.0)[0].transform(samples[3:4])  # stale
    wrapper.transform(samples[4:5])
    corrupt = wrapper.checkpoint_path(samples[4].key)
    os.truncate(corrupt, 100)
    shutil.copyfile(
        wrapper.checkpoint_path(samples[0].key), wrapper.checkpoint_path("s/00005")
    )  # foreign
    user_hdf5(wrapper.checkpoint_path("s/00006"))  # unknown
    folder = tmp_path / "features" / "s"
    dead = f".00007.h5.{HOST_TAG}-{dead_pid()}-0badc0de.tmp"
    live = f".00008.h5.{HOST_TAG}-{os.getppid()}-0badc0de.tmp"
    for tmp in (dead, live):
        (folder / tmp).write_bytes(b"half a checkpoint")
    before = snapshot(tmp_path / "features")
    removed = {
        (os.path.relpath(p, tmp_path / "features"), s)
        for p, s, _ in wrapper.remove_checkpoints()
    }
    expected = {
        ("s/00003.h5", "stale"),
        ("s/00004.h5", "corrupt"),
        ("s/00005.h5", "foreign"),
        (f"s/{dead}", "temporary"),
    }
    assert removed <= expected, f"removed what it must keep: {removed - expected}"
    assert removed == expected, f"kept what it must remove: {expected - removed}"
    kept = {p: b for p, b in before.items() if p not in {r for r, _ in removed}}
    assert snapshot(tmp_path / "features") == kept


@variants(
    broken(
        "other-layout-is-corrupt",
        "removed what it must keep.*00006",
        readable=((ckpt, "_is_readable_hdf5"), lambda path: False),
    ),
    broken(
        "live-writers-count-as-dead",
        "removed what it must keep.*00008",
        alive=((files_layout, "temporary_owner_alive"), lambda name: False),
    ),
)
def test_remove_checkpoints_removes_only_what_it_may(tmp_path, claim):
    claim(check_remove_checkpoints_removes_only_what_it_may, tmp_path)


def check_remove_checkpoints_keeps_the_files_of_a_step_without_its_model(tmp_path):
    samples = make_samples(3)
    fitted, _ = counting(
        tmp_path, stateless=False, model_path=str(tmp_path / "model.pkl")
    )
    fitted.fit(samples).transform(samples)
    before = snapshot(tmp_path / "features")
    mistyped, _ = counting(
        tmp_path, stateless=False, model_path=str(tmp_path / "modle.pkl")
    )
    listed = [s for _, s, _ in mistyped.iter_checkpoints()]
    removed = mistyped.remove_checkpoints()
    assert removed == [], f"files of a step without its model were removed: {removed}"
    assert listed == ["unknown"] * 3
    assert snapshot(tmp_path / "features") == before


@variants(
    broken(
        "judges-without-a-model",
        "without its model were removed",
        state=((CheckpointWrapper, "_has_model_state"), lambda self: True),
    )
)
def test_remove_checkpoints_keeps_the_files_of_a_step_without_its_model(
    tmp_path, claim
):
    claim(
        check_remove_checkpoints_keeps_the_files_of_a_step_without_its_model,
        tmp_path,
    )


def check_listing_checkpoints_never_unpickles_the_model(tmp_path):
    samples = make_samples(3)
    model = str(tmp_path / "model.pkl")
    counting(tmp_path, stateless=False, model_path=model)[0].fit(samples).transform(
        samples
    )
    marker = tmp_path / "unpickled"
    rewrite_payload(model, cloudpickle.dumps(Tripwire(str(marker))))
    fresh, _ = counting(tmp_path, stateless=False, model_path=model)
    listed = [s for _, s, _ in fresh.iter_checkpoints()]
    assert not marker.exists(), "listing the checkpoints unpickled the model file"
    assert listed == ["valid"] * 3


@variants(
    broken(
        "loads-the-model",
        "unpickled the model file",
        header=((model_module, "read_model_header"), header_by_loading),
    )
)
def test_listing_checkpoints_never_unpickles_the_model(tmp_path, claim):
    claim(check_listing_checkpoints_never_unpickles_the_model, tmp_path)


# ---------------------------------------------------------------------------
# keys, outputs, errors
# ---------------------------------------------------------------------------
BAD_KEYS = [
    ("../evil", "'..' components"),
    ("a/../../evil", "'..' components"),
    ("/tmp/evil", "relative paths"),
    ("a\\b", "backslash"),
    ("a\x00b", "NUL"),
    (".hidden", "reserved for temporary files"),
    ("", "must not be empty"),
]


def check_bad_keys_are_refused_before_any_work(tmp_path):
    wrapper, log = counting(tmp_path)
    for key, rule in BAD_KEYS:
        samples = [*make_samples(3), Sample(np.zeros(4), key=key)]
        expected = f"CheckpointWrapper got key {key!r} for sample 3; "
        with pytest.raises(ValueError, match=re.escape(expected)) as info:
            wrapper.transform(samples)
        assert rule in str(info.value), f"{key!r}: {info.value}"
        assert os.listdir(tmp_path) == [], f"{key!r}: work was done before the error"
    for name in ("..", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="has a step named"):
            wrap(
                ["sample", "checkpoint"],
                Pipeline([(name, CountingTransformer(stateless=True))]),
                features_dir=str(tmp_path / "features"),
                model_path=str(tmp_path / "models"),
            )
    valid = [Sample(np.ones(4), key=k) for k in ("a..b", "a:b")]
    try:
        out = wrapper.transform(valid)
    except ValueError as exc:
        raise AssertionError(f"a valid key was refused: {exc}") from exc
    np.testing.assert_array_equal(stack(out), np.full((2, 4), 2.0))
    assert sorted(os.listdir(tmp_path / "features")) == ["a..b.h5", "a:b.h5"]
    assert count_rows(log, "transform") == 2


@variants(
    broken(
        "lax-key-rule",
        "Regex pattern did not match|DID NOT RAISE",
        rule=((keys_module, "_key_rule"), lax_key_rule),
    ),
    broken(
        "refuses-any-dot-dot",
        "a valid key was refused",
        rule=((keys_module, "_key_rule"), key_rule_refusing_dot_dot),
    ),
)
def test_bad_keys_are_refused_before_any_work(tmp_path, claim):
    claim(check_bad_keys_are_refused_before_any_work, tmp_path)


def check_duplicate_keys_are_refused_before_any_work(tmp_path):
    wrapper, log = counting(tmp_path)
    samples = make_samples(4)
    samples[3].key = samples[1].key
    with pytest.raises(ValueError, match=re.escape("for samples 1 and 3")):
        wrapper.transform(samples)
    assert not (tmp_path / "features").exists()
    assert read_calls(log) == []


@variants(
    broken(
        "no-duplicate-check",
        "DID NOT RAISE",
        keys=((checkpoint_module, "sample_keys"), sample_keys_without_duplicates_check),
    )
)
def test_duplicate_keys_are_refused_before_any_work(tmp_path, claim):
    claim(check_duplicate_keys_are_refused_before_any_work, tmp_path)


def check_an_unsupported_output_writes_nothing(tmp_path):
    features = tmp_path / "features"
    wrapper = CheckpointWrapper(
        SampleWrapper(LastUnstorable()), features_dir=str(features)
    )
    with pytest.raises(TypeError, match="save_func"):
        wrapper.transform(make_samples(3))
    written = snapshot(features) if features.exists() else {}
    assert written == {}, f"files of the failed batch were written: {list(written)}"


@variants(
    broken(
        "writes-as-it-encodes",
        "files of the failed batch were written",
        encode=((FilesLayout, "encode"), encode_later),
        save=((FilesLayout, "save_one"), save_encoding_first),
    )
)
def test_an_unsupported_output_writes_nothing(tmp_path, claim):
    claim(check_an_unsupported_output_writes_nothing, tmp_path)


def check_only_transient_io_errors_are_retried(tmp_path):
    samples = make_samples(1)
    for code in (errno.EIO, errno.ENOSPC):
        calls: list[str] = []

        def save(data, path, code=code, calls=calls):
            calls.append(path)
            if len(calls) == 1 or code == errno.ENOSPC:  # a full disk stays full
                raise OSError(code, os.strerror(code))
            save_npy(data, path)

        wrapper, _ = counting(
            tmp_path,
            features_dir=str(tmp_path / errno.errorcode[code]),
            save_func=save,
            load_func=np.load,
            attempts=3,
        )
        if code == errno.EIO:
            try:
                out = wrapper.transform(samples)
            except OSError as exc:
                msg = f"a transient error was not retried: {exc}"
                raise AssertionError(msg) from exc
            assert len(calls) == 2
            np.testing.assert_array_equal(out[0].data, samples[0].data + 1.0)
        else:
            with pytest.raises(OSError, match="No space left"):
                wrapper.transform(samples)
            assert len(calls) == 1, f"a full disk was tried {len(calls)} times"


@variants(
    broken(
        "retries-every-error",
        "full disk was tried 3 times",
        rule=((files_layout, "is_permanent"), lambda exc: False),
    ),
    broken(
        "retries-nothing",
        "transient error was not retried",
        rule=((files_layout, "is_permanent"), lambda exc: True),
    ),
)
def test_only_transient_io_errors_are_retried(tmp_path, claim):
    claim(check_only_transient_io_errors_are_retried, tmp_path)


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------
def model_step(tmp_path, offset=0.0):
    return counting(
        tmp_path,
        offset=offset,
        stateless=False,
        features_dir=None,
        model_path=str(tmp_path / "model.pkl"),
    )


def check_a_model_is_reused_only_for_the_same_step_and_training_samples(tmp_path):
    samples = make_samples(6)
    step, log = model_step(tmp_path)
    step.fit(samples)
    model_step(tmp_path)[0].fit(samples)
    assert count_rows(log, "fit") == 6  # the same step and samples: loaded
    other = make_samples(6, seed=1)  # same keys, other data
    refit = model_step(tmp_path)[0].fit(other)
    np.testing.assert_allclose(
        refit.estimator.estimator.mean_,
        stack(other).mean(axis=0),
        err_msg="a model fitted on other data under the same keys was loaded",
    )
    model_step(tmp_path, offset=5.0)[0].fit(other)
    assert count_rows(log, "fit") == 18, "a step of other parameters loaded the model"


@variants(
    broken(
        "training-digest-of-keys-only",
        "fitted on other data",
        digest=(
            (model_module, "training_digest"),
            lambda samples, attributes: keys_digest(str(s.key) for s in samples),
        ),
    ),
    IDENTITY_WITHOUT_PARAMETERS,
)
def test_a_model_is_reused_only_for_the_same_step_and_training_samples(tmp_path, claim):
    claim(check_a_model_is_reused_only_for_the_same_step_and_training_samples, tmp_path)


def check_a_damaged_model_payload_is_refitted(tmp_path):
    samples = make_samples(6)
    step, log = model_step(tmp_path)
    step.fit(samples)
    mean = step.estimator.estimator.mean_.copy()
    flip_byte(step.model_path, mean.tobytes())  # still unpickles, to another mean
    again = model_step(tmp_path)[0].fit(samples)
    np.testing.assert_array_equal(
        again.estimator.estimator.mean_,
        mean,
        err_msg="a model failing its SHA-256 was loaded",
    )
    assert count_rows(log, "fit") == 12


@variants(
    broken(
        "skips-size-and-sha256",
        "failing its SHA-256 was loaded",
        load=((model_module, "load_model"), load_model_skipping_digest),
    )
)
def test_a_damaged_model_payload_is_refitted(tmp_path, claim):
    claim(check_a_damaged_model_payload_is_refitted, tmp_path)


def check_a_model_that_cannot_be_unpickled_is_refitted(tmp_path):
    samples = make_samples(6)
    step, log = model_step(tmp_path)
    step.fit(samples)
    # a class whose module is gone since (protocol 0: GLOBAL, then STOP)
    rewrite_payload(step.model_path, b"cno_such_module_anywhere\nThing\n.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ModelWarning)
        try:
            again = model_step(tmp_path)[0].fit(samples)
        except ImportError as exc:
            raise AssertionError(f"fit raised {exc!r} instead of refitting") from exc
    assert [str(w.message) for w in caught if w.category is ModelWarning], (
        "no ModelWarning"
    )
    assert "cannot be unpickled" in str(caught[0].message)
    assert count_rows(log, "fit") == 12
    np.testing.assert_allclose(again.estimator.estimator.mean_, stack(samples).mean(0))


@variants(
    broken(
        "lets-unpickling-errors-through",
        "instead of refitting",
        load=((model_module, "load_model"), load_model_letting_errors_through),
    )
)
def test_a_model_that_cannot_be_unpickled_is_refitted(tmp_path, claim):
    claim(check_a_model_that_cannot_be_unpickled_is_refitted, tmp_path)


# ---------------------------------------------------------------------------
# locks
# ---------------------------------------------------------------------------
def check_two_managers_never_hold_one_key(tmp_path):
    run_a = CrashSafeFileLocks(tmp_path / "locks")
    run_b = CrashSafeFileLocks(tmp_path / "locks")
    assert run_a.acquire_lock("batch-1", "run-a", acquire_timeout=0)
    try:
        taken = run_b.acquire_lock("batch-1", "run-b", acquire_timeout=0)
        assert not taken, "two runs hold the lock of one batch at once"
    finally:
        run_a.release_lock("batch-1", "run-a")
        run_b._forget("batch-1")
    assert run_b.acquire_lock("batch-1", "run-b", acquire_timeout=0)
    run_b.release_lock("batch-1", "run-b")


@variants(
    broken(
        "judges-holders-dead-without-flock",
        "hold the lock of one batch at once",
        alive=(
            (CrashSafeFileLocks, "_holder_is_alive"),
            lambda self, fd, record: False,
        ),
    )
)
def test_two_managers_never_hold_one_key(tmp_path, claim):
    claim(check_two_managers_never_hold_one_key, tmp_path)


def check_a_lock_folder_others_can_write_is_refused(tmp_path):
    folder = tmp_path / "locks"
    folder.mkdir()
    folder.chmod(0o777)
    locks = CrashSafeFileLocks(folder)
    try:
        with pytest.raises(UnsafeLockFolderError, match="other users can write"):
            locks.acquire_lock("batch-1", "run-a", acquire_timeout=0)
    finally:
        locks._forget("batch-1")  # closes the lock a broken variant took
    assert list(folder.iterdir()) == []


@variants(
    broken(
        "ignores-unsafe-folders",
        "DID NOT RAISE",
        refuse=((CrashSafeFileLocks, "_refuse"), refuse_nothing),
    )
)
def test_a_lock_folder_others_can_write_is_refused(tmp_path, claim):
    claim(check_a_lock_folder_others_can_write_is_refused, tmp_path)


# ---------------------------------------------------------------------------
# claims found false, then mended
# ---------------------------------------------------------------------------
def test_switching_from_hdf5_to_a_custom_format_recomputes(tmp_path):
    samples = make_samples(3)
    counting(tmp_path)[0].transform(samples)
    custom, log = counting(tmp_path, save_func=save_npy, load_func=np.load)
    assert_recomputed(custom, samples, stack(samples) + 1.0, 3, log, before=3)
