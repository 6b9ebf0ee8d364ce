"""The onnxbp command: grad, check, ops; errors as one line, no traceback.

The CLI is the package ``cli`` in a checkout and once installed; the
subprocess tests run ``python -m onnxbp`` from this checkout (PYTHONPATH=root,
another working directory), so they pass without ``pip install``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import onnxbp
from cli.main import main

ROOT = Path(__file__).resolve().parent.parent
MLP = str(ROOT / "models" / "mlp.onnx")


def _run(args, cwd, **kw):
    """``python ARGS`` against this checkout (not an installed copy), from ``cwd``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, **kw)


def test_grad_writes_a_model(tmp_path, capsys):
    out = tmp_path / "g.onnx"
    assert main(["grad", MLP, "-o", str(out), "--wrt", "fc1.weight", "x"]) == 0
    gm = onnx.load(str(out))
    assert [o.name for o in gm.graph.output] == ["logits", "fc1.weight_grad", "x_grad"]
    assert "wrote" in capsys.readouterr().out


def test_check_passes_on_bundled_mlp(capsys):
    assert main(["check", MLP]) == 0
    out = capsys.readouterr().out
    assert "passed" in out and "fc2.bias" in out


def test_ops_lists_rules(capsys):
    assert main(["ops"]) == 0
    out = capsys.readouterr().out
    assert "Gemm" in out and "MatMul" in out and "no_gradient" in out


