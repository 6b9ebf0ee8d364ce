"""Data-parallel scaling on MPI: 1 vs 2 processes, 1 onnxruntime thread each.

    python benchmarks/bench_distributed.py [--nets lenet resnet18] [--json out.json]

For each network and each process count n, ``mpirun -n n`` runs this file in worker mode: a
data-parallel :class:`onnxbp.training.Trainer` (``comm=MPI.COMM_WORLD``, SGD momentum 0.9) on a
fixed per-rank batch (weak scaling: the global batch grows with n), warm-up steps, then timed
steps.  Rank 0 reports steps/s, samples/s (global batch x steps/s), the share of the step spent
in ``Allreduce`` (including waiting for the slower rank) and, with n > 1, the measured
``Allreduce`` time of the gradient buffer and of an 8-byte message (latency), from which
docs/distributed.md models the cost for 8-64 workers (``--project`` prints the table).

Networks: models/lenet.onnx (1x8x8, per-rank batch 32) and the CIFAR ResNet-18 of
benchmarks/bench_train_step.py (3x32x32, BatchNormalization in training mode, per-rank batch 16).

mpirun gets ``--oversubscribe`` and, as root, ``--allow-run-as-root`` (containers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

NETS = {"lenet": {"batch": 32, "shape": (1, 8, 8), "warmup": 20, "steps": 300},
        "resnet18": {"batch": 16, "shape": (3, 32, 32), "warmup": 2, "steps": 8}}


def _model(net: str, path: Path) -> str:
    if net == "lenet":
        return str(ROOT / "models" / "lenet.onnx")
    import onnx
    from bench_train_step import build_resnet18

    onnx.save(build_resnet18(64), str(path))
    return str(path)


def worker(net: str, model: str, out: str) -> None:
    from onnxbp.training import SGD, Trainer
    from onnxbp.training.distributed import world

    comm = world()
    cfg = NETS[net]
    tr = Trainer(model, optimizer=SGD(momentum=0.9), threads=1, comm=comm)
    rng = np.random.default_rng(comm.Get_rank())
    x = rng.standard_normal((cfg["batch"],) + cfg["shape"]).astype(np.float32)
    y = rng.integers(0, 10, cfg["batch"])
    for _ in range(cfg["warmup"]):
        tr.train_step(x, y, lr=0.01)
    comm.Barrier()
    dist = tr._dist
    dist.comm_seconds = 0.0
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        tr.train_step(x, y, lr=0.01)
    seconds = time.perf_counter() - t0
    share = dist.comm_seconds / seconds
    grad_bytes = dist.buckets.nbytes
    result = {"net": net, "ranks": comm.Get_size(), "per_rank_batch": cfg["batch"], "steps": cfg["steps"],
              "steps_per_s": cfg["steps"] / seconds, "samples_per_s": cfg["steps"] * cfg["batch"] * comm.Get_size() / seconds,
              "allreduce_share": share, "gradient_bytes": grad_bytes, "buckets": len(dist.buckets.buffers)}
    if comm.Get_size() > 1:
        from mpi4py import MPI

        def timed(buf, reps):
            comm.Barrier()
            t = time.perf_counter()
            for _ in range(reps):
                comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            return (time.perf_counter() - t) / reps

        big = np.zeros(grad_bytes // 4, np.float32)
        result["allreduce_grad_s"] = min(timed(big, 5) for _ in range(3))
        result["allreduce_8B_s"] = min(timed(np.zeros(1, np.float64), 200) for _ in range(3))
        # ring all-reduce moves 2(p-1)/p of the buffer per rank: the "bus" bandwidth
        p = comm.Get_size()
        result["bus_bandwidth_GBps"] = 2 * (p - 1) / p * grad_bytes / result["allreduce_grad_s"] / 1e9
    if comm.Get_rank() == 0:
        Path(out).write_text(json.dumps(result))


def mpirun(n: int, *args) -> None:
    exe = Path(sys.executable).parent / "mpirun"
    cmd = [str(exe) if exe.exists() else (shutil.which("mpirun") or "mpirun"), "--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += ["-n", str(n), "--bind-to", "none", sys.executable, __file__, *map(str, args)]
    subprocess.run(cmd, check=True)


def project(grad_bytes: int, step_s: float, bus_GBps: float, latency_s: float) -> list:
    """Ring all-reduce model: T(p) = 2(p-1)/p * S / B + 2(p-1) * alpha, no overlap with compute."""
    rows = []
    for p in (8, 16, 32, 64):
        t = 2 * (p - 1) / p * grad_bytes / (bus_GBps * 1e9) + 2 * (p - 1) * latency_s
        rows.append({"workers": p, "allreduce_s": t, "share": t / (t + step_s), "efficiency": step_s / (step_s + t)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--worker", nargs=3, metavar=("NET", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for net in args.nets:
            model = _model(net, Path(tmp) / f"{net}.onnx")
            for n in (1, 2):
                out = Path(tmp) / f"{net}_{n}.json"
                mpirun(n, "--worker", net, model, out)
                results.append(json.loads(out.read_text()))
    print(f"{'net':<10}{'ranks':>6}{'batch':>7}{'steps/s':>10}{'samples/s':>11}{'allreduce':>11}{'grad MiB':>10}")
    for r in results:
        print(f"{r['net']:<10}{r['ranks']:>6}{r['per_rank_batch'] * r['ranks']:>7}{r['steps_per_s']:>10.2f}"
              f"{r['samples_per_s']:>11.1f}{100 * r['allreduce_share']:>10.1f}%{r['gradient_bytes'] / 2**20:>10.2f}")
    for r in results:
        if r["ranks"] > 1:
            print(f"{r['net']}: Allreduce of {r['gradient_bytes'] / 2**20:.2f} MiB in {1e3 * r['allreduce_grad_s']:.2f} ms "
                  f"(bus bandwidth {r['bus_bandwidth_GBps']:.2f} GB/s), 8 B in {1e6 * r['allreduce_8B_s']:.1f} us")
            one = next(o for o in results if o["net"] == r["net"] and o["ranks"] == 1)
            for links, bw in (("measured", r["bus_bandwidth_GBps"]), ("10 Gb/s", 1.25), ("100 Gb/s", 12.5)):
                lat = r["allreduce_8B_s"] / 2 if links == "measured" else 20e-6
                rows = project(r["gradient_bytes"], 1 / one["steps_per_s"], bw, lat)
                print(f"  projected ({links:>8}): " + ", ".join(
                    f"{x['workers']} workers {1e3 * x['allreduce_s']:.1f} ms ({100 * x['share']:.0f}%)" for x in rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
