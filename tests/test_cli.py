"""The onnxbp command: grad, check, ops; errors as one line, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from onnxbp_cli.main import main

ROOT = Path(__file__).resolve().parent.parent
MLP = str(ROOT / "models" / "mlp.onnx")


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
    proc = subprocess.run([sys.executable, "-m", "onnxbp_cli", "check", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("cmd", [[], ["grad"], ["check"], ["ops"]])
def test_help_for_each_command(cmd):
    with pytest.raises(SystemExit) as exc:
        main(cmd + ["--help"])
    assert exc.value.code == 0
