"""Write every zoo network as ONNX into a directory.

    python -m models.zoo.write OUTDIR [--opset 17] [--dynamo] [--only resnet_basic,vit]

Files: ``<family>.ts<opset>.onnx`` (TorchScript exporter) and, with
``--dynamo``, ``<family>.dynamo.onnx``.  Exports that fail are reported and
skipped (exit status 1 if any failed).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python models/zoo/write.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "models.zoo"

import onnx

from models.zoo import FAMILIES, build
from models.zoo.export import export


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--dynamo", action="store_true", help="also export with the dynamo exporter")
    ap.add_argument("--only", default="", help="comma-separated families (default: all)")
    args = ap.parse_args(argv)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    families = [f for f in args.only.split(",") if f] or list(FAMILIES)
    failed = 0
    for fam in families:
        model, shape = build(fam)
        jobs = [("torchscript", args.opset, f"{fam}.ts{args.opset}.onnx")]
        if args.dynamo:
            jobs.append(("dynamo", 18, f"{fam}.dynamo.onnx"))
        for exporter, opset, fname in jobs:
            try:
                proto = export(model, shape, exporter, opset)
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{fname}: export failed: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
                failed += 1
                continue
            onnx.save(proto, os.fspath(out / fname))
            print(f"{fname}: {len(proto.graph.node)} nodes")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
