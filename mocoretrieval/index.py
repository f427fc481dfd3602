"""`ImageIndex`: an incremental, crash-safe FAISS index over an image folder, pinned to its encoder.

The store (SQLite) is the source of truth; the FAISS file is derived from the stored embeddings
and rebuilt from them — never by the model — when it is missing, corrupt or stale. See
:mod:`mocoretrieval.layout` for what the index directory holds.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image

from . import ann, embed
from .data import empty_folders, load_image, scan_images
from .errors import ImageError, IndexChangedError, MoCoRetrievalError, ModelMismatchError
from .faiss_file import FaissFile
from .layout import (
    DATABASE,
    DEFAULT_DIRNAME,
    FORMAT_VERSION,
    LOCK_FILE,
    MANIFEST,
    UpdateLock,
    find_index_dir,
    now,
    read_manifest,
    write_json_atomic,
)
from .store import FileStat, Store

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

# Cosine similarity above which two images count as near-duplicates, set for the default
# encoder (moco-v2-r18-photos) on held-out photos among never-trained distractors
# (benchmarks/RESULTS.md, "default encoder"): the same picture at other sizes scores >= 0.9989
# (precision and recall 1.000 from 0.97 to 0.998); copies under light edits reach 0.889 recall
# at precision 1.000 here. Lower it for looser matches (crops, edits), at some precision; other
# encoders have other scales (`mocoretrieval eval duplicates` finds theirs).
DEFAULT_DUPLICATE_THRESHOLD = 0.97
# Neighbours looked at per image when grouping near-duplicates: bounds the work of a dense
# cluster (n alike images) to n x 32 pairs instead of n^2.
DUPLICATE_NEIGHBOURS = 32

Query = str | os.PathLike | Image.Image | np.ndarray


class SearchResult(NamedTuple):
    """One hit: the image's absolute path, its cosine similarity to the query, and its path
    relative to the indexed root (POSIX, as :meth:`ImageIndex.paths` lists it)."""

    path: str
    score: float
    relpath: str


@dataclass
class UpdateReport:
    """What one :meth:`ImageIndex.update` did. Paths are relative to the root.

    ``seconds`` is the whole update (walk, model, commits, FAISS rebuild) and ``images_per_s``
    the files embedded or skipped per second of it: end to end, as a user waits for it.
    """

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> paths
    # Folders that could not be listed (unmounted, no permission): folder -> reason. What the
    # index holds under them is kept, not counted as deleted.
    unreadable: dict[str, str] = field(default_factory=dict)
    # Folders that list nothing while the index holds files under them (the mount point of an
    # unmounted drive; "." for the root): folder -> files kept. ``prune_empty`` removes them.
    empty: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_s: float = 0.0

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())


def _model_source(model: str | os.PathLike) -> str:
    """A model source as the manifest keeps it: local paths made absolute, aliases as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


class DeferredModel:
    """A model the index loads only when it needs one: to embed files or an image query.

    Given for the index's own model, an unchanged folder then costs no model loading at all;
    the loaded weights are checked against the index's pin like any model's.

    Args:
        load: returns the encoder (e.g. an onnxruntime backend of the index's source).
    """

    def __init__(self, load: Callable[[], Any]) -> None:
        self.load = load


def _under(path: str, folders: dict[str, str]) -> bool:
    """Whether ``path`` is inside one of ``folders`` (POSIX, relative; ``"."`` is the root)."""
    return any(f == "." or path.startswith(f.rstrip("/") + "/") for f in folders)


def _inside_root(rel: str) -> str | None:
    """A stored relative path, normalised; None for one that is absolute or leaves the root
    (``../../etc/passwd``): the database is not trusted."""
    norm = os.path.normpath(rel) if rel and "\x00" not in rel else ""
    if not norm or norm in (".", "..") or os.path.isabs(norm) or norm.startswith("../"):
        log.warning("ignoring stored path %s: it is not inside the root", _display(rel))
        return None
    return norm


