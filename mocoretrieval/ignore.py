"""Which files and folders the walk leaves out: defaults, ``--exclude`` and ignore files.

Patterns use gitignore syntax and follow git's precedence, through ``pathspec.GitIgnoreSpec``:

1. :data:`DEFAULT_PATTERNS` (hidden names, NAS and OS clutter), like git's global excludes file;
2. the index's ``--exclude`` patterns, relative to the root and kept in its manifest, like
   ``.git/info/exclude``;
3. the ``.mocoretrievalignore`` files of the tree, each relative to its own folder, a deeper
   one over a shallower one.

The last pattern that matches a path decides, so a ``!pattern`` later in that order includes
again what an earlier one excluded. As in git, a file in an excluded folder cannot be included
again: the walk never enters that folder (nor reads the ignore files inside it).

Each file's patterns are rewritten relative to the root (``trips/.mocoretrievalignore``'s
``*.png`` becomes ``/trips/**/*.png``) and appended to the rules of its folder, so that the
rules across files apply exactly as within one. ``tests/test_ignore.py`` checks the result
against ``git ls-files``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from pathspec import GitIgnoreSpec

from .errors import IgnoreRuleError

IGNORE_FILE = ".mocoretrievalignore"
DEFAULTS = "defaults"
EXCLUDE = "--exclude"
# Always on; a "!" pattern in an ignore file or --exclude includes one again.
DEFAULT_PATTERNS: tuple[str, ...] = (
    ".*",  # hidden files and folders (.git, .Trash-1000, the index's own .mocoretrieval)
    "@eaDir",  # Synology thumbnails and metadata, one beside every photo folder
    "\\#recycle",  # Synology recycle bin ('#' starts a comment unless escaped)
    ".DS_Store",  # macOS Finder metadata
    "._*",  # macOS AppleDouble resource forks, named like the image they belong to
    "$RECYCLE.BIN",  # Windows recycle bin
    "System Volume Information",  # Windows
    ".thumbnails",  # freedesktop and Android thumbnail caches
)
_GLOB_CHARS = re.compile(r"([\\*?\[\]])")


class Rule(NamedTuple):
    """One pattern and where it was written.

    Attributes:
        source: :data:`DEFAULTS`, :data:`EXCLUDE`, or the ignore file's path relative to the root.
        line: its line in that file (1-based; its position for the other two).
        pattern: as written.
    """

    source: str
    line: int
    pattern: str


def _compiled(line: str, where: str) -> tuple[re.Pattern[str], bool] | None:
    """``(regex, excludes)`` of one pattern line, relative to the root: the regex matches, in
    full, a path the pattern itself matches (a folder's with a trailing '/'), not the paths
    inside a folder it matches. None for a blank line or a comment.

    pathspec matches file paths, so its regex also matches the paths below a folder that a
    pattern matches, and ``GitIgnoreSpec`` ranks the matches to say whether a file is ignored;
    the walk asks about each entry as git does instead, folders before what they hold, the last
    pattern that matches it deciding. Matching in full gives that.

    Raises:
        IgnoreRuleError: git could not read it either.
    """
    if line.endswith("/**/") and len(line.removeprefix("!")) > 4:
        line = line[:-1] + "*/"  # the folders inside X; pathspec reads "X/**/" as X itself
    try:
        pattern = GitIgnoreSpec.from_lines([line]).patterns[0]
    except ValueError as e:  # pathspec's GitIgnorePatternError
        raise IgnoreRuleError(
            f"{where}: {line!r} is not a gitignore pattern ({e}); fix or delete it (a "
            "literal '!' or '#' at the start, or a trailing '\\', is written with a '\\' "
            "before it)"
        ) from None
    if pattern.include is None or pattern.regex is None:
        return None
    regex = pattern.regex.pattern
    if regex.endswith("/") and not regex.endswith(")"):
        regex += ".+"  # "X/**": everything inside X, but not X itself
    # Unanchored regexes (those of "*", "*/") may start anywhere; "^" still pins the others.
    return re.compile(f"(?s:.*?)(?:{regex})"), pattern.include


def _rebased(pattern: str, folder: str) -> str:
    """``pattern`` from the ignore file of ``folder`` (relative to the root), made relative to
    the root as git reads it: anchored to the folder when it holds a '/' before its end,
    else matching at any depth below it."""
    negate = pattern.startswith("!")
    body = pattern[1:] if negate else pattern
    if not body.endswith("\\ "):  # git drops trailing spaces unless escaped
        body = body.rstrip(" ")
    prefix = "/" + _GLOB_CHARS.sub(r"\\\1", folder)
    if body == "**":  # everything in the folder
        body = prefix + "/**"
    elif "/" in body.rstrip("/"):
        body = prefix + ("" if body.startswith("/") else "/") + body
    else:
        body = prefix + "/**/" + body
    return ("!" if negate else "") + body


class IgnoreRules:
    """The rules in force in one folder; :meth:`with_file` gives those of a folder below."""

    def __init__(self, rules: Sequence[tuple[Rule, re.Pattern[str], bool]] = ()) -> None:
        self._rules = tuple(rules)  # (rule, its regex relative to the root, excludes)

    @property
    def rules(self) -> tuple[Rule, ...]:
        """In the order they apply: the last that matches a path decides."""
        return tuple(rule for rule, _, _ in self._rules)

    @classmethod
    def for_root(cls, exclude: Iterable[str] = ()) -> IgnoreRules:
        """The defaults and ``exclude`` (gitignore patterns relative to the root).

        Raises:
            IgnoreRuleError: a pattern of ``exclude`` is malformed.
        """
        rules = []
        for source, patterns in ((DEFAULTS, DEFAULT_PATTERNS), (EXCLUDE, exclude)):
            for i, pattern in enumerate(patterns, 1):
                compiled = _compiled(pattern, source)
                if compiled is not None:
                    rules.append((Rule(source, i, pattern), *compiled))
        return cls(rules)

    def with_file(self, root: Path, folder: str) -> IgnoreRules:
        """These rules and those of ``folder``'s ignore file (``folder`` relative to ``root``,
        POSIX, ``""`` for the root), which take precedence.

        Raises:
            IgnoreRuleError: the file cannot be read, is not UTF-8, or a line is malformed.
        """
        path = root / folder / IGNORE_FILE
        try:
            text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not a pattern
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise IgnoreRuleError(
                f"cannot read {path} ({reason}): its patterns would be ignored; make it a "
                "readable UTF-8 text file, or delete it"
            ) from None
        source = f"{folder}/{IGNORE_FILE}" if folder else IGNORE_FILE
        rules = list(self._rules)
        for i, pattern in enumerate(text.splitlines(), 1):
            where = f"{path}, line {i}"
            compiled = _compiled(pattern, where)  # checked as written, then rebased
            if compiled is not None and folder:
                compiled = _compiled(_rebased(pattern, folder), where)
            if compiled is not None:
                rules.append((Rule(source, i, pattern), *compiled))
        return IgnoreRules(rules)

    def match(self, path: str, is_dir: bool) -> Rule | None:
        """The rule that excludes ``path`` (POSIX, relative to the root), or None if none does.

        Only ``path`` itself is matched: the walk does not enter an excluded folder, so what is
        inside one is never asked about.
        """
        entry = path + "/" if is_dir else path
        for rule, regex, excludes in reversed(self._rules):
            if regex.fullmatch(entry):
                return rule if excludes else None
        return None


def excluding_rule(path: str, excluded: Mapping[str, Rule]) -> Rule | None:
    """The rule that excluded ``path`` or a folder above it, by a walk's ``excluded`` map
    (files by path, folders by path and a trailing '/'); None if the walk did not exclude it."""
    if path in excluded:
        return excluded[path]
    parts = path.split("/")
    for i in range(1, len(parts)):
        rule = excluded.get("/".join(parts[:i]) + "/")
        if rule is not None:
            return rule
    return None


def count_excluded(excluded: Mapping[str, Rule]) -> dict[str, dict[str, dict[str, int]]]:
    """``{source: {pattern: {"files": n, "folders": n}}}`` of a walk's ``excluded`` map:
    JSON-able, as the manifest and :class:`.UpdateReport` keep it."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for path, rule in excluded.items():
        counts = out.setdefault(rule.source, {}).setdefault(
            rule.pattern, {"files": 0, "folders": 0}
        )
        counts["folders" if path.endswith("/") else "files"] += 1
    return out
