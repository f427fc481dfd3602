"""The photo sources: which packages ship freely licensed photographs, where, and under what
licence; read by :mod:`training.photos`.

Checked by eye on Debian 12 (bookworm): each package's pictures were looked at and only the
photographs listed (the packages also ship vector art and abstract renders). gnome-backgrounds
43, ukui-wallpapers and sway-backgrounds ship no photographs and are not listed. Licences and
authors are those of each ``licence_file``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from mocoretrieval.errors import DatasetError
from mocoretrieval.walk import walk_images

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Credit:
    """Who made one picture, and its licence when it differs from its package's."""

    author: str
    licence: str | None = None


@dataclass(frozen=True)
class Source:
    """One package of pictures.

    Attributes:
        package: the Debian (or pip) package name.
        root: the folder it installs its images into.
        layout: a regex matched against paths relative to ``root``; its groups, joined, name the
            picture a file belongs to (a file that does not match is not one of this package's).
        licence: the package's licence for its pictures (SPDX where one exists).
        licence_file: where the full licence text and copyright holders are installed.
        install: the command that installs the package.
        pictures: the photographs kept, by picture name.
    """

    package: str
    root: str
    layout: str
    licence: str
    licence_file: str
    install: str
    pictures: dict[str, Credit] = field(default_factory=dict)


