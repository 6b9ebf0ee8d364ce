"""Size, duplication and start-up cost of one or more onnxbp source trees, as markdown tables.

    python benchmarks/foundation_metrics.py /tmp/before /work/main [--venv-size]

Per tree:
* lines (``wc -l``) of every .py file under TREE/onnxbp and TREE/cli, their totals and the
  largest module;
* the pairs the ``duplicates`` command counts (``--most 200 --seconds 60``), for the whole
  tree and for TREE/onnxbp alone;
* ``import onnxbp`` time on top of ``import onnx`` (both timed with ``time.perf_counter`` in one
  fresh ``python -c`` with PYTHONPATH=TREE): median of 5 subprocesses, interleaved between trees;
* the time to construct ``onnxbp.training.Trainer`` (loss cross_entropy, SGD momentum 0.9,
  1 thread; step-model build plus the onnxruntime sessions) for the CIFAR ResNet-18 of the
  tree's own benchmarks/bench_train_step.py (``build_resnet18``): median of 3 fresh
  subprocesses, interleaved between trees;
* with ``--venv-size``: ``du -sm`` of a fresh venv after ``pip install TREE`` (no extras; the
  tree is copied first so that the build writes nothing into it), the 5 largest installed
  distributions (file sizes from their RECORD) and whether torch was pulled in.

Progress goes to stderr; the tables go to stdout.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

IMPORT_RUNS = 5
TRAINER_RUNS = 3

IMPORT_CODE = """
import time
t0 = time.perf_counter()
import onnx
t1 = time.perf_counter()
import onnxbp
t2 = time.perf_counter()
print(onnxbp.__file__, t1 - t0, t2 - t1)
"""

TRAINER_CODE = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("bench_train_step", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
from onnxbp.training import SGD, Trainer
model = bench.build_resnet18()
t0 = time.perf_counter()
Trainer(model, loss="cross_entropy", optimizer=SGD(momentum=0.9), threads=1)
print(sys.modules["onnxbp"].__file__, time.perf_counter() - t0)
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def module_lines(tree: Path) -> dict:
    """``{relative path: line count}`` of every .py file under TREE/onnxbp and TREE/cli."""
    out = {}
    for pkg in ("onnxbp", "cli"):
        for path in sorted((tree / pkg).rglob("*.py")):
            out[path.relative_to(tree).as_posix()] = path.read_bytes().count(b"\n")
    return out


def duplicate_pairs(repo: Path) -> str:
    """The pair count of ``duplicates --repo REPO`` (with a note if it says it is incomplete)."""
    res = subprocess.run(["duplicates", "--repo", str(repo), "--most", "200", "--seconds", "60"],
                         capture_output=True, text=True, check=True)
    lines = res.stdout.splitlines()
    first = lines[0] if lines else ""
    m = re.match(r"(\d+) pairs?\b", first)
    if m:
        count = m.group(1)
    elif first.startswith("no duplicates"):
        count = "0"
    else:
        raise RuntimeError(f"duplicates --repo {repo}: unexpected first line {first!r}")
    incomplete = [ln for ln in lines if ln.startswith("incomplete:")]
    return count + (" (incomplete)" if incomplete else "")


def run_python(tree: Path, code: str, *args: str) -> list:
    """Run ``python -c CODE`` with PYTHONPATH=TREE; check it imported TREE's onnxbp; return the
    numbers it printed after the module path."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                         cwd=tempfile.gettempdir())
    if res.returncode != 0:
        raise RuntimeError(f"{tree}: subprocess failed:\n{res.stderr[-2000:]}")
    path, *numbers = res.stdout.split()
    if not Path(path).resolve().is_relative_to((tree / "onnxbp").resolve()):
        raise RuntimeError(f"{tree}: imported onnxbp from {path}, not from this tree")
    return [float(x) for x in numbers]


def interleaved(trees: list, runs: int, code: str, what: str, args_for=lambda tree: ()) -> dict:
    """``{tree: [result of each run]}``, the runs of the trees taking turns; a tree whose
    subprocess fails is reported on stderr, dropped from the later runs and mapped to None."""
    out = {t: [] for t in trees}
    for i in range(runs):
        for tree in trees:
            if out[tree] is None:
                continue
            log(f"{what}: {tree} run {i + 1}/{runs}")
            try:
                out[tree].append(run_python(tree, code, *args_for(tree)))
            except RuntimeError as exc:
                log(f"{what}: {exc}")
                out[tree] = None
    return out


