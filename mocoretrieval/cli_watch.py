"""The `mocoretrieval watch` subcommand: wiring over :class:`mocoretrieval.watch.Watcher`."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator

from .cli_common import add_backend_arguments, notify
from .update import UpdateReport


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """`systemctl stop` (SIGTERM) stops the watch as Ctrl-C does: cleanly, exit status 0."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (a test calling main() from one)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _printer(quiet: bool) -> Callable[[UpdateReport], None]:
    """Prints a line per update that changed something (and for the first one)."""
    first = [True]

    def on_update(report: UpdateReport) -> None:
        changed = report.added or report.updated or report.removed or report.skipped
        if quiet or not (changed or first[0]):
            return
        first[0] = False
        print(
            f"{time.strftime('%H:%M:%S')} added {len(report.added)}, updated "
            f"{len(report.updated)}, removed {len(report.removed)}, skipped "
            f"{report.num_skipped} in {report.seconds:.1f} s",
            flush=True,  # a pipe (systemd's journal) gets each line as it comes
        )

    return on_update


def _cmd_watch(args: argparse.Namespace) -> int:
    from .cli_roots import known_roots
    from .models import open_index
    from .watch import Watcher

    roots = args.roots or known_roots(args.index)  # no ROOT: every root of the index
    exclude = args.exclude if args.exclude is not None else [] if args.no_exclude else None
    index = open_index(
        args.index,
        root=roots[0] if len(roots) == 1 else roots,
        backend=args.backend,
        device=args.device,
        notify=None if args.quiet else notify,
    )
    watcher = Watcher(
        index,
        exclude=exclude,
        polling=args.polling,
        interval=args.interval,
        quiet=args.delay,
        update_options={"batch_size": args.batch_size, "workers": args.workers},
        on_update=_printer(args.quiet),
    )
    with _sigterm_as_interrupt():
        try:
            with watcher:
                how = (
                    "file-system events"
                    if watcher.mode == "events"
                    else f"polling every {args.interval:g} s"
                )
                print(
                    f"watching {watcher.where} ({how}) into {index.path}; Ctrl-C to stop",
                    flush=True,
                )
                watcher.run()
        except KeyboardInterrupt:
            print(
                f"stopped watching {watcher.where}; the index keeps every batch committed",
                file=sys.stderr,
            )
    return 0


def add_watch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "watch",
        help="keep the index of a folder current as photos come and go",
        description="Index the ROOTs (as `index` does), then keep watching them: new, changed, moved "
        "and deleted images are applied within seconds, in batches, by the same incremental "
        "update. Uses file-system events, or polls when they cannot be had (say, inotify's "
        "watch limit is reached: a warning says how to raise it). Ctrl-C or SIGTERM stops it "
        "cleanly.",
    )
    p.add_argument(
        "roots",
        nargs="*",
        metavar="ROOT",
        help="folders of images (default: every root of the index; several need --index)",
    )
    p.add_argument("--index", metavar="DIR", help="index directory (default ROOT/.mocoretrieval)")
    p.add_argument(
        "--polling",
        action="store_true",
        help="compare the folder with the index every --interval seconds instead of watching "
        "for events (network shares changed by other machines send no events)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between polls (default 5; at least 10x what one walk of the folder takes)",
    )
    p.add_argument(
        "--delay",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="update once no change came for this long (default 1; at most 10 s after the "
        "first change of a batch)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        help="gitignore-style pattern to leave out, relative to ROOT (repeatable); kept in the "
        "index, as with `index --exclude`",
    )
    p.add_argument("--no-exclude", action="store_true", help="drop the index's --exclude patterns")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: automatic)")
    p.add_argument("--workers", type=int, help="decoding processes (default: automatic)")
    p.add_argument("--device", help="torch device: cpu, cuda, cuda:1 (default: automatic)")
    add_backend_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print no line per update")
    p.set_defaults(func=_cmd_watch)