def _module_dir(module: str, sub: str) -> str:
    """A package's data folder, found without importing it; "" when it is not installed."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    return os.path.join(locations[0], sub) if locations else ""


def _deb(package: str) -> tuple[str, str]:
    return f"/usr/share/doc/{package}/copyright", f"apt-get install -y {package}"


_RISTO = "Risto Saukonpää"
_AITZOL = "Aitzol Berasategi"
_NERLICH = "Peter Nerlich"
_BARBIN = "Charles Barbin"

SOURCES: tuple[Source, ...] = (
    Source(
        "plasma-workspace-wallpapers",
        "/usr/share/wallpapers",
        # NAME/contents/images/WxH.ext; images_dark/ holds another picture (a dark variant)
        r"([^/]+)/contents/images(_dark)?/[^/]+",
        # metadata.json of each wallpaper says LGPLv3; Debian's copyright file says GPL-2+
        "GPL-2+",
        *_deb("plasma-workspace-wallpapers"),
        pictures={
            "BytheWater": Credit("Maciej Wiklo"),
            "ColdRipple": Credit(_RISTO),
            "ColorfulCups": Credit("Dmitri Popov"),
            "DarkestHour": Credit(_RISTO),
            "EveningGlow": Credit("Ian Hex"),
            "FallenLeaf": Credit("Martin Klapetek"),
            "Grey": Credit("Sigi Sagi"),
            "Kite": Credit(_RISTO),
            "OneStandsOut": Credit(_RISTO),
            "Path": Credit(_RISTO),
            "summer_1am": Credit(_RISTO),
        },
    ),
    Source(
        "mate-backgrounds",
        "/usr/share/backgrounds/mate",
        r"nature/([^/]+?)(?:_\d+x\d+)?\.\w+",  # NAME.jpg, NAME_WxH.jpg: one picture
        "GPL-2+",
        *_deb("mate-backgrounds"),
        pictures={
            "Aqua": Credit(_BARBIN),
            "Blinds": Credit("Lennart Poettering"),
            "Dune": Credit("Marco Cogoni"),
            "FreshFlower": Credit("Jens Ansorg"),
            "Garden": Credit(_BARBIN),
            "GreenMeadow": Credit("Timothy Schellhase"),
            "LadyBird": Credit(_BARBIN),
            "RainDrops": Credit('"blackcombwhistler07"'),
            "Storm": Credit("Sergey Nazarov"),
            "TwoWings": Credit(_BARBIN),
            "Wood": Credit("Jean-François Fortin Tam"),
            "YellowFlower": Credit(_BARBIN),
        },
    ),
    Source(
        "lomiri-wallpapers-16.04",
        "/usr/share/backgrounds",
        r"([^/]+)_by_[^/]+\.jpg",
        "CC-BY-4.0",
        *_deb("lomiri-wallpapers-16.04"),
        pictures={
            "aitzgorri": Credit(_AITZOL),
            "analogpattern": Credit(_NERLICH, "CC-BY-SA-4.0"),
            "Bridge": Credit("Sander Klootwijk", "CC-BY-SA-4.0"),
            "Dragonfly": Credit('"Bolly"', "CC-BY-SA-4.0"),
            "free": Credit(_NERLICH, "CC-BY-SA-4.0"),
            "friends": Credit(_AITZOL),
            "greentock": Credit(_NERLICH, "CC-BY-SA-4.0"),
            "life": Credit(_AITZOL),
            "picosdeeuropa": Credit(_AITZOL),
            "Picture_0B": Credit('Trevor "Freespace"'),
            "Picture_1A": Credit('Trevor "Freespace"'),
            "seeding": Credit("Clemens Engelhardt", "CC0-1.0"),
            "sunset": Credit(_AITZOL),
            "Wine": Credit("Jakub Mede"),
        },
    ),
    Source(
        "lomiri-wallpapers-20.04",
        "/usr/share/backgrounds",
        r"([^/]+)_by_[^/]+\.jpg",
        "CC-BY-SA-3.0",
        *_deb("lomiri-wallpapers-20.04"),
        pictures={"Kleiber": Credit("Lukas Baubkus")},
    ),
    Source(
        "scikit-image",
        _module_dir("skimage", "data"),
        r"([^/]+)\.(?:png|jpg)",
        "CC0-1.0",
        "skimage/data/_fetchers.py (each image's docstring)",
        "pip install scikit-image",
        pictures={
            "astronaut": Credit("NASA", "public domain"),
            "brick": Credit("CC0Textures"),
            "camera": Credit("Lav Varshney"),
            "chelsea": Credit("Stefan van der Walt"),
            "coffee": Credit("Rachel Michetti"),
            "coins": Credit("Brooklyn Museum", "no known copyright restrictions"),
            "grass": Credit("linolafett (DeviantArt)"),
            "gravel": Credit("CC0Textures"),
            "hubble_deep_field": Credit("NASA", "public domain"),
            "rocket": Credit("SpaceX", "public domain"),
        },
    ),
)


@dataclass(frozen=True)
class Extra:
    """A package of pictures for training only, taken whole: every image of at least
    ``min_side`` pixels in ``folders`` of ``root`` is one picture, never held out (the
    evaluation sets are drawn from :data:`SOURCES` alone), byte-identical files once.

    Attributes:
        folders: sub-folders of ``root``; one holding an ``info.ini`` per sub-folder (a sky
            culture) keeps only the sub-folders whose ``license =`` line is free (no NC, no ND).
    """

    package: str
    root: str
    folders: tuple[str, ...]
    licence: str
    licence_file: str
    install: str
    min_side: int = 128


# Graphics and photographs on dark backgrounds: the 37 training photographs are landscapes and
# close-ups, and the artwork the held-out copies are searched among (desktop renders, dark
# graphics) had nothing like it to be told apart by (RESULTS.md, "default encoder probes").
EXTRAS: tuple[Extra, ...] = (
    Extra(
        "stellarium-data",
        "/usr/share/stellarium",
        # nebulae/default: deep-sky photographs (credits: the copyright file's section 4);
        # skycultures/NAME/: constellation drawings, each culture's licence in its info.ini
        ("nebulae/default", "skycultures"),
        "GPL-2+",
        *_deb("stellarium-data"),
    ),
)

_NOT_FREE = re.compile(r"\b(NC|ND)\b")


def free_licence(text: str) -> bool:
    """Whether a licence line allows commercial use and adaptation (no NC, no ND; not blank)."""
    return bool(text.strip()) and not _NOT_FREE.search(text)


def _culture_licence(folder: Path) -> str:
    try:
        lines = (folder / "info.ini").read_text("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip().lower() == "license":
            return value.strip()
    return ""


def extra_files(extra: Extra) -> list[tuple[str, str]]:
    """``(relative path, licence)`` of the pictures of ``extra`` found under its root, in
    folder order then path order; empty when the package is not installed."""
    root = Path(extra.root)
    if not root.is_dir():
        return []
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for folder in extra.folders:
        base = root / folder
        if not base.is_dir():
            continue
        for rel in walk_images(base):
            licence = extra.licence
            first = Path(rel).parts[0]
            if (base / first / "info.ini").is_file():  # a sky culture: its own licence
                licence = _culture_licence(base / first)
                if not free_licence(licence):
                    continue
            path = base / rel
            try:
                with Image.open(path) as img:
                    if min(img.size) < extra.min_side:
                        continue
            except (OSError, Image.DecompressionBombError) as e:
                logger.warning("skipping %s: %s", path, e)
                continue
            digest = _sha256(path)
            if digest not in seen:
                seen.add(digest)
                found.append((f"{folder}/{rel}", licence))
    return found


# --- finding the pictures -------------------------------------------------------------------


@dataclass
class Picture:
    """One photograph: its distinct files (symlinks resolved, byte-identical copies dropped)."""

    source: Source
    name: str
    files: list[Path]  # resolved, the largest first
    sizes: list[tuple[int, int]]  # (width, height) of each file
    sha256: list[str]

    @property
    def id(self) -> str:
        return f"{self.source.package}/{self.name}"

    @property
    def credit(self) -> Credit:
        return self.source.pictures[self.name]

    @property
    def licence(self) -> str:
        return self.credit.licence or self.source.licence


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_pictures(source: Source) -> list[Picture]:
    """The listed pictures of ``source`` found under its root, in name order.

    A listed picture with no file is left out (another version of the package); an unreadable
    file is skipped with a warning.
    """
    if not source.root or not os.path.isdir(source.root):
        return []
    layout = re.compile(source.layout)
    found: dict[str, dict[Path, None]] = {}
    for rel in walk_images(source.root):
        m = layout.fullmatch(rel)
        name = "".join(g for g in m.groups() if g) if m else None
        if name in source.pictures:
            path = Path(os.path.realpath(os.path.join(source.root, rel)))  # symlinks resolved
            found.setdefault(name, {})[path] = None
    pictures = []
    for name in sorted(found):
        entries: dict[str, tuple[Path, tuple[int, int]]] = {}  # by content: copies dropped
        for path in found[name]:
            try:
                with Image.open(path) as img:
                    size = img.size
                entries.setdefault(_sha256(path), (path, size))
            except (OSError, Image.DecompressionBombError) as e:
                logger.warning("skipping %s: %s", path, e)
        ranked = sorted(entries.items(), key=lambda e: (-e[1][1][0] * e[1][1][1], e[1][0]))
        if ranked:
            pictures.append(
                Picture(
                    source,
                    name,
                    files=[path for _, (path, _) in ranked],
                    sizes=[size for _, (_, size) in ranked],
                    sha256=[digest for digest, _ in ranked],
                )
            )
    return pictures


def check_distinct(pictures: Sequence[Picture]) -> None:
    """Raises if two pictures share a file's bytes: they would leak across the split."""
    owner: dict[str, str] = {}
    for p in pictures:
        for digest, path in zip(p.sha256, p.files):
            if owner.setdefault(digest, p.id) != p.id:
                raise DatasetError(
                    f"{path} of {p.id} is byte-identical to a file of {owner[digest]}; "
                    "list the file under one picture only in training.photo_sources.SOURCES"
                )


def install_line(sources: Sequence[Source]) -> str:
    """The commands that install ``sources``: one apt-get line, then any pip line."""
    apt = [s.package for s in sources if s.install.startswith("apt-get")]
    other = [s.install for s in sources if not s.install.startswith("apt-get")]
    return " && ".join(([f"apt-get install -y {' '.join(apt)}"] if apt else []) + other)
