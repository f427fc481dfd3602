"""`ImageIndex`: an incremental, crash-safe FAISS index over an image folder, pinned to its encoder.

The store (SQLite) is the source of truth; the FAISS file is derived from the stored embeddings
and rebuilt from them — never by the model — when it is missing, corrupt or stale. See
:mod:`mocoretrieval.layout` for what the index directory holds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import ann
from .duplicates import DEFAULT_DUPLICATE_THRESHOLD, DUPLICATE_NEIGHBOURS
from .embedder import DeferredModel, Embedder
from .encoder_pin import EncoderPin, Model
from .errors import IndexChangedError, MoCoRetrievalError
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
from .library import LibraryRoots, new_roots
from .pathsafety import display, file_key
from .reads import Reading
from .roots import Root, RootError, Roots, check_disjoint
from .roots_table import RootTable
from .search import DuplicateGroup, Query, Searching, SearchResult
from .store import Store
from .store_db import check_dtype
from .update import UpdateReport, Updating

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "DEFAULT_DUPLICATE_THRESHOLD",
    "DUPLICATE_NEIGHBOURS",
    "DuplicateGroup",
    "ImageIndex",
    "Model",
    "Query",
    "Root",
    "RootError",
    "Roots",
    "SearchResult",
    "UpdateReport",
]

log = logging.getLogger(__name__)


class ImageIndex(EncoderPin, Searching, Reading, Updating, LibraryRoots):
    """A searchable, incrementally updated index of every image under one or several root
    folders (a library; see :mod:`mocoretrieval.roots`).

    Use :meth:`build` (create or reuse, then update), :meth:`create` or :meth:`open`; the
    constructor is internal.

    An opened index is a reader: it never writes to the index directory, and before each
    search it notices a newer manifest (another process updated or rebuilt the index) and
    reloads it. Only :meth:`update` writes, holding the directory's lock from its first change
    to its last, so a run refused for the lock changes nothing.

    The index receives its model: an embedder (see :func:`mocoretrieval.open_index`, which
    picks the backend), or a source string it hands to :func:`mocoretrieval.models.load_model`.
    """

    def __init__(
        self,
        index_dir: Path,
        manifest: dict[str, Any],
        encoder: Embedder | None = None,
        device: str | None = None,
        *,
        readonly: bool = True,
        store_dtype: str | None = None,
    ) -> None:
        self.path = index_dir
        self.manifest = manifest
        self._manifest_key = file_key(index_dir / MANIFEST)
        self.dim = int(manifest["encoder"]["dim"])
        self.store = Store(index_dir / DATABASE, self.dim, readonly=readonly, dtype=store_dtype)
        self._read_roots()
        self._pending_roots: list[Path] = []
        self._encoder = encoder
        self._deferred: DeferredModel | None = None
        self._device = device
        self.faiss = FaissFile(index_dir, self.store, self.manifest, self._save_manifest)
        self.last_report: UpdateReport | None = None
        # Asked for by create() and applied by update() under the lock: (encoder, source) to
        # re-embed everything with, and a FAISS factory string to switch to.
        self._pending_reset: tuple[Embedder, str | None] | None = None
        self._pending_index_type: str | None = None
        self._pending_store_dtype: str | None = None  # with a reset: the store's new encoding

    # --- creating and opening -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: str | Path | Sequence[str | Path],
        model: Model = None,
        index_dir: str | Path | None = None,
        *,
        index_type: str | None = None,
        rebuild: bool = False,
        device: str | None = None,
        store_dtype: str | None = None,
    ) -> ImageIndex:
        """Creates the index of ``root``, or reuses the one already there.

        An existing index is not changed here: a rebuild, a new index type and new roots are
        checked now and applied by :meth:`update`, under the lock (``build`` calls it).

        Args:
            root: the image folder, or several (a library of several roots; none may be inside
                another). Given an existing index, the folders it does not cover yet are added
                to its roots.
            model: a model source (alias, directory, Hub id, checkpoint) or an encoder. None:
                the existing index's model, or :data:`~mocoretrieval.sources.DEFAULT_MODEL`.
            index_dir: where the index lives; default ``root/.mocoretrieval`` (required for
                several roots).
            index_type: a FAISS factory string; None keeps the existing choice (automatic for a
                new index).
            rebuild: forget every embedding and start over (e.g. with another model).
            device: torch device for the model; None picks one.
            store_dtype: how the store keeps the vectors, ``float32`` or ``float16`` (half the
                disk; searches read float32 back). Recorded at creation; None keeps the
                existing index's (``float32`` for a new one). Another than the recorded one
                needs ``rebuild``, which re-embeds every image.

        Raises:
            ModelMismatchError: ``model`` is not the model the existing index was built with.
            MoCoRetrievalError: ``store_dtype`` differs from the existing index's without
                ``rebuild``.
            RootError: a folder is missing, or two roots overlap.
        """
        paths = [root] if isinstance(root, (str, os.PathLike)) else list(root)
        if not paths:
            raise RootError("pass at least one folder of images to index")
        wanted = [Path(p).expanduser().resolve() for p in paths]
        if index_dir is None and len(wanted) > 1:
            raise RootError(
                "several folders make one library: pass --index DIR to say where it lives"
            )
        index_dir = (
            Path(index_dir).expanduser().resolve() if index_dir else wanted[0] / DEFAULT_DIRNAME
        )
        if store_dtype is not None:
            check_dtype(store_dtype)
        if (index_dir / MANIFEST).is_file():
            index = cls.open(index_dir, device=device)
            known = {r.path for r in index.roots}  # one of them offline is no error
            index._pending_roots = new_roots([p for p in wanted if p not in known], empty=True)
            check_disjoint(index._pending_roots, known)  # fail now; added by update
            dim = index.dim
            if store_dtype is not None and store_dtype != index.store.dtype:
                if not rebuild:
                    raise MoCoRetrievalError(
                        f"the index at {index_dir} stores its vectors as {index.store.dtype}; "
                        f"to store them as {store_dtype}, re-embed every image with --rebuild "
                        f"--store-dtype {store_dtype} (or pass another --index DIR)"
                    )
                index._pending_store_dtype = store_dtype
            if rebuild:
                own = model is None or isinstance(model, DeferredModel)
                index._pending_reset = index._load_with(
                    model if model is not None else index.recorded_source(),
                    device,
                    index.recorded_source() if own else None,
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
        roots = new_roots(wanted)
        if index_dir.exists() and any(p.name != LOCK_FILE for p in index_dir.iterdir()):
            raise MoCoRetrievalError(
                f"{index_dir} exists and is not a mocoretrieval index: pass another --index DIR"
            )
        from .sources import DEFAULT_MODEL

        encoder, source = cls._load_with(model if model is not None else DEFAULT_MODEL, device)
        if index_type is not None:
            ann.check_factory(index_type, int(encoder.dim))
        inside = index_dir == roots[0] or roots[0] in index_dir.parents
        manifest = {
            "format_version": FORMAT_VERSION,
            # The first root, for people reading the manifest (the roots table is the truth):
            # relative when inside it, so the folder can be moved with its index.
            "root": os.path.relpath(roots[0], index_dir) if inside else str(roots[0]),
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
            store = Store(index_dir / DATABASE, int(encoder.dim), dtype=store_dtype)
            store.close()  # the schema, then the roots
            with RootTable(index_dir / DATABASE, index_dir) as table:
                table.create(roots)
            index = cls(
                index_dir,
                manifest,
                encoder=encoder,
                device=device,
                readonly=False,
                store_dtype=store_dtype,
            )
            write_json_atomic(index_dir / MANIFEST, manifest)  # last: the database exists
            index._manifest_key = file_key(index_dir / MANIFEST)
        return index

    @classmethod
    def build(
        cls,
        root: str | Path | Sequence[str | Path],
        model: Model = None,
        index_dir: str | Path | None = None,
        *,
        index_type: str | None = None,
        rebuild: bool = False,
        batch_size: int | None = None,
        workers: int | None = None,
        device: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        prune_empty: bool = False,
        exclude: Sequence[str] | None = None,
        store_dtype: str | None = None,
    ) -> ImageIndex:
        """:meth:`create` then :meth:`update`; the update's report is in ``.last_report``."""
        index = cls.create(
            root,
            model,
            index_dir,
            index_type=index_type,
            rebuild=rebuild,
            device=device,
            store_dtype=store_dtype,
        )
        index.update(
            batch_size=batch_size,
            workers=workers,
            device=device,
            progress=progress,
            prune_empty=prune_empty,
            exclude=exclude,
        )
        return index

    @classmethod
    def open(
        cls, path: str | Path | None = None, *, model: Model = None, device: str | None = None
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
        """Embedded files; a video is one, however many keyframe vectors it has."""
        self._sync()
        return self.store.file_count()

    def _save_manifest(self) -> None:
        """Only under the lock, from a manifest read under it (see :meth:`update`)."""
        write_json_atomic(self.path / MANIFEST, self.manifest)
        self._manifest_key = file_key(self.path / MANIFEST)

    def _sync(self) -> None:
        """Reloads the manifest when another process replaced it (an update, a rebuild)."""
        key = file_key(self.path / MANIFEST)
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
        self._read_roots()  # a writer saves the manifest after changing the roots

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

    def info(self) -> dict[str, Any]:
        """Model, count, dimension, index type, last update, skipped and excluded files.

        ``exclude`` is the index's ``--exclude`` patterns; ``excluded`` what the ignore rules
        left out at the last update (see :attr:`UpdateReport.excluded`). ``roots`` lists each
        root with its state (an offline one is named so, with why) and its file count
        (:meth:`roots_info`); ``root`` is the first one.
        """
        self._sync()
        faiss_entry = self.manifest.get("faiss") or {}
        encoder = self.manifest["encoder"]
        return {
            "root": str(self.root),
            "roots": self.roots_info(),
            "index_dir": str(self.path),
            "format_version": self.manifest["format_version"],
            "model": encoder["source"],
            "weights_hash": encoder["weights_hash"],
            "count": self.store.file_count(),  # files: a video once, not per keyframe
            "dim": self.dim,
            "store_dtype": self.store.dtype,
            "metric": self.manifest["metric"],
            "index_type": faiss_entry.get("factory"),
            "requested_index_type": self.manifest["index_type"],
            "search_params": faiss_entry.get("params", {}),
            "recall_at_10": faiss_entry.get("recall_at_10"),
            "created": self.manifest["created"],
            "last_update": self.manifest["last_update"],
            "exclude": self.manifest.get("exclude", []),
            "excluded": self.manifest.get("excluded", {}),
            "skipped": {display(p): display(r) for p, r in self.store.skipped().items()},
        }