def test_errors_are_one_line_on_stderr(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    assert main(["grad", str(bad), "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnxbp: error:") and "bad.onnx" in err and "\n" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_output_equal_to_input_is_refused(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes(Path(MLP).read_bytes())
    before = src.read_bytes()
    assert main(["grad", str(src), "-o", str(src)]) == 2
    assert "is the input model" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_unknown_wrt_exit_code(capsys):
    assert main(["check", MLP, "--wrt", "nope"]) == 2
    assert "'nope' is not an initializer or graph input" in capsys.readouterr().err


def test_subprocess_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    proc = _run(["-m", "onnxbp", "check", str(bad)], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("cmd", [[], ["grad"], ["check"], ["ops"], ["train"]])
def test_help_for_each_command(cmd):
    with pytest.raises(SystemExit) as exc:
        main(cmd + ["--help"])
    assert exc.value.code == 0


def test_missing_output_directory_is_an_error(tmp_path, capsys):
    """``grad -o`` never creates directories: a missing one is a one-line error and nothing is written."""
    assert main(["grad", MLP, "-o", str(tmp_path / "no" / "g.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxbp: error:") and "output directory" in err and "does not exist" in err
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version_flag(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        main([flag])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"onnxbp {onnxbp.__version__}" == "onnxbp 0.1.0"


def test_python_m_onnxbp_from_a_checkout(tmp_path):
    """``python -m onnxbp`` hands over to the CLI: -V, --help and a real command, with no install."""
    proc = _run(["-m", "onnxbp", "-V"], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"onnxbp {onnxbp.__version__}", proc.stderr
    proc = _run(["-m", "onnxbp", "--help"], cwd=tmp_path)
    assert proc.returncode == 0 and "usage: onnxbp" in proc.stdout and "grad" in proc.stdout, proc.stderr
    proc = _run(["-m", "onnxbp", "grad", MLP, "-o", "g.onnx"], cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "g.onnx").exists(), proc.stderr
    proc = _run(["-c", "import onnxbp, cli; print(onnxbp.__file__); print(cli.__file__)"], cwd=tmp_path)
    assert [Path(p).parent.parent for p in proc.stdout.split()] == [ROOT, ROOT], proc.stdout + proc.stderr


def test_library_never_imports_the_cli_nor_optional_packages(tmp_path):
    """The CLI depends on the library, never the reverse; nothing imports torch, sklearn, matplotlib or mpi4py
    at import time (matplotlib is loaded by ``train --plot`` only)."""
    code = ("import sys, onnxbp, onnxbp.training, onnxbp.__main__\n"
            "lib = sorted(m for m in sys.modules if m.split('.')[0] == 'cli')\n"
            "import cli.main, cli.train\n"
            "cli.main.build_parser()\n"
            "opt = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'sklearn', 'matplotlib', 'scipy', "
            "'onnx_graphsurgeon', 'mpi4py'})\n"
            "print(lib, opt)")
    proc = _run(["-c", code], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[] []"


def test_version_is_written_once():
    """pyproject takes the version from onnxbp.__version__ (no second copy to drift)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "onnxbp.__version__"}
    assert project["project"]["scripts"]["onnxbp"] == "cli.main:main"


def test_installed_command_of_this_environment(tmp_path):
    """The ``onnxbp`` console script next to this interpreter (when this environment has onnxbp installed)."""
    exe = Path(sys.executable).parent / ("onnxbp.exe" if os.name == "nt" else "onnxbp")
    if not exe.exists():
        pytest.skip("onnxbp is not installed in this environment (pip install .)")
    proc = subprocess.run([str(exe), "-V"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"onnxbp {onnxbp.__version__}", proc.stderr


def test_wheel_holds_the_cli_the_data_and_only_runtime_dependencies(tmp_path):
    """The wheel installs the same packages as the checkout (onnxbp, cli), the digits data with its
    license, and depends on exactly onnx, onnxruntime, numpy, protobuf."""
    import shutil
    import zipfile
    from importlib.metadata import PackageNotFoundError, version

    def _version(dist):
        try:
            return tuple(int(p) for p in version(dist).split(".")[:2])
        except (PackageNotFoundError, ValueError):
            return None

    # Built offline with this environment's setuptools: >= 64 (pyproject's build requirement), and
    # bdist_wheel comes with setuptools >= 70.1 or from the `wheel` package.
    tools = _version("setuptools")
    if tools is None or tools < (64, 0) or (tools < (70, 1) and _version("wheel") is None):
        pytest.skip("needs setuptools >= 70.1 (or >= 64 with wheel) to build the wheel offline")

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("onnxbp", "cli"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("onnxbp-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(f"onnxbp-{onnxbp.__version__}.dist-info/METADATA").decode()
        entry = zf.read(f"onnxbp-{onnxbp.__version__}.dist-info/entry_points.txt").decode()
    assert {n.split("/")[0] for n in names} == {"onnxbp", "cli", f"onnxbp-{onnxbp.__version__}.dist-info"}
    assert {"onnxbp/__main__.py", "onnxbp/training/digits.npz", "onnxbp/training/digits.npz.license",
            "cli/main.py", "cli/train.py"} <= names
    runtime = sorted(line.split(":", 1)[1].strip() for line in meta.splitlines()
                     if line.startswith("Requires-Dist:") and "extra ==" not in line)
    assert [r.split(">")[0].split("=")[0] for r in runtime] == ["numpy", "onnx", "onnxruntime", "protobuf"]
    assert "onnxbp = cli.main:main" in entry


@pytest.mark.parametrize("target", ["onnxruntime", "portable"])
def test_train_target_and_step_model(tmp_path, capsys, target):
    """`onnxbp train --target T --step-model PATH` writes the step graph it trains with: under portable the
    loss is plain ops and no Conv takes a computed (runtime-shaped) kernel."""
    lenet = str(ROOT / "models" / "lenet.onnx")
    step, out = tmp_path / "step.onnx", tmp_path / "t.onnx"
    assert main(["train", lenet, "--data", "digits", "--epochs", "1", "--no-progress", "--target", target,
                 "--step-model", str(step), "-o", str(out)]) == 0
    assert f"wrote the training-step model to {step}" in capsys.readouterr().out
    m = onnx.load(str(step))
    onnx.checker.check_model(m, full_check=True)
    ops = [n.op_type for n in m.graph.node]
    assert ("SoftmaxCrossEntropyLoss" in ops) == (target == "onnxruntime")
    inferred = onnx.shape_inference.infer_shapes(m)
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param
                     for d in v.type.tensor_type.shape.dim]
            for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    runtime_kernels = [n.input[1] for n in m.graph.node
                       if n.op_type == "Conv" and not all(isinstance(d, int) and d > 0 for d in dims[n.input[1]])]
    assert (not runtime_kernels) == (target == "portable"), runtime_kernels
    assert out.exists()


def test_train_step_model_path_is_checked_first(tmp_path, capsys):
    lenet = str(ROOT / "models" / "lenet.onnx")
    bad = tmp_path / "missing" / "step.onnx"
    assert main(["train", lenet, "--data", "digits", "--epochs", "1", "--no-progress", "--step-model", str(bad),
                 "-o", str(tmp_path / "t.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"onnxbp: error: --step-model directory '{bad.parent}' does not exist"
    assert not (tmp_path / "t.onnx").exists()
