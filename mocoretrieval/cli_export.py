"""The `export-embeddings` subcommand: wiring over :mod:`mocoretrieval.export_vectors`."""

from __future__ import annotations

import argparse

from .cli_common import INDEX_HELP


def _cmd_export_embeddings(args: argparse.Namespace) -> int:
    from .export_vectors import EXPORT_MANIFEST, PATHS_FILE, export_embeddings

    report = export_embeddings(
        args.index, args.out, dtype=args.dtype, chunk_rows=args.chunk_rows, force=args.force
    )
    files = len(report.chunks)
    print(
        f"wrote {report.count} {report.dim}-d {report.dtype} vectors in {files} .npy "
        f"file{'' if files == 1 else 's'}, {PATHS_FILE} and {EXPORT_MANIFEST} to {report.out}"
    )
    return 0


def add_export_embeddings(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-embeddings",
        help="write an index's vectors (chunked .npy) and their paths into a folder",
        description="Write every stored vector of the index into OUT as vectors-00000.npy, "
        "vectors-00001.npy, ... (concatenated in order: one row per image, L2-normalised), "
        "paths.csv (row,path, relative to the indexed folder) and embeddings.json (dim, dtype, "
        "chunks, model), written last. Streamed from one snapshot of the index, a chunk at a "
        "time.",
    )
    p.add_argument("out", metavar="OUT", help="the folder to write (new or empty)")
    p.add_argument("--index", metavar="DIR", help=INDEX_HELP)
    p.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        help="dtype of the .npy files (default: the index's --store-dtype, the values as stored)",
    )
    p.add_argument(
        "--chunk-rows",
        type=int,
        metavar="N",
        help="vectors per .npy file (default: about 128 MiB of them)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier export in OUT (only its own files are removed)",
    )
    p.set_defaults(func=_cmd_export_embeddings)
