"""The photo corpus: freely licensed photographs shipped by Debian packages and scikit-image,
grouped into pictures and split by picture into a training folder and held-out evaluation sets.

``python -m training.photos prepare OUT`` writes::

    OUT/train/PACKAGE/NAME.jpg          each training picture once, long side <= --max-side
    OUT/heldout/PACKAGE/NAME.EXT        each held-out picture once, its largest file as shipped
    OUT/heldout-sizes/PACKAGE/NAME/*    every distinct shipped file of a held-out picture, plus
                                        1/2 and 1/4 downscales; groups.csv groups them by picture
    OUT/manifest.json, OUT/LICENSES.md  per picture: package, author, licence, files, split

A *picture* is one photograph, whatever the number of files it ships as (plasma's
``NAME/contents/images/WxH.jpg``, MATE's ``NAME_WxH.jpg``); the split is drawn per picture from
a hash of (seed, picture id), so a held-out picture is never trained on at any resolution, and
adding a package moves no other picture between splits. The table :data:`SOURCES` lists the
photographs by name (:mod:`training.photo_sources`).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mocoretrieval.data import load_image
from mocoretrieval.errors import DatasetError, ImageError, MoCoRetrievalError

from .photo_sources import (
    EXTRAS,
    SOURCES,
    Extra,
    Picture,
    Source,
    check_distinct,
    extra_files,
    find_pictures,
    install_line,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "heldout")
# Held-out pictures are also written at 1/2 and 1/4 of their long side: Debian ships most
# photographs at one resolution (plasma's WxH.jpg files are symlinks to one file), and the
# near-duplicate evaluation needs the same picture at several sizes.
DOWNSCALES = (2, 4)
TRAIN_QUALITY = 95  # near-lossless: training re-decodes these every epoch, so no visible loss
SIZES_QUALITY = 90  # generated sizes of held-out pictures: a typical re-saved web copy


# --- the split ------------------------------------------------------------------------------


def split_of(picture_id: str, seed: int, heldout_fraction: float) -> str:
    """``"heldout"`` or ``"train"``: a pure function of the picture, so adding pictures or
    packages never moves another picture from one split to the other."""
    digest = hashlib.sha256(f"{seed}\0{picture_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return "heldout" if u < heldout_fraction else "train"


# --- writing the corpus ---------------------------------------------------------------------


@dataclass
class PrepareReport:
    """What :func:`prepare` wrote, and what it could not find."""

    out: Path
    pictures: dict[str, dict[str, int]]  # package -> split -> pictures
    licences: dict[str, int]  # licence -> pictures
    missing: list[Source]  # packages with none of their listed pictures installed
    absent: list[str]  # listed picture ids not found in an installed package
    skipped: list[str]  # "picture id: reason" for pictures whose image could not be decoded
    bytes_written: dict[str, int]  # top-level folder -> bytes
    seconds: float


def _save_train(src: Path, dst: Path, max_side: int) -> tuple[int, int]:
    # load_image decodes JPEGs at reduced size (draft mode) while the short side stays >=
    # max_side, so the long side is still >= max_side before the high-quality resize.
    img = load_image(src, min_side=max_side)
    img.thumbnail((max_side, max_side), Image.LANCZOS)
    img.save(dst, format="JPEG", quality=TRAIN_QUALITY)
    return img.size


def _write_sizes(p: Picture, folder: Path) -> list[dict[str, object]]:
    """Every distinct shipped file of ``p``, plus its downscales; returns their records."""
    folder.mkdir(parents=True)
    records: list[dict[str, object]] = []
    taken: set[str] = set()

    def name_for(size: tuple[int, int], ext: str) -> str:
        stem, n = f"{size[0]}x{size[1]}", 1
        while f"{stem}.{ext}" in taken:  # two shipped files of one size: number the next
            n, stem = n + 1, f"{size[0]}x{size[1]}-{n + 1}"
        taken.add(f"{stem}.{ext}")
        return f"{stem}.{ext}"

    for path, size in zip(p.files, p.sizes):
        name = name_for(size, path.suffix[1:].lower())
        shutil.copyfile(path, folder / name)
        records.append({"file": name, "from": str(path), "size": list(size)})
    full = load_image(p.files[0])
    shipped = set(p.sizes)
    for factor in DOWNSCALES:
        size = (max(1, full.width // factor), max(1, full.height // factor))
        if size in shipped:
            continue
        name = name_for(size, "jpg")
        full.resize(size, Image.LANCZOS).save(folder / name, format="JPEG", quality=SIZES_QUALITY)
        records.append({"file": name, "from": f"{p.files[0]} at 1/{factor}", "size": list(size)})
    return records


def _write_picture(p: Picture, split: str, out: Path, max_side: int) -> dict[str, Any]:
    """Writes one picture's files under ``out``; returns its manifest record.

    Raises:
        ImageError: its image cannot be decoded; nothing of it is left under ``out``.
    """
    package = p.source.package
    record: dict[str, Any] = {
        "id": p.id,
        "package": package,
        "name": p.name,
        "author": p.credit.author,
        "licence": p.licence,
        "licence_file": p.source.licence_file,
        "split": split,
        "source_files": [str(f) for f in p.files],
        "sizes": [list(s) for s in p.sizes],
        "sha256": p.sha256,
    }
    if split == "train":
        dst = out / "train" / package / f"{p.name}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        record["train_size"] = list(_save_train(p.files[0], dst, max_side))
        record["train"] = dst.relative_to(out).as_posix()
        return record
    folder = out / "heldout-sizes" / package / p.name
    try:  # the sizes first: they decode the image, and fail before anything else is written
        record["heldout_sizes"] = _write_sizes(p, folder)
    except ImageError:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    record["heldout_sizes_folder"] = f"{package}/{p.name}"
    dst = out / "heldout" / package / f"{p.name}{p.files[0].suffix.lower()}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(p.files[0], dst)
    record["heldout"] = dst.relative_to(out).as_posix()
    return record


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _licences_md(pictures: Sequence[Picture], splits: dict[str, str]) -> str:
    lines = [
        "# Licences of the photo corpus",
        "",
        "Made by `python -m training.photos prepare`. Each picture keeps its licence; the",
        "ShareAlike (CC-BY-SA, GPL) ones ask that copies and adaptations of the *pictures* keep",
        "the same licence and credit the author. Full texts: each package's licence file.",
        "",
        "| picture | split | author | licence |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {p.id} | {splits[p.id]} | {p.credit.author} | {p.licence} |" for p in pictures]
    lines += ["", "| package | licence file | install |", "| --- | --- | --- |"]
    packages = {p.source.package: p.source for p in pictures}
    lines += [f"| {s.package} | {s.licence_file} | `{s.install}` |" for s in packages.values()]
    return "\n".join(lines) + "\n"


def _replace(tmp: Path, out: Path, force: bool) -> None:
    """Moves the finished ``tmp`` to ``out``; an ``out`` of ours is replaced only with force."""
    if out.exists():
        if not force:
            raise DatasetError(f"{out} exists; pass --force to rebuild it, or choose another OUT")
        if not (out / "manifest.json").is_file():
            raise DatasetError(
                f"{out} exists and was not made by training.photos (no manifest.json); "
                "choose another OUT, --force only replaces a corpus it made"
            )
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def prepare(
    out: str | Path,
    sources: Sequence[Source] = SOURCES,
    heldout_fraction: float = 0.25,
    seed: int = 0,
    max_side: int = 1024,
    force: bool = False,
) -> PrepareReport:
    """Writes the photo corpus into ``out`` (see the module docstring for its layout).

    It is built in a temporary folder beside ``out`` and moved into place when complete, so an
    interrupted run leaves no half corpus; the same sources and arguments give the same bytes.

    Args:
        out: the folder to make.
        sources: the packages to read (roots can point anywhere, e.g. a test's tree).
        heldout_fraction: the expected fraction of pictures held out, in [0, 1).
        seed: the split's seed.
        max_side: the long side of the training images, at most (1024 keeps MoCo's smallest
            RandomResizedCrop, 8% of the area, at about the 224-pixel model input).
        force: replace an existing corpus at ``out``.

    Raises:
        DatasetError: no picture found, an empty split, ``out`` in the way, or two pictures
            sharing a file.
    """
    start = time.perf_counter()
    out = Path(out)
    if not 0 <= heldout_fraction < 1:
        raise DatasetError(f"--heldout-fraction {heldout_fraction} must be in [0, 1)")
    if max_side < 32:
        raise DatasetError(f"--max-side {max_side} is too small; use at least 224")
    if out.exists() and not force:
        raise DatasetError(f"{out} exists; pass --force to rebuild it, or choose another OUT")
    pictures, missing, absent = [], [], []
    for source in sources:
        found = find_pictures(source)
        if not found:
            missing.append(source)
            continue
        pictures += found
        names = {p.name for p in found}
        absent += [f"{source.package}/{n}" for n in sorted(source.pictures) if n not in names]
    if not pictures:
        raise DatasetError(f"no photo package is installed; run: {install_line(missing)}")
    check_distinct(pictures)
    splits = {p.id: split_of(p.id, seed, heldout_fraction) for p in pictures}
    for split in SPLITS if heldout_fraction > 0 else ("train",):
        if split not in splits.values():
            raise DatasetError(
                f"no picture of {len(pictures)} fell in the {split} split; install more "
                "packages, or change --heldout-fraction or --seed"
            )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the corpus private to its maker
    try:
        records, skipped = [], []
        for p in pictures:
            try:
                records.append(_write_picture(p, splits[p.id], tmp, max_side))
            except ImageError as e:  # one bad file must not end the run
                skipped.append(f"{p.id}: {e.reason}")
        groups = [
            (f"{r['heldout_sizes_folder']}/{size['file']}", r["id"])
            for r in records
            for size in r.get("heldout_sizes", [])
        ]
        if groups:
            with open(tmp / "heldout-sizes" / "groups.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(["path", "group"])
                writer.writerows(sorted(groups))
        kept = [p for p in pictures if any(r["id"] == p.id for r in records)]
        manifest = {
            "format_version": FORMAT_VERSION,
            "seed": seed,
            "heldout_fraction": heldout_fraction,
            "max_side": max_side,
            "downscales": list(DOWNSCALES),
            "pictures": records,
        }
        (tmp / "manifest.json").write_text(
            json.dumps(manifest, indent=1, ensure_ascii=False), "utf-8"
        )
        (tmp / "LICENSES.md").write_text(_licences_md(kept, splits), "utf-8")
        _replace(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    counts: dict[str, dict[str, int]] = {}
    licences: dict[str, int] = {}
    for r in records:
        by_split = counts.setdefault(str(r["package"]), dict.fromkeys(SPLITS, 0))
        by_split[str(r["split"])] += 1
        licences[str(r["licence"])] = licences.get(str(r["licence"]), 0) + 1
    sizes = {d.name: _folder_bytes(d) for d in sorted(out.iterdir()) if d.is_dir()}
    return PrepareReport(
        out, counts, licences, missing, absent, skipped, sizes, time.perf_counter() - start
    )


def write_extras(
    out: str | Path, extras: Sequence[Extra] = EXTRAS, force: bool = False
) -> dict[str, int]:
    """Copies the training-only pictures of ``extras`` (:data:`EXTRAS`) into
    ``out/PACKAGE/PATH``, bytes as shipped, with a manifest.json and LICENSES.md; built beside
    ``out`` and moved into place when complete. Returns the pictures written per package.

    Raises:
        DatasetError: none of the packages is installed, or ``out`` is in the way.
    """
    out = Path(out)
    if out.exists() and not force:
        raise DatasetError(f"{out} exists; pass --force to rebuild it, or choose another OUT")
    found = {e.package: (e, extra_files(e)) for e in extras}
    if not any(files for _, files in found.values()):
        raise DatasetError(f"no extra picture package is installed; run: {install_line(extras)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        records = []
        for package, (extra, files) in found.items():
            for rel, licence in files:
                dst = tmp / package / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(extra.root) / rel, dst)
                records.append({"package": package, "file": f"{package}/{rel}", "licence": licence})
        manifest = {"format_version": FORMAT_VERSION, "extras": records}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), "utf-8")
        lines = [
            "# Licences of the training-only pictures",
            "",
            "Made by `python -m training.photos extras`; never held out, never evaluated on.",
            "",
            "| package | licence file | install |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {e.package} | {e.licence_file} | `{e.install}` |" for e, _ in found.values()]
        lines += ["", "| picture | licence |", "| --- | --- |"]
        lines += [f"| {r['file']} | {r['licence']} |" for r in records]
        (tmp / "LICENSES.md").write_text("\n".join(lines) + "\n", "utf-8")
        _replace(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {package: len(files) for package, (_, files) in found.items()}


# --- command line ---------------------------------------------------------------------------


def _print_report(r: PrepareReport) -> None:
    total = {s: sum(c[s] for c in r.pictures.values()) for s in SPLITS}
    print(f"wrote {r.out} in {r.seconds:.1f} s")
    print(f"  {'package':<30} {'train':>5} {'heldout':>7}")
    for package, c in r.pictures.items():
        print(f"  {package:<30} {c['train']:>5} {c['heldout']:>7}")
    print(f"  {'total':<30} {total['train']:>5} {total['heldout']:>7}")
    print("  licences: " + ", ".join(f"{k} {v}" for k, v in sorted(r.licences.items())))
    print("  MB: " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in r.bytes_written.items()))
    for line in r.skipped:
        print(f"  skipped {line}")
    if r.absent:
        print("  listed but not installed (another package version?): " + ", ".join(r.absent))
    if r.missing:
        names = ", ".join(s.package for s in r.missing)
        print(f"  not installed: {names}; for them run: {install_line(r.missing)}")


def _print_sources(sources: Sequence[Source]) -> None:
    for s in sources:
        found = find_pictures(s)
        state = f"{len(found)}/{len(s.pictures)} pictures" if found else "not installed"
        licences = sorted({c.licence or s.licence for c in s.pictures.values()})
        print(f"{s.package:<30} {state:<16} {', '.join(licences)}")
    print(f"install all: {install_line(sources)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.photos", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("sources", help="list the photo packages, installed or not")
    p = sub.add_parser("prepare", help="write the corpus: train/, heldout/, heldout-sizes/")
    p.add_argument("out", type=Path, help="the folder to make (outside the repository)")
    p.add_argument("--heldout-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0, help="the split's seed")
    p.add_argument("--max-side", type=int, default=1024, help="long side of train images")
    p.add_argument("--force", action="store_true", help="replace a corpus already at OUT")
    t = sub.add_parser("tiles", help="cut seeded square tiles of each picture: training instances")
    t.add_argument("src", type=Path, help="a folder of pictures, e.g. OUT/train")
    t.add_argument("out", type=Path, help="the tile folder to make")
    t.add_argument("--per-picture", type=int, default=150, help="tiles per picture")
    t.add_argument("--size", type=int, default=224, help="tile side in pixels")
    t.add_argument("--min-scale", type=float, default=0.2, help="smallest side / short side")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true", help="replace a tile folder already at OUT")
    d = sub.add_parser(
        "distractors",
        help="copy the installed desktop artwork that is not one of the photographs: images "
        "never trained on, to search copies of held-out photos among",
    )
    d.add_argument("out", type=Path, help="the folder to make")
    d.add_argument("--max-side", type=int, default=1024)
    d.add_argument("--force", action="store_true", help="replace a folder this made at OUT")
    e = sub.add_parser(
        "extras", help="copy the training-only pictures (EXTRAS: dark photographs and drawings)"
    )
    e.add_argument("out", type=Path, help="the folder to make")
    e.add_argument("--force", action="store_true", help="replace a folder this made at OUT")
    f = sub.add_parser(
        "flat-art", help="draw procedural flat-colour graphics (training only; tile-sized)"
    )
    f.add_argument("out", type=Path, help="the folder to make, e.g. TILES/flat-art")
    f.add_argument("--n", type=int, default=1500, help="pictures to draw")
    f.add_argument("--size", type=int, default=224, help="side in pixels")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--force", action="store_true", help="replace a folder this made at OUT")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.command == "sources":
            _print_sources(SOURCES)
            return 0
        if args.command == "tiles":
            from .tiles import cut_tiles

            t = cut_tiles(
                args.src,
                args.out,
                args.per_picture,
                args.size,
                args.min_scale,
                args.seed,
                args.force,
            )
            print(f"wrote {t.tiles} tiles of {t.pictures} pictures to {t.out}")
            for line in t.skipped:
                print(f"  skipped {line}")
            return 0
        if args.command == "distractors":
            from .tiles import write_distractors

            photos = {str(f) for s in SOURCES for p in find_pictures(s) for f in p.files}
            t = write_distractors(args.out, photos, max_side=args.max_side, force=args.force)
            print(f"wrote {t.pictures} distractors to {t.out}")
            return 0
        if args.command == "flat-art":
            from .flat_art import write_flat_art

            t = write_flat_art(args.out, args.n, args.seed, args.size, args.force)
            print(f"wrote {t.pictures} flat-art pictures to {t.out}")
            return 0
        if args.command == "extras":
            counts = write_extras(args.out, EXTRAS, force=args.force)
            for package, n in counts.items():
                print(f"  {package:<30} {n:>5}" if n else f"  {package:<30} not installed")
            print(f"wrote {sum(counts.values())} training-only pictures to {args.out}")
            return 0
        report = prepare(
            args.out,
            SOURCES,
            heldout_fraction=args.heldout_fraction,
            seed=args.seed,
            max_side=args.max_side,
            force=args.force,
        )
    except MoCoRetrievalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
