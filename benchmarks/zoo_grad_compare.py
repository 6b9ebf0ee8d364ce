"""Are the gradient models of the zoo networks numerically the same before and after a change?

``dump`` builds every network of ``models/zoo`` (TorchScript exporter, opset 17, symbolic
batch, as benchmarks/networks_report.py) plus models/lenet.onnx and models/mlp.onnx,
differentiates each with ``onnxbp.gradient(model)`` (every parameter) and runs the gradient
model in onnxruntime (CPU, 1 thread) on seeded random feeds: batch 2, the forward inputs and
an upstream ``<Y>_grad`` for every forward output, drawn from the FORWARD model alone (seed
fixed per network) so both sides get the same feeds whatever the code under test does.  It
writes ``OUTDIR/<name>.npz`` (every gradient-model output, by name), ``OUTDIR/<name>.onnx``
(the forward model used) and ``OUTDIR/nodes.json`` (node counts).  ``--forward-from DIR``
takes the forward models of an earlier dump instead of exporting again (torch export need not
be bit-reproducible).  ``compare`` prints, per network, the largest absolute difference and
the largest relative difference ``max|a-b| / max(max|a|, tiny)`` over every output, and
whether the two dumps are bit-identical; it exits 1 if an output is missing or a shape differs.

    PYTHONPATH=/tmp/before python benchmarks/zoo_grad_compare.py dump /tmp/zoo_before
    python benchmarks/zoo_grad_compare.py dump /tmp/zoo_after --forward-from /tmp/zoo_before
    python benchmarks/zoo_grad_compare.py compare /tmp/zoo_before /tmp/zoo_after

Only the public ``onnxbp.gradient`` is used, so the script runs against either tree
(``import onnxbp`` resolves through PYTHONPATH); the zoo builders come from this checkout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

ROOT = Path(__file__).resolve().parents[1]
FILE_MODELS = {"lenet": ROOT / "models" / "lenet.onnx", "mlp": ROOT / "models" / "mlp.onnx"}
BATCH = 2
OPSET = 17
NODES_JSON = "nodes.json"
TINY = float(np.finfo(np.float32).tiny)


def zoo_families() -> list:
    """The zoo networks; call after ``import onnxbp``, which must not come from ROOT."""
    sys.path.insert(0, str(ROOT))  # models.zoo of this checkout
    from models.zoo import FAMILIES

    return list(FAMILIES)


def export_zoo(family: str) -> onnx.ModelProto:
    import torch

    from models.zoo import build
    from models.zoo.export import export

    torch.set_num_threads(1)
    model, shape = build(family)
    return export(model, shape, "torchscript", OPSET)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _random(rng: np.random.Generator, elem_type: int, shape) -> np.ndarray:
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    return np.zeros(shape, dtype)


def forward_feeds(name: str, model: onnx.ModelProto) -> dict:
    """Inputs (symbolic dims = BATCH) and an upstream ``<Y>_grad`` for every float output,
    seeded by the network's name; the output shapes come from running the forward model."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else BATCH for d in tt.shape.dim)
        feeds[vi.name] = _random(rng, tt.elem_type, shape)
    outs = [o.name for o in model.graph.output]
    for o, y in zip(model.graph.output, session(model).run(outs, feeds)):
        if np.issubdtype(y.dtype, np.floating):
            feeds[o.name + "_grad"] = _random(rng, o.type.tensor_type.elem_type, y.shape)
    return feeds


def dump_one(name: str, forward: onnx.ModelProto, outdir: Path) -> dict:
    import onnxbp

    feeds = forward_feeds(name, forward)
    t0 = time.perf_counter()
    gm = onnxbp.gradient(forward)
    build_s = time.perf_counter() - t0
    inits = {t.name for t in gm.graph.initializer}
    needed = [i.name for i in gm.graph.input if i.name not in inits]
    missing = [n for n in needed if n not in feeds]
    if missing:
        raise RuntimeError(f"gradient model takes inputs the forward model does not explain: {missing}")
    outs = [o.name for o in gm.graph.output]
    values = session(gm).run(outs, {n: feeds[n] for n in needed})
    np.savez(outdir / f"{name}.npz", **dict(zip(outs, values)))
    onnx.save(forward, str(outdir / f"{name}.onnx"))
    print(f"{name}: {len(forward.graph.node)} forward nodes, {len(gm.graph.node)} gradient-model nodes, "
          f"{len(outs)} outputs, gradient built in {build_s:.2f} s", flush=True)
    return {"forward_nodes": len(forward.graph.node), "gradient_nodes": len(gm.graph.node), "outputs": len(outs)}


