"""Exporting an index's embeddings for other systems: chunked ``.npy`` files, paths, manifest.

What a folder written by :func:`export_embeddings` holds::

    vectors-00000.npy ...  (rows, dim) arrays, L2-normalised; concatenated in name order they
                           are every stored vector, row r of the whole being row r of paths.csv
    paths.csv              header ``row,path``: each row's image as the index keys it:
                           relative to its root (``NAME/...`` in a library of several roots)
    embeddings.json        written last: count, dim, dtype, chunk files and their rows, the
                           roots (name, folder, key prefix; ``root``: the first one's folder),
                           the model (source, weights hash) and the index's store generation

A folder without ``embeddings.json`` is an export that did not finish. Everything is read from
one snapshot of the store (a commit meanwhile is not seen) and streamed ``chunk_rows`` vectors
at a time: memory is one chunk, whatever the size of the collection.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MoCoRetrievalError
from .index import ImageIndex
from .layout import now, write_json_atomic
from .store_db import check_dtype

log = logging.getLogger(__name__)

EXPORT_MANIFEST = "embeddings.json"
PATHS_FILE = "paths.csv"
CHUNK_PATTERN = "vectors-*.npy"
# Bytes per chunk file (and per read from the store): 16k rows of 2048-d float32. Large enough
# that a 10M-image export is a few thousand files, small enough to load one on a laptop.
CHUNK_BYTES = 128 << 20
FORMAT = "mocoretrieval-embeddings"
FORMAT_VERSION = 1


@dataclass
class ExportReport:
    """What :func:`export_embeddings` wrote."""

    out: Path
    count: int
    dim: int
    dtype: str
    chunks: list[str] = field(default_factory=list)  # file names, in row order


def _chunk_name(i: int) -> str:
    return f"vectors-{i:05d}.npy"


def _prepare(out: Path, force: bool) -> None:
    """Makes ``out`` an empty folder, or with ``force`` clears an earlier export from it.

    Only an export's own files are removed with ``force`` (its manifest first, so that a crash
    meanwhile never leaves a manifest over other chunks); anything else there is left alone.
    """
    if out.exists() and not out.is_dir():
        raise MoCoRetrievalError(f"{out} is a file: pass a folder to export into")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise MoCoRetrievalError(
                f"{out} is not empty: pass an empty or new folder, or --force to replace an "
                "earlier export there"
            )
        (out / EXPORT_MANIFEST).unlink(missing_ok=True)
        for old in [*out.glob(CHUNK_PATTERN), out / PATHS_FILE]:
            old.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _save_synced(path: Path, array: np.ndarray) -> None:
    """``np.save`` flushed to the disk: the manifest, written last, never lists a torn chunk."""
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def export_embeddings(
    index: str | Path | None,
    out: str | Path,
    *,
    dtype: str | None = None,
    chunk_rows: int | None = None,
    force: bool = False,
) -> ExportReport:
    """Writes every stored vector of an index, with its image's path, into the folder ``out``.

    Args:
        index: the index directory, or an indexed folder; None: found in the current folder or
            its parents (see :meth:`ImageIndex.open`).
        out: the folder to write (created when missing).
        dtype: ``float32`` or ``float16``; None: the index's store dtype (nothing widened
            or narrowed: the values as stored).
        chunk_rows: vectors per ``.npy`` file; None: about :data:`CHUNK_BYTES` of them.
        force: replace an earlier export in ``out`` instead of refusing a non-empty folder.

    Raises:
        MoCoRetrievalError: ``out`` is not empty (without ``force``) or is a file; a dtype or
            chunk size that cannot be used; no index at ``index``.
    """
    if chunk_rows is not None and chunk_rows < 1:
        raise MoCoRetrievalError(f"chunk_rows must be at least 1, not {chunk_rows}")
    out = Path(out).expanduser()
    with ImageIndex.open(index) as opened:
        store = opened.store
        dtype = check_dtype(dtype or store.dtype)
        itemsize = np.dtype(dtype).itemsize
        rows = chunk_rows or max(1, CHUNK_BYTES // (itemsize * store.dim))
        _prepare(out, force)
        report = ExportReport(out=out, count=0, dim=store.dim, dtype=dtype)
        chunk_entries = []
        with (
            store.snapshot_chunks(rows) as snapshot,
            open(
                out / PATHS_FILE, "w", newline="", encoding="utf-8", errors="surrogateescape"
            ) as paths_file,
        ):
            paths = csv.writer(paths_file)
            paths.writerow(["row", "path"])
            for i, (_, vectors, rels) in enumerate(snapshot.chunks_with_paths()):
                name = _chunk_name(i)
                _save_synced(out / name, vectors.astype(dtype, copy=False))
                paths.writerows(zip(range(report.count, report.count + len(rels)), rels))
                chunk_entries.append({"file": name, "rows": len(rels), "first_row": report.count})
                report.chunks.append(name)
                report.count += len(rels)
            if report.count != snapshot.n:
                raise MoCoRetrievalError(
                    f"the index holds {snapshot.n} vectors but {report.count} with a file; "
                    "run `mocoretrieval index` on it, then export again"
                )
            generation, store_dtype = snapshot.generation, snapshot.dtype
            paths_file.flush()
            os.fsync(paths_file.fileno())
        encoder = opened.manifest["encoder"]
        write_json_atomic(
            out / EXPORT_MANIFEST,
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "count": report.count,
                "dim": report.dim,
                "dtype": dtype,
                "store_dtype": store_dtype,
                "normalized": True,
                "metric": opened.manifest["metric"],
                "chunks": chunk_entries,
                "paths": PATHS_FILE,
                "root": str(opened.root),
                "roots": [
                    {"name": r.name, "path": str(r.path), "prefix": r.prefix} for r in opened.roots
                ],
                "index_dir": str(opened.path),
                "model": {"source": encoder["source"], "weights_hash": encoder["weights_hash"]},
                "store_generation": generation,
                "exported": now(),
            },
        )
    log.info("exported %d %d-d %s vectors to %s", report.count, report.dim, dtype, out)
    return report
