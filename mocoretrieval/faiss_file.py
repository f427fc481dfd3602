"""`FaissFile`: ``index.faiss``, derived from the store's vectors and kept in step with it.

The store is the source of truth. The manifest's ``faiss`` entry records what the file was
built from (the store generation, its size, factory and search parameters); a file that is
missing, unreadable, of another size or generation, or holding another number of vectors is
rebuilt from the stored vectors — never by the model — and replaced atomically.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import ann, ondisk, ondisk_plan
from .errors import IndexFormatError
from .layout import FAISS_FILE
from .store import Store

log = logging.getLogger(__name__)

# Bytes of stored vectors a build reads at a time (8192 rows of 2048-d float32): the build
# never holds every vector outside the FAISS index, which at a million 2048-d photos would be
# 8 GB on top of the index itself.
CHUNK_BYTES = 64 << 20


class FaissFile:
    """The FAISS index of an index directory, loaded or rebuilt on demand.

    Args:
        index_dir: the index directory.
        store: its store.
        manifest: the index's manifest, shared and updated in place.
        save_manifest: writes ``manifest`` (atomically).
    """

    def __init__(
        self,
        index_dir: Path,
        store: Store,
        manifest: dict[str, Any],
        save_manifest: Callable[[], None],
    ) -> None:
        self.dir = index_dir
        self.file = index_dir / FAISS_FILE
        self.store = store
        self.manifest = manifest
        self._save_manifest = save_manifest
        self.index: Any = None  # loaded or built, for searching
        self.generation = -1  # the store generation ``index`` holds

    def forget(self) -> None:
        """Drops the in-memory index (the store was cleared or the model changed)."""
        self.index, self.generation = None, -1

    def _fresh(self, generation: int) -> bool:
        entry = self.manifest.get("faiss")
        file = self.file
        lists = entry.get("lists") if entry else None  # the on-disk type's codes, beside it
        return bool(
            entry
            and entry["generation"] == generation
            and entry["requested"] == self.manifest["index_type"]
            and file.is_file()
            and file.stat().st_size == entry["bytes"]
            and (
                lists is None
                or (
                    (self.dir / lists).is_file()
                    and (self.dir / lists).stat().st_size == entry["lists_bytes"]
                )
            )
        )

    def _load(self) -> Any:
        """Reads ``index.faiss``: the on-disk type memory-mapped, wrapped for re-ranking."""
        if not (self.manifest.get("faiss") or {}).get("lists"):
            return ann.load(self.file)
        from .rerank import RerankedIndex

        return RerankedIndex(ondisk.load(self.file), self.store.vectors_of)

    def refresh(self, *, save: bool, load: bool = False) -> None:
        """Makes sure ``index.faiss`` matches the database, rebuilding it from the stored
        vectors when it is missing, corrupt or stale. ``load`` also loads it for searching."""
        generation = self.store.generation  # before the vectors: a later write means stale
        held = self.index is not None and self.generation == generation
        if held and (not save or self._fresh(generation)):  # a writer also repairs the file
            return
        if self._fresh(generation):
            if not load:
                return
            try:
                index = self._load()
                if index.ntotal == self.store.count() and index.d == self.store.dim:
                    ann.set_params(index, self.manifest["faiss"]["params"])
                    self.index, self.generation = index, generation
                    return
                log.warning(
                    "%s holds %d vectors, the database %d: rebuilding it",
                    FAISS_FILE,
                    index.ntotal,
                    self.store.count(),
                )
            except IndexFormatError as e:
                log.warning("%s; rebuilding it from the stored vectors", e)
        self._rebuild(save=save)

    def _rebuild(self, *, save: bool) -> None:
        chunk = max(1, CHUNK_BYTES // (4 * self.store.dim))
        # One state, whatever commits meanwhile, streamed chunk by chunk into FAISS.
        with self.store.snapshot_chunks(chunk) as snapshot:
            generation, n = snapshot.generation, snapshot.n
            requested = self.manifest["index_type"]
            factory = ann.auto_factory(n, self.store.dim) if requested == "auto" else requested
            factory = ondisk_plan.resolve(factory, n, self.store.dim)
            trained = self._reusable_training(requested, n)
            if trained:
                factory = trained.factory
            if ondisk_plan.is_ondisk(factory):
                self._build_ondisk(snapshot, factory, trained, generation, requested, save)
                return
            built = ann.build_from(snapshot, factory, trained=trained)
        factory = built.factory
        log.info("built %s over %d vectors in %.1f s (%s)", factory, n, built.seconds, built.params)
        self.index, self.generation = built.index, generation
        if not save:
            return
        try:
            size = ann.save(built.index, self.file)
        except OSError as e:  # a read-only index still searches, from memory
            log.warning("cannot save %s: %s", self.file, e)
            return
        self.manifest["faiss"] = _entry(factory, requested, built, generation, size)
        self._save_manifest()
        ondisk.remove_stale_lists(self.dir, keep=None)  # from an earlier on-disk build

    def _build_ondisk(
        self,
        snapshot: ann.VectorSource,
        factory: str,
        trained: ann.BuiltIndex | None,
        generation: int,
        requested: str,
        save: bool,
    ) -> None:
        """Builds the on-disk type; when saving, swaps it in crash-safely.

        The codes go to a new ``lists-<random>.ivfdata``, then ``index.faiss`` (which names
        it) is replaced atomically, then the manifest; only then is the previous lists file
        deleted. A crash at any point leaves the previous index file, lists and manifest whole.
        A reader that may not save builds into a temporary folder, deleted once mapped.
        """
        scratch = None if save else Path(tempfile.mkdtemp(prefix="mocoretrieval-"))
        folder = self.dir if scratch is None else scratch
        lists = folder / f"lists-{secrets.token_hex(6)}.ivfdata"
        try:
            built = ondisk.build(snapshot, factory, lists, self.store.vectors_of, trained=trained)
        except BaseException:
            lists.unlink(missing_ok=True)
            raise
        finally:
            if scratch is not None:  # mapped already: the codes stay readable (POSIX)
                shutil.rmtree(scratch, ignore_errors=True)
        log.info(
            "built %s over %d vectors in %.1f s (%s)",
            factory,
            snapshot.n,
            built.seconds,
            built.params,
        )
        self.index, self.generation = built.index, generation
        if not save:
            return
        try:
            size = ann.save(built.index.base, self.file)
        except OSError as e:  # a read-only index still searches, from memory
            log.warning("cannot save %s: %s", self.file, e)
            lists.unlink(missing_ok=True)
            return
        self.manifest["faiss"] = _entry(factory, requested, built, generation, size) | {
            "lists": lists.name,  # relative: the folder may move
            "lists_bytes": lists.stat().st_size,
        }
        self._save_manifest()
        ondisk.remove_stale_lists(self.dir, keep=lists.name)

    def _reusable_training(self, requested: str, n: int) -> ann.BuiltIndex | None:
        """The saved index, when its training (k-means, codebooks) still fits ``n`` vectors.

        Training is most of an IVF build (measured at 200k x 512, automatic index: train
        31 s, add 8 s, tune 5 s); the centroids of a collection that has not halved or doubled
        since still describe it, so adding a few photos only refills the lists.
        """
        entry = self.manifest.get("faiss") or {}
        trained_on = entry.get("trained_on")
        if (
            not trained_on
            or entry.get("requested") != requested
            or not trained_on / 2 <= n <= 2 * trained_on
        ):
            return None
        if requested == "auto":
            wanted = ann.auto_factory(n, self.store.dim)
            if wanted == "Flat" or ondisk_plan.is_ondisk(wanted) != bool(entry.get("lists")):
                return None  # crossed the exact-search or the on-disk threshold
        try:
            index = ondisk.load(self.file) if entry.get("lists") else ann.load(self.file)
        except IndexFormatError:
            return None
        if not index.is_trained or index.d != self.store.dim:
            return None
        return ann.BuiltIndex(index=index, factory=entry["factory"], trained_on=trained_on)

    def get(self) -> Any:
        """The FAISS index, fresh, for searching; rebuilt in memory when the file is stale.

        Never saved from here: a reader does not hold the lock, and its manifest may be older
        than the last writer's. The next ``mocoretrieval index`` saves a fresh file.
        """
        self.refresh(save=False, load=True)
        return self.index


def _entry(factory: str, requested: str, built: Any, generation: int, size: int) -> dict:
    """The manifest's ``faiss`` entry of a build saved as ``size`` bytes of ``index.faiss``."""
    return {
        "factory": factory,
        "requested": requested,
        "params": built.params,
        "recall_at_10": built.recall,
        "trained_on": built.trained_on,
        "generation": generation,
        "ntotal": int(built.index.ntotal),
        "bytes": size,
    }