def cmd_dump(args) -> int:
    import onnxbp  # the tree PYTHONPATH names; compare does not need it

    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    print(f"onnxbp from {Path(onnxbp.__file__).parent}", flush=True)
    names = zoo_families() + list(FILE_MODELS)
    counts, failed = {}, []
    for name in names:
        try:
            if args.forward_from:
                forward = onnx.load(str(Path(args.forward_from) / f"{name}.onnx"))
            elif name in FILE_MODELS:
                forward = onnx.load(str(FILE_MODELS[name]))
            else:
                forward = export_zoo(name)
            counts[name] = dump_one(name, forward, outdir)
        except Exception as exc:  # noqa: BLE001 - report and go on
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            print(f"{name}: FAILED: {type(exc).__name__}: {msg}", file=sys.stderr, flush=True)
            counts[name] = {"error": f"{type(exc).__name__}: {msg}"}
            failed.append(name)
    (outdir / NODES_JSON).write_text(json.dumps(counts, indent=1) + "\n")
    print(f"{len(names) - len(failed)} of {len(names)} networks dumped to {outdir}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _nodes(counts: dict, name: str) -> str:
    entry = counts.get(name, {})
    return str(entry["gradient_nodes"]) if "gradient_nodes" in entry else "-"


def cmd_compare(args) -> int:
    dir_a, dir_b = Path(args.dir_a), Path(args.dir_b)
    counts_a, counts_b = (json.loads((d / NODES_JSON).read_text()) if (d / NODES_JSON).exists() else {}
                          for d in (dir_a, dir_b))
    names = sorted({p.stem for d in (dir_a, dir_b) for p in d.glob("*.npz")} | set(counts_a) | set(counts_b))
    problems, worst_abs, worst_rel, identical = [], 0.0, 0.0, True
    print(f"A = {dir_a}, B = {dir_b}\n")
    print("| network | outputs | gradient nodes A | gradient nodes B | max abs diff | max rel diff | bit-identical |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in names:
        pa, pb = dir_a / f"{name}.npz", dir_b / f"{name}.npz"
        if not (pa.exists() and pb.exists()):
            problems.append(f"{name}: no dump in {'A' if not pa.exists() else 'B'}")
            identical = False
            print(f"| {name} | - | {_nodes(counts_a, name)} | {_nodes(counts_b, name)} | - | - | missing |")
            continue
        a, b = np.load(pa), np.load(pb)
        for key in sorted(set(a.files) ^ set(b.files)):
            problems.append(f"{name}: output {key} only in {'A' if key in a.files else 'B'}")
        net_abs, net_rel, net_same = 0.0, 0.0, set(a.files) == set(b.files)
        for key in sorted(set(a.files) & set(b.files)):
            va, vb = a[key], b[key]
            if va.shape != vb.shape:
                problems.append(f"{name}: output {key} shape {va.shape} (A) != {vb.shape} (B)")
                net_same = False
                continue
            net_same &= va.dtype == vb.dtype and va.tobytes() == vb.tobytes()
            if va.size == 0:
                continue
            fa, fb = va.astype(np.float64), vb.astype(np.float64)
            diff = float(np.max(np.abs(fa - fb)))
            net_abs = max(net_abs, diff)
            net_rel = max(net_rel, diff / max(float(np.max(np.abs(fa))), TINY))
        identical &= net_same
        worst_abs, worst_rel = max(worst_abs, net_abs), max(worst_rel, net_rel)
        print(f"| {name} | {len(set(a.files) | set(b.files))} | {_nodes(counts_a, name)} | {_nodes(counts_b, name)} "
              f"| {net_abs:.3e} | {net_rel:.3e} | {'yes' if net_same else 'no'} |")
    print(f"\noverall: max abs diff {worst_abs:.3e}, max rel diff {worst_rel:.3e}; "
          f"{'bit-identical' if identical else 'NOT bit-identical'}")
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="differentiate every network and save the gradient models' outputs")
    d.add_argument("outdir")
    d.add_argument("--forward-from", metavar="DIR", help="load the forward models of an earlier dump")
    d.set_defaults(func=cmd_dump)
    c = sub.add_parser("compare", help="compare two dumps")
    c.add_argument("dir_a")
    c.add_argument("dir_b")
    c.set_defaults(func=cmd_compare)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