def stat(runs, index: int, scale: float, fmt: str, spread: bool = True) -> str:
    """Median (and min-max) of field ``index`` of the runs, times ``scale``; "failed" for None."""
    if runs is None:
        return "failed"
    vals = [scale * r[index] for r in runs]
    text = format(statistics.median(vals), fmt)
    return f"{text} ({min(vals):{fmt}}-{max(vals):{fmt}})" if spread else text


def venv_size(tree: Path) -> dict:
    """Install TREE (no extras) into a fresh venv under /tmp; its size, largest distributions, torch."""
    with tempfile.TemporaryDirectory(prefix="foundation_venv_", dir="/tmp") as tmp:
        src, venv = Path(tmp) / "src", Path(tmp) / "venv"
        shutil.copytree(tree, src, ignore=shutil.ignore_patterns(".git", ".venv*", "__pycache__", "build",
                                                                 "dist", "*.egg-info"))
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        py = venv / "bin" / "python"
        log(f"venv size: pip install {tree} ...")
        res = subprocess.run([str(py), "-m", "pip", "install", "--no-cache-dir", "-q", str(src)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"pip install {tree} failed:\n{res.stderr[-2000:]}")
        mb = int(subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True,
                                check=True).stdout.split()[0])
        site = next((venv / "lib").glob("python*/site-packages"))
        dists = {}
        for record in site.glob("*.dist-info/RECORD"):
            name = record.parent.name.split("-")[0]
            files = {(site / line.rsplit(",", 2)[0]).resolve() for line in record.read_text().splitlines() if line}
            dists[name] = sum(f.stat().st_size for f in files if f.is_file()) / 2**20
    biggest = sorted(dists.items(), key=lambda kv: -kv[1])[:5]
    return {"mb": mb, "n": len(dists), "biggest": biggest, "torch": "torch" in {d.lower() for d in dists}}


def table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs="+", type=Path, help="source trees (each with onnxbp/ and benchmarks/)")
    ap.add_argument("--venv-size", action="store_true", help="also measure a runtime-only install (minutes)")
    args = ap.parse_args(argv)
    trees = [t.resolve() for t in args.trees]

    lines = {t: module_lines(t) for t in trees}
    log("duplicates ...")
    dups = {t: (duplicate_pairs(t), duplicate_pairs(t / "onnxbp")) for t in trees}
    imports = interleaved(trees, IMPORT_RUNS, IMPORT_CODE, "import time")
    trainer = interleaved(trees, TRAINER_RUNS, TRAINER_CODE, "Trainer build",
                          lambda t: (str(t / "benchmarks" / "bench_train_step.py"),))
    venvs = {t: venv_size(t) for t in trees} if args.venv_size else {}

    def total(t, pkg):
        return sum(n for p, n in lines[t].items() if p.startswith(pkg + "/"))

    def largest(t):
        path, n = max(lines[t].items(), key=lambda kv: kv[1])
        return f"{path} ({n})"

    rows = [
        ["lines, onnxbp/", *(total(t, "onnxbp") for t in trees)],
        ["lines, cli/", *(total(t, "cli") for t in trees)],
        [".py modules (onnxbp/ + cli/)", *(len(lines[t]) for t in trees)],
        ["largest module (lines)", *(largest(t) for t in trees)],
        ["duplicate pairs, whole tree", *(dups[t][0] for t in trees)],
        ["duplicate pairs, onnxbp/", *(dups[t][1] for t in trees)],
        [f"`import onnx`, median of {IMPORT_RUNS} (ms)", *(stat(imports[t], 0, 1e3, ".0f", False) for t in trees)],
        [f"`import onnxbp` after `import onnx`, median of {IMPORT_RUNS} (min-max) (ms)",
         *(stat(imports[t], 1, 1e3, ".0f") for t in trees)],
        [f"Trainer build, ResNet-18, median of {TRAINER_RUNS} (min-max) (s)",
         *(stat(trainer[t], 0, 1.0, ".2f") for t in trees)],
    ]
    if venvs:
        rows += [
            ["runtime venv, `du -sm` (MB)", *(venvs[t]["mb"] for t in trees)],
            ["runtime venv, distributions", *(venvs[t]["n"] for t in trees)],
            ["runtime venv, 5 largest (MB)",
             *(", ".join(f"{n} {mb:.0f}" for n, mb in venvs[t]["biggest"]) for t in trees)],
            ["runtime venv pulls torch", *("yes" if venvs[t]["torch"] else "no" for t in trees)],
        ]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")
    print(table(["metric", *map(str, trees)], rows))
    modules = sorted(set().union(*lines.values()))
    print()
    print(table(["module (lines)", *map(str, trees)],
                [[m, *(lines[t].get(m, "-") for t in trees)] for m in modules]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