def _display(text: str) -> str:
    """Text from the database as safe to print: control characters escaped (a crafted name
    must not drive the terminal)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _file_key(path: Path) -> tuple[int, int, int] | None:
    """Identifies one version of a file replaced by rename: (inode, mtime, size)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _load_encoder(model: Any, device: str | None) -> tuple[Any, str | None]:
    """``(encoder, source)`` from a source string/path, an encoder or a DeferredModel."""
    if isinstance(model, DeferredModel):
        model = model.load()
    if isinstance(model, (str, os.PathLike)):
        from .sources import load

        source = _model_source(model)
        return load(source, device=embed.resolve_device(device)), source
    return model, getattr(model, "loaded_from", None) or getattr(model, "source", None)


class ImageIndex:
    """A searchable, incrementally updated index of every image under a root folder.

    Use :meth:`build` (create or reuse, then update), :meth:`create` or :meth:`open`; the
    constructor is internal.

    An opened index is a reader: it never writes to the index directory, and before each
    search it notices a newer manifest (another process updated or rebuilt the index) and
    reloads it. Only :meth:`update` writes, holding the directory's lock from its first change
    to its last, so a run refused for the lock changes nothing.
    """

    def __init__(
        self,
        index_dir: Path,
        manifest: dict[str, Any],
        encoder: Any = None,
        device: str | None = None,
        *,
        readonly: bool = True,
    ) -> None:
        self.path = index_dir
        self.manifest = manifest
        self._manifest_key = _file_key(index_dir / MANIFEST)
        root = Path(manifest["root"])
        self.root = root if root.is_absolute() else (index_dir / root).resolve()
        self.dim = int(manifest["encoder"]["dim"])
        self.store = Store(index_dir / DATABASE, self.dim, readonly=readonly)
        self._encoder = encoder
        self._deferred: DeferredModel | None = None
        self._device = device
        self.faiss = FaissFile(index_dir, self.store, self.manifest, self._save_manifest)
        self.last_report: UpdateReport | None = None
        # Asked for by create() and applied by update() under the lock: (encoder, source) to
        # re-embed everything with, and a FAISS factory string to switch to.
        self._pending_reset: tuple[Any, str | None] | None = None
        self._pending_index_type: str | None = None

    # --- creating and opening -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: str | Path,
        model: Any = None,
        index_dir: str | Path | None = None,
        *,
        index_type: str | None = None,
        rebuild: bool = False,
        device: str | None = None,
    ) -> ImageIndex:
        """Creates the index of ``root``, or reuses the one already there.

        An existing index is not changed here: a rebuild and a new index type are checked now
        and applied by :meth:`update`, under the lock (``build`` calls it).

        Args:
            root: the image folder.
            model: a model source (alias, directory, Hub id, checkpoint) or an encoder. None:
                the existing index's model, or :data:`~mocoretrieval.sources.DEFAULT_MODEL`.
            index_dir: where the index lives; default ``root/.mocoretrieval``.
            index_type: a FAISS factory string; None keeps the existing choice (automatic for a
                new index).
            rebuild: forget every embedding and start over (e.g. with another model).
            device: torch device for the model; None picks one.

        Raises:
            ModelMismatchError: ``model`` is not the model the existing index was built with.
        """
        root = Path(root).expanduser().resolve()
        if not root.is_dir():
            raise MoCoRetrievalError(f"{root} is not a folder: pass the folder of images to index")
        index_dir = Path(index_dir).expanduser().resolve() if index_dir else root / DEFAULT_DIRNAME
        if (index_dir / MANIFEST).is_file():
            index = cls.open(index_dir, device=device)
            if index.root != root:
                raise MoCoRetrievalError(
                    f"the index at {index_dir} is the index of {index.root}, not of {root}: "
                    "pass another --index DIR"
                )
            dim = index.dim
            if rebuild:
                index._pending_reset = _load_encoder(
                    model if model is not None else index.manifest["encoder"]["source"], device
                )
                dim = int(index._pending_reset[0].dim)
            elif model is not None:
                index._use_encoder(
                    model,
                    hint="use a new --index DIR, or --rebuild to re-embed "
                    "every image with the new model",
                )
            if index_type is not None and index_type != index.manifest["index_type"]:
                ann.check_factory(index_type, dim)
                index._pending_index_type = index_type
            return index
        if index_dir.exists() and any(p.name != LOCK_FILE for p in index_dir.iterdir()):
            raise MoCoRetrievalError(
                f"{index_dir} exists and is not a mocoretrieval index: pass another --index DIR"
            )
        from .sources import DEFAULT_MODEL

        encoder, source = _load_encoder(model if model is not None else DEFAULT_MODEL, device)
        if index_type is not None:
            ann.check_factory(index_type, int(encoder.dim))
        inside = index_dir == root or root in index_dir.parents
        manifest = {
            "format_version": FORMAT_VERSION,
            # Relative when inside the root, so the folder can be moved with its index.
            "root": os.path.relpath(root, index_dir) if inside else str(root),
            "encoder": cls._encoder_entry(encoder, source),
            "metric": "inner_product",
            "index_type": index_type or "auto",
            "faiss": None,
            "created": now(),
            "last_update": None,
        }
        index_dir.mkdir(parents=True, exist_ok=True)
        with UpdateLock(index_dir):
            if (index_dir / MANIFEST).is_file():
                raise MoCoRetrievalError(
                    f"another process created an index at {index_dir} meanwhile; run the "
                    "command again to update that one"
                )
            index = cls(index_dir, manifest, encoder=encoder, device=device, readonly=False)
            write_json_atomic(index_dir / MANIFEST, manifest)  # last: the database exists
            index._manifest_key = _file_key(index_dir / MANIFEST)
        return index

    @classmethod
    def build(
        cls,
        root: str | Path,
        model: Any = None,
        index_dir: str | Path | None = None,
        *,
        index_type: str | None = None,
        rebuild: bool = False,
        batch_size: int | None = None,
        workers: int | None = None,
        device: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        prune_empty: bool = False,
    ) -> ImageIndex:
        """:meth:`create` then :meth:`update`; the update's report is in ``.last_report``."""
        index = cls.create(
            root, model, index_dir, index_type=index_type, rebuild=rebuild, device=device
        )
        index.update(
            batch_size=batch_size,
            workers=workers,
            device=device,
            progress=progress,
            prune_empty=prune_empty,
        )
        return index

    @classmethod
    def open(
        cls, path: str | Path | None = None, *, model: Any = None, device: str | None = None
    ) -> ImageIndex:
        """Opens an existing index.

        Args:
            path: the index directory, or a root folder holding ``.mocoretrieval``; None looks
                in the current directory and its parents.
            model: the encoder (or its source) to search with; checked against the one the
                index was built with. None loads that one when first needed.
            device: torch device for the model.

        Raises:
            IndexFormatError: no index there, or one of a newer format.
            ModelMismatchError: ``model`` is another model than the index's.
        """
        index_dir = find_index_dir(path)
        index = cls(index_dir, read_manifest(index_dir), device=device)
        if model is not None:
            index._use_encoder(
                model,
                hint="search it with the model it was built with, or "
                "re-index with `mocoretrieval index ROOT --model ... --rebuild`",
            )
        return index

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        self._sync()
        return self.store.count()

    # --- the encoder ----------------------------------------------------------------------

    @staticmethod
    def _encoder_entry(encoder: Any, source: str | None) -> dict[str, Any]:
        return {
            "source": source,
            "weights_hash": encoder.weights_hash(),
            "config": encoder.config.to_dict() if hasattr(encoder, "config") else None,
            "dim": int(encoder.dim),
        }

    @property
    def encoder(self) -> Any:
        """The index's encoder, loaded from its recorded source on first use."""
        if self._encoder is None and self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            self._use_encoder(
                deferred.load(), hint="the model changed since indexing; use --rebuild"
            )
        if self._encoder is None:
            source = self.manifest["encoder"]["source"]
            if source is None:
                raise ModelMismatchError(
                    f"the index at {self.path} was built with an encoder that was never saved; "
                    "pass it with ImageIndex.open(path, model=encoder)"
                )
            self._use_encoder(
                source,
                hint="the model at that source changed since indexing; re-index with --rebuild",
            )
        return self._encoder

    def _use_encoder(self, model: Any, hint: str) -> None:
        if isinstance(model, DeferredModel) and self._encoder is None:
            self._deferred = model  # checked when loaded, if ever
            return
        encoder, source = _load_encoder(model, self._device)
        pinned = self.manifest["encoder"]
        if encoder.weights_hash() != pinned["weights_hash"]:
            raise ModelMismatchError(
                f"the index at {self.path} was built with {pinned['source']} (weights "
                f"{pinned['weights_hash'][:12]}), not with {source} (weights "
                f"{encoder.weights_hash()[:12]}): {hint}"
            )
        self._encoder = encoder

    def _reset(self, encoder: Any, source: str | None) -> None:
        """Forgets every embedding and pins ``encoder``; only under the lock."""
        self.store.clear()  # first: a crash after it leaves an empty index, never a mixed one
        self.dim = self.store.dim = int(encoder.dim)  # the store is empty: any dim fits
        self.manifest["encoder"] = self._encoder_entry(encoder, source)
        self.manifest["faiss"] = None
        self._save_manifest()
        self._encoder = encoder
        self.faiss.forget()

    def _save_manifest(self) -> None:
        """Only under the lock, from a manifest read under it (see :meth:`update`)."""
        write_json_atomic(self.path / MANIFEST, self.manifest)
        self._manifest_key = _file_key(self.path / MANIFEST)

    def _sync(self) -> None:
        """Reloads the manifest when another process replaced it (an update, a rebuild)."""
        key = _file_key(self.path / MANIFEST)
        if key == self._manifest_key:
            return
        manifest = read_manifest(self.path)
        self._manifest_key = key
        pin = manifest["encoder"]["weights_hash"]
        if pin != self.manifest["encoder"]["weights_hash"]:
            log.info("the index was re-embedded with %s; reloading", manifest["encoder"]["source"])
            if self._encoder is not None and self._encoder.weights_hash() != pin:
                self._encoder = None  # loaded again, from the new pin's source, when needed
            self._deferred = None
            self.faiss.forget()
        self.manifest.clear()  # in place: the FAISS file shares this dict
        self.manifest.update(manifest)
        self.dim = self.store.dim = int(manifest["encoder"]["dim"])

    def _writable(self) -> None:
        """Reopens a store opened for reading for writing; only under the lock."""
        if self.store.readonly:
            self.store.close()
            self.store = self.faiss.store = Store(self.path / DATABASE, self.dim)

    def _faiss_index(self) -> Any:
        """The FAISS index of the current manifest and database, for searching."""
        for _ in range(3):
            self._sync()
            try:
                return self.faiss.get()
            except IndexChangedError:  # re-embedded between the manifest and the vectors
                continue
        raise IndexChangedError(
            f"the index at {self.path} keeps being re-embedded; search again when it is done"
        )

    # --- updating -------------------------------------------------------------------------

    def update(
        self,
        *,
        batch_size: int | None = None,
        workers: int | None = None,
        device: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        prune_empty: bool = False,
    ) -> UpdateReport:
        """Brings the index in line with the folder: embeds new and changed files (by size and
        mtime), forgets deleted ones, and leaves the rest alone.

        Files under a folder that cannot be listed, or that lists nothing at all (what the mount
        point of an unmounted drive looks like; the root too), are kept and reported in
        ``unreadable`` and ``empty``: they are out of reach, maybe not deleted. A folder deleted
        with its files is a deletion like any other.

        Each batch is committed as it is embedded, so an interrupted update keeps its work and
        the next one continues from there. An unchanged folder costs a walk and no model work.

        Args:
            batch_size: images per forward pass (and per commit); None picks one for the
                model and device (see :func:`mocoretrieval.embed.default_batch_size`).
            workers: decoding processes; None picks, 0 decodes in this process.
            device: torch device; None picks CUDA when available, else CPU.
            progress: called as ``progress(done, total)`` after each batch of files to embed.
            prune_empty: forget the files of folders that list nothing as well (they were
                really deleted, not unmounted).
        """
        t0 = time.perf_counter()
        report = UpdateReport()
        with UpdateLock(self.path):
            self._sync()  # the manifest as the last writer left it, not as this one read it
            self._writable()
            if self._pending_reset is not None:
                self._reset(*self._pending_reset)
                self._pending_reset = None
            requested = self._pending_index_type
            stats, problems, report.unreadable = self._walk()
            if requested is not None:  # before any model work: fail fast, change nothing
                ann.check_buildable(requested, len(stats), self.dim)
            known = self.store.files()
            gone = sorted(
                p
                for p in set(known) - set(stats) - set(problems)
                if not _under(p, report.unreadable)
            )
            held = {} if prune_empty else empty_folders(self.root, gone, exclude=[self.path])
            kept = {p for paths in held.values() for p in paths}
            report.removed = [p for p in gone if p not in kept]
            report.empty = {_display(folder): len(paths) for folder, paths in held.items()}
            for folder, n in report.empty.items():
                log.warning("%s lists nothing but held %d indexed files: kept", folder, n)
            self.store.remove(report.removed)
            if report.removed:
                self.store.vacuum_if_sparse()
            self._record_problems(problems, known, report)
            todo = [p for p, st in stats.items() if p not in known or known[p][:2] != tuple(st)]
            if todo:
                done = 0
                if progress is not None:
                    progress(0, len(todo))  # the bar appears before the model loads
                batches = embed.iter_embeddings(
                    self.encoder,
                    self.root,
                    todo,
                    batch_size=batch_size,
                    workers=workers,
                    device=device or self._device,
                )
                try:
                    for batch in batches:
                        batch.drop_non_finite()
                        skipped = [(p, reason, stats[p]) for p, reason in batch.skipped]
                        self.store.add_batch(
                            batch.paths,
                            batch.vectors,
                            [stats[p] for p in batch.paths],
                            skipped,
                            thumbnails=batch.thumbnails,
                        )
                        for p in batch.paths:
                            (report.updated if p in known else report.added).append(p)
                        for p, reason in batch.skipped:
                            report.skipped.setdefault(reason, []).append(p)
                        done += len(batch.paths) + len(batch.skipped)
                        if progress is not None:
                            progress(done, len(todo))
                except RuntimeError as e:
                    # iter_embeddings recovers from its own dead workers and keeps them off
                    # torch's SIGCHLD handler; a DataLoader of the caller's, still registered
                    # there, can have a death reported here, between batches.
                    if not embed.worker_died(e):
                        raise
                    raise MoCoRetrievalError(
                        f"a decoding worker died ({e}); the {done} files done so far are "
                        "saved: run the same command again to continue"
                    ) from e
            previous = self.manifest["index_type"]
            if requested is not None:
                self.manifest["index_type"] = requested
            try:
                self.faiss.refresh(save=True)  # saves the manifest only once the index is built
            except MoCoRetrievalError as e:
                self.manifest["index_type"] = previous  # a type FAISS cannot build is not kept
                raise MoCoRetrievalError(
                    f"{e}. The index keeps {previous!r}; the embeddings done are saved"
                ) from e
            self._pending_index_type = None
            self.manifest["last_update"] = now()
            self._save_manifest()
        report.seconds = time.perf_counter() - t0
        n = len(report.added) + len(report.updated) + report.num_skipped
        report.images_per_s = n / report.seconds if n else 0.0
        self.last_report = report
        log.info(
            "update: %d added, %d updated, %d removed, %d skipped",
            len(report.added),
            len(report.updated),
            len(report.removed),
            report.num_skipped,
        )
        return report

    def _walk(self) -> tuple[dict[str, FileStat], dict[str, tuple[str, FileStat]], dict[str, str]]:
        """``(readable images -> size and mtime, unusable image entries -> (reason, stat),
        folders that could not be listed -> reason)``."""
        scan = scan_images(self.root, exclude=[self.path])
        stats = {rel: FileStat(st.st_size, st.st_mtime_ns) for rel, st in scan.files.items()}
        problems: dict[str, tuple[str, FileStat]] = {}
        for rel, reason in scan.problems.items():
            try:
                st = os.lstat(self.root / rel)
                problems[rel] = (reason, FileStat(st.st_size, st.st_mtime_ns))
            except (OSError, ValueError):  # e.g. the escaped name of a non-UTF-8 file
                problems[rel] = (reason, FileStat(0, 0))
        return stats, problems, scan.unreadable

    def _record_problems(
        self,
        problems: dict[str, tuple[str, FileStat]],
        known: dict[str, Any],
        report: UpdateReport,
    ) -> None:
        """Stores the entries the walk could not use (broken links, FIFOs, ...) as skipped, so
        that ``info`` lists them with their reason; each is reported once, when new."""
        new = [
            (p, reason, st)
            for p, (reason, st) in problems.items()
            if p not in known or (known[p].skip_reason, known[p][:2]) != (reason, tuple(st))
        ]
        if new:
            self.store.add_batch([], np.zeros((0, self.dim), np.float32), [], skipped=new)
        for p, reason, _ in new:
            report.skipped.setdefault(reason, []).append(p)

    # --- searching ------------------------------------------------------------------------

    def embed_queries(self, queries: Sequence[Query]) -> np.ndarray:
        """(len(queries), D) L2-normalised query vectors from images, file paths or vectors."""
        out = np.empty((len(queries), self.dim), dtype=np.float32)
        images: list[tuple[int, Image.Image]] = []
        for i, q in enumerate(queries):
            if isinstance(q, Image.Image):
                images.append((i, q))
            elif isinstance(q, (str, os.PathLike)):
                if not os.path.exists(q):
                    raise ImageError("no such file", os.fspath(q))
                images.append(
                    (i, load_image(q, min_side=getattr(self.encoder, "resize_size", None)))
                )
            else:
                v = np.asarray(q, dtype=np.float32).reshape(-1)
                if v.shape[0] != self.dim:
                    raise ModelMismatchError(
                        f"query vector has {v.shape[0]} dimensions; the index holds "
                        f"{self.dim}-d embeddings of {self.manifest['encoder']['source']}"
                    )
                out[i] = v
        for start in range(0, len(images), 32):
            chunk = images[start : start + 32]
            out[[i for i, _ in chunk]] = self.encoder.embed([im for _, im in chunk])
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        if (norms == 0).any():
            raise MoCoRetrievalError("a query vector is all zeros; it cannot be searched")
        return out / norms

    def search(self, query: Query, k: int = 10) -> list[SearchResult]:
        """The ``k`` images most similar to ``query`` (an image, a file path or a vector)."""
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: Sequence[Query], k: int = 10) -> list[list[SearchResult]]:
        """:meth:`search` for several queries at once (faster than one by one)."""
        if k < 1:
            raise MoCoRetrievalError(f"k must be at least 1, got {k}")
        index = self._faiss_index()  # first: it reloads a newer manifest (and model)
        vectors = self.embed_queries(list(queries))
        if index.ntotal == 0:
            return [[] for _ in queries]
        scores, ids = index.search(vectors, min(k, index.ntotal))
        paths = self._stored_paths(ids.ravel())
        return [
            [self._result(paths[i], s) for s, i in zip(row_s, row_i) if i in paths]
            for row_s, row_i in zip(scores, ids)
        ]

    def _stored_paths(self, vector_ids: Any) -> dict[int, str]:
        """Relative paths of stored vector ids, normalised; stored paths outside the root are
        left out (see :func:`_inside_root`)."""
        out: dict[int, str] = {}
        for i, rel in self.store.paths_of(vector_ids).items():
            norm = _inside_root(rel)
            if norm is not None:
                out[i] = norm
        return out

    def _result(self, rel: str, score: float) -> SearchResult:
        return SearchResult(str(self.root / rel), float(score), rel)

    def duplicates(
        self,
        threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
        *,
        batch: int = 1024,
        neighbours: int = DUPLICATE_NEIGHBOURS,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[list[SearchResult]]:
        """Groups of near-duplicate images: similarity at least ``threshold`` to some member.

        A k-NN search of ``neighbours`` per stored vector, ``batch`` vectors at a time, so the
        work is bounded by N x ``neighbours`` even when thousands of images are alike (see
        :func:`mocoretrieval.ann.neighbour_pairs`). Groups are the connected components of the
        "similar enough" pairs (union-find), largest first; each member's score is its best
        similarity to another member. ``progress(done, total)`` is called after each batch.
        """
        index = self._faiss_index()
        parent: dict[int, int] = {}
        best: dict[int, float] = {}

        def find(i: int) -> int:
            while parent.setdefault(i, i) != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        total, done = index.ntotal, 0
        for ids, vectors in self.store.iter_vectors(batch):
            done += len(ids)
            if progress is not None:
                progress(min(done, total), total)
            for qid, nid, score in ann.neighbour_pairs(index, ids, vectors, threshold, neighbours):
                parent[find(qid)] = find(nid)
                best[qid] = max(best.get(qid, -1.0), score)
                best[nid] = max(best.get(nid, -1.0), score)
        groups: dict[int, list[int]] = {}
        for i in best:
            groups.setdefault(find(i), []).append(i)
        paths = self._stored_paths(best)
        out = [
            sorted(
                (self._result(paths[i], best[i]) for i in members if i in paths),
                key=lambda r: (-r.score, r.path),
            )
            for members in groups.values()
        ]
        return sorted((g for g in out if len(g) > 1), key=lambda g: (-len(g), g[0].path))

    # --- what the index holds -------------------------------------------------------------

    def paths(self) -> list[str]:
        """The indexed images (embedded, not skipped), relative to the root, POSIX, sorted."""
        self._sync()
        return [
            norm
            for rel, record in sorted(self.store.files().items())
            if record.vector_id is not None and (norm := _inside_root(rel)) is not None
        ]

    def thumbnail(self, path: str) -> Image.Image:
        """The thumbnail stored for an indexed image when it was embedded (its longest side at
        most :data:`~mocoretrieval.embed.DEFAULT_THUMBNAIL_SIZE`).

        It is given only while the file is as it was then (same size and modification time):
        an edited file's stored thumbnail shows its old content.

        Args:
            path: the image's path relative to the root, as :meth:`paths` and
                :attr:`SearchResult.relpath` give it.

        Raises:
            ImageError: the image is not indexed, has no stored thumbnail (an index built
                before thumbnails were stored), is gone or changed since it was indexed; make
                a thumbnail from the file instead, or update the index.
        """
        stored = self.store.thumbnails([path]).get(path)
        if stored is None:
            record = self.store.file(path)
            if record is None or record.vector_id is None:
                raise ImageError(
                    f"not in the index of {self.root}: pass a path relative to the root as "
                    "ImageIndex.paths() lists it, or run `mocoretrieval index` to add it",
                    path,
                )
            raise ImageError(
                "no stored thumbnail (indexed before thumbnails were stored): make one from "
                "the file, or re-index with --rebuild to store them",
                path,
            )
        norm = _inside_root(path)
        if norm is None:
            raise ImageError("not inside the indexed root", path)
        try:
            st = os.stat(self.root / norm)
        except OSError:
            raise ImageError("file not found (moved or deleted since indexing?)", path) from None
        if (st.st_size, st.st_mtime_ns) != tuple(stored.stat):
            raise ImageError(
                "changed since it was indexed: run `mocoretrieval index` to update the index, "
                "or make a thumbnail from the file",
                path,
            )
        try:
            image = Image.open(io.BytesIO(stored.jpeg))
            image.load()
        except Exception as e:  # noqa: BLE001 - a damaged blob: say so, with the fix
            raise ImageError(
                f"its stored thumbnail is damaged ({e}): re-index with --rebuild", path
            ) from None
        return image

    def info(self) -> dict[str, Any]:
        """Model, count, dimension, index type, last update and skipped files."""
        self._sync()
        faiss_entry = self.manifest.get("faiss") or {}
        encoder = self.manifest["encoder"]
        return {
            "root": str(self.root),
            "index_dir": str(self.path),
            "format_version": self.manifest["format_version"],
            "model": encoder["source"],
            "weights_hash": encoder["weights_hash"],
            "count": self.store.count(),
            "dim": self.dim,
            "metric": self.manifest["metric"],
            "index_type": faiss_entry.get("factory"),
            "requested_index_type": self.manifest["index_type"],
            "search_params": faiss_entry.get("params", {}),
            "recall_at_10": faiss_entry.get("recall_at_10"),
            "created": self.manifest["created"],
            "last_update": self.manifest["last_update"],
            "skipped": {_display(p): _display(r) for p, r in self.store.skipped().items()},
        }
