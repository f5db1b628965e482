"""``samplepipe status`` and ``samplepipe clean``: the files of each step, judged.

Both read model headers only (nothing is unpickled) and never judge a folder
with a pipeline that did not write it.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter

from rich.markup import escape
from rich.table import Table

from ._cli_common import (
    DEMO_FEATURES_DIR,
    DEMO_MODEL_DIR,
    _judged,
    _pipeline_or_demo,
    _print_table,
    _steps,
    console,
    err,
)
from .errors import CommandError
from .storage import Status

# A scan that met a file vanishing under it (a job writing into the folder)
# starts again, at most this many times.
SCAN_ATTEMPTS = 20
# What status counts, in its columns; clean removes only REMOVABLE files.
STATUSES = (
    Status.VALID,
    Status.STALE,
    Status.CORRUPT,
    Status.FOREIGN,
    Status.UNKNOWN,
    Status.TEMPORARY,
    Status.WRITING,
)
REMOVABLE = (Status.STALE, Status.CORRUPT, Status.FOREIGN, Status.TEMPORARY)


def _scanned(name, step, scan):
    """``[(path, status, size)]`` from ``scan()``; scans again if a file vanished.

    Files that vanished while being judged (status ``missing``) are left out.
    """
    last = None
    for attempt in range(SCAN_ATTEMPTS):
        try:
            return [f for f in scan() if f[1] != Status.MISSING]
        except FileNotFoundError as exc:
            # A writer renamed or removed a file between listing and reading
            # it; the partial scan is dropped and the folder scanned again.
            last = exc
            time.sleep(0.005 * attempt)
    msg = (
        f"samplepipe could not scan step {name!r}: "
        f"{getattr(last, 'filename', None)!r} vanished "
        f"during each of {SCAN_ATTEMPTS} scans of {os.fspath(step.features_dir)!r} "
        "(a job is removing files there, or it is a broken symbolic link). Run "
        "again when the job is done, or remove the broken link."
    )
    raise CommandError(msg) from last


def _not_judged(files):
    """``files`` of a step that cannot be judged: all ``unknown`` but temporaries."""
    return [
        (path, s if s in (Status.TEMPORARY, Status.WRITING) else Status.UNKNOWN, size)
        for path, s, size in files
    ]


def status(
    pipeline: str | None = None,
    *,
    pipeline_kwargs: str = "{}",
    features_dir: str = DEMO_FEATURES_DIR,
    model_dir: str = DEMO_MODEL_DIR,
    storage_options: str = "{}",
    layout: str = "files",
) -> int:
    """Per step: checkpoints valid / stale / corrupt / foreign / unknown / temporary.

    Also files being written and bytes. Reads model headers only; nothing is
    unpickled. A step whose fitted model cannot be read (and every step after
    it) shows "?" for valid, stale, corrupt and foreign: its files are unknown.
    Unknown files (also readable files samplepipe did not write) are never
    removed by clean.

    Parameters
    ----------
    pipeline
        Import path of the pipeline that wrote the checkpoints (as for run),
        e.g. mymodule:make_pipeline. Required, except for ./samplepipe-demo.
    pipeline_kwargs
        JSON keyword arguments for PIPELINE.
    features_dir
        Folder of the feature checkpoints.
    model_dir
        Folder of the fitted models.
    storage_options
        JSON fsspec options for URL folders (s3://...), e.g.
        '{"endpoint_url": "http://127.0.0.1:9000"}'; credentials are better
        given through the environment.
    layout
        files (one <key>.h5 per sample) or shards (one file per batch of
        samples): how the pipeline's plain steps checkpoint.
    """
    from .storage import read_model_header

    pipeline = _pipeline_or_demo("status", pipeline, features_dir, model_dir)
    steps = _steps(
        "status",
        pipeline,
        pipeline_kwargs,
        features_dir,
        model_dir,
        (storage_options, layout),
    )
    table = Table(title=f"checkpoints in {escape(features_dir)}")
    columns = STATUSES
    for column in ("step", "model", *columns, "bytes"):
        table.add_column(
            column,
            justify="left" if column in ("step", "model") else "right",
            overflow="fold",
        )
    notes = []
    for name, step, unknown in _judged(steps):
        files = _scanned(name, step, step.iter_checkpoints)
        if unknown is not None:
            files = _not_judged(files)
        counts = Counter(status for _, status, _ in files)
        cells = [str(counts[c]) for c in columns]
        if unknown is not None:
            cells[:4] = ["?"] * 4  # valid, stale, corrupt, foreign
            notes.append(
                f"{name}: unknown ({unknown}): {counts[Status.UNKNOWN]} file(s) not "
                "judged; clean keeps them."
            )
        if step.model_path is None:
            model = "-"
        else:
            header = read_model_header(step.model_path, step.storage_options)
            model = "present" if header else "missing"
        size = sum(s for _, _, s in files)
        table.add_row(escape(name), model, *cells, str(size))
    _print_table(table)
    for note in notes:
        console.print(escape(note), soft_wrap=True)
    return 0


def clean(
    pipeline: str | None = None,
    *,
    pipeline_kwargs: str = "{}",
    features_dir: str = DEMO_FEATURES_DIR,
    model_dir: str = DEMO_MODEL_DIR,
    storage_options: str = "{}",
    layout: str = "files",
    yes: bool = False,
    dry_run: bool = False,
) -> int:
    """Remove stale, corrupt and foreign checkpoints and leftover temporary files.

    Reads model headers only; nothing is unpickled. A step whose fitted model
    cannot be read (a missing or mistyped --model-dir) cannot tell valid files
    from stale ones: its files and those of every later step are kept and
    listed as "unknown (no model at PATH)". Each file is judged again right
    before it is removed, and kept if it changed since it was listed.

    Exit status: 0 when done; 1 when files of such a step were kept, when a
    file kept vanishing during the scan, or when nothing was removed because
    --yes was missing; 2 when PIPELINE is missing outside ./samplepipe-demo or
    cannot be imported.

    Parameters
    ----------
    pipeline
        Import path of the pipeline that wrote the checkpoints (as for run),
        e.g. mymodule:make_pipeline. Required, except for ./samplepipe-demo.
    pipeline_kwargs
        JSON keyword arguments for PIPELINE.
    features_dir
        Folder of the feature checkpoints.
    model_dir
        Folder of the fitted models.
    storage_options
        JSON fsspec options for URL folders (s3://...), e.g.
        '{"endpoint_url": "http://127.0.0.1:9000"}'; credentials are better
        given through the environment.
    layout
        files (one <key>.h5 per sample) or shards (one file per batch of
        samples): how the pipeline's plain steps checkpoint.
    yes
        Remove without asking.
    dry_run
        Only list what would be removed.
    """
    pipeline = _pipeline_or_demo("clean", pipeline, features_dir, model_dir)
    steps = _steps(
        "clean",
        pipeline,
        pipeline_kwargs,
        features_dir,
        model_dir,
        (storage_options, layout),
    )
    doomed, kept = [], []  # doomed: (name, step, files); kept: (name, why, files)
    for name, step, unknown in _judged(steps):
        if unknown is not None:
            kept.append((name, unknown, _scanned(name, step, step.iter_checkpoints)))
            continue

        def listing(step=step):
            return step.remove_checkpoints(statuses=REMOVABLE, dry_run=True)

        files = _scanned(name, step, listing)
        if files:
            doomed.append((name, step, files))
    listed = [f for _, _, files in doomed for f in files]
    for path, status, size in listed:
        console.print(f"{status:9s} {size:10d}  {escape(path)}", soft_wrap=True)
    for name, unknown, files in kept:
        console.print(
            escape(f"{name}: unknown ({unknown}); {len(files)} file(s) kept"),
            soft_wrap=True,
        )
    total = sum(size for _, _, size in listed)
    console.print(f"{len(listed)} file(s), {total} bytes")
    code = 0
    if any(files for _, _, files in kept):
        names = ", ".join(repr(name) for name, _, files in kept if files)
        msg = (
            f"samplepipe clean kept the files of step(s) {names}: without a "
            "readable fitted model it cannot tell valid files from stale ones. "
            f"Got --model-dir {model_dir!r}; pass the --model-dir that holds the "
            "models (or run the pipeline first)."
        )
        err.print(f"warning: {escape(msg)}", soft_wrap=True)
        code = 1
    if dry_run or not listed:
        return code
    if not yes:
        if not sys.stdin.isatty():
            err.print("Not removing anything: pass --yes (or --dry-run).")
            return 1
        if input("Remove them? [y/N] ").strip().lower() not in ("y", "yes"):
            return 1
    removed = []
    for name, step, _ in doomed:

        def removal(step=step):
            return step.remove_checkpoints(statuses=REMOVABLE)

        removed += _scanned(name, step, removal)
    gone = {path for path, _, _ in removed}
    for path, _, _ in listed:
        if path not in gone:
            console.print(
                f"kept {escape(path)}: it changed since it was listed", soft_wrap=True
            )
    was_listed = {path for path, _, _ in listed}
    for path, status, size in removed:
        if path not in was_listed:
            console.print(
                f"{status:9s} {size:10d}  {escape(path)} (found while removing)",
                soft_wrap=True,
            )
    console.print(f"Removed {len(removed)} file(s).")
    return code
