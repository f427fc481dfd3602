"""The model subcommands, `convert` and `export-onnx`: wiring over :mod:`.sources` and
:mod:`.onnx_export`."""

from __future__ import annotations

import argparse


def _cmd_convert(args: argparse.Namespace) -> int:
    from .sources import convert

    encoder = convert(args.source, args.out_dir)
    print(f"wrote MoCo {encoder.moco_version} {encoder.arch} ({encoder.dim}-d) to {args.out_dir}")
    return 0


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint (or any model source) to the save_pretrained layout",
        description="Load any source MoCoEncoder.from_pretrained accepts and write it as "
        "config.json + model.safetensors + README.md, ready for push_to_hub.",
    )
    p.add_argument("source", help="official .pth.tar, alias, directory or Hub id")
    p.add_argument("out_dir", help="directory to write")
    p.set_defaults(func=_cmd_convert)


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from .onnx_export import export_onnx, sidecar_path
    from .sources import load

    encoder = load(args.source)
    path = export_onnx(encoder, args.out, opset=args.opset)
    print(
        f"wrote {path} and {sidecar_path(path).name}: {encoder.arch}, {encoder.dim}-d, opset "
        f"{args.opset}; load it with mocoretrieval.OnnxEncoder.from_file"
    )
    return 0


def add_export_onnx(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-onnx",
        help="export an encoder to one ONNX file for onnxruntime",
        description="Load any source MoCoEncoder.from_pretrained accepts and write OUT.onnx "
        "(dynamic batch, L2-normalised embeddings) plus OUT.onnx.json; the preprocessing config "
        "and weights hash travel inside the file too, so it is usable on its own.",
    )
    p.add_argument("source", help="official .pth.tar, alias, directory or Hub id")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 17 (default 18)")
    p.set_defaults(func=_cmd_export_onnx)
