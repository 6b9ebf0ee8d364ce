"""The whole-network table of docs/networks.md: every model family, differentiated by onnxbp.

For each family (TorchScript export, opset 17, symbolic batch) it reports the forward node
count, the number of gradients (every parameter plus the input), the worst relative error
against torch autograd (the harness of tests/test_networks.py), the time to build the
gradient graph (median and min-max of 5 ``onnxbp.gradient`` calls), the gradient model's
node count, and onnxbp's own finite-difference checker (float64 forward, rtol 1e-3).

    python benchmarks/networks_report.py [--families resnet_basic vit ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import onnxbp  # noqa: E402
import test_networks as tn  # noqa: E402  (the comparison harness; needs torch)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(tn.FAMILIES))
    args = ap.parse_args(argv)
    print("| network | nodes | gradients | worst rel. error vs torch | gradient build, median (min-max) ms "
          "| gradient-model nodes | finite differences (float64) worst rel. error |")
    print("|---|---:|---:|---|---|---:|---|")
    for family in args.families:
        r = tn.run_network(family, "torchscript", 17)
        worst = tn.compare(r, 1e-4)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            onnxbp.gradient(r["proto"])
            times.append((time.perf_counter() - t0) * 1e3)
        fd = tn.fd_check(r)
        print(f"| {family} | {len(r['proto'].graph.node)} | {len(r['names'])} | {worst:.1e} | "
              f"{statistics.median(times):.0f} ({min(times):.0f}-{max(times):.0f}) | {len(r['gm'].graph.node)} | "
              f"{fd:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
