"""Outputs never replace special files, symlinks are written through, stale temporaries go, FIFOs are not read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import onnxbp
from onnxbp.modelio import save_model_atomic, write_bytes_atomic

MLP = str(Path(__file__).resolve().parent.parent / "models" / "mlp.onnx")


@pytest.fixture
def model():
    return onnx.load(MLP)


def test_fifo_and_device_outputs_are_refused(tmp_path, model):
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "FIFO"), (Path("/dev/null"), "character device")):
        with pytest.raises(onnxbp.OutputPathError) as info:
            save_model_atomic(model, path)
        assert str(info.value) == (f"output path '{path}' is a {kind}, not a regular file; onnxbp writes files "
                                   f"atomically and never replaces a special file: give a file path")
    assert fifo.is_fifo() and Path("/dev/null").is_char_device()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.onnx"]  # no temporary left


def test_symlink_is_written_through(tmp_path, model):
    target = tmp_path / "real.onnx"
    target.write_bytes(b"old")
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    save_model_atomic(model, link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert onnx.load(str(target)).SerializeToString() == model.SerializeToString()
    dangling = tmp_path / "dangling.onnx"
    dangling.symlink_to(tmp_path / "new.onnx")
    save_model_atomic(model, dangling)
    assert (tmp_path / "new.onnx").is_file() and dangling.is_symlink()


def test_fifo_input_is_refused_without_reading(tmp_path):
    fifo = tmp_path / "in.onnx"
    os.mkfifo(fifo)
    with pytest.raises(onnxbp.ModelLoadError, match=r"is a FIFO, not a regular file; give an \.onnx file"):
        onnxbp.gradient(str(fifo))


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    out = tmp_path / "ckpt.npz"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".ckpt.npz.{int(dead.stdout)}.abc123.tmp"
    live = tmp_path / f".ckpt.npz.{os.getppid()}.def456.tmp"
    other = tmp_path / ".other.npz.1.x.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    write_bytes_atomic(out, b"data")
    assert out.read_bytes() == b"data"
    assert not stale.exists() and live.exists() and other.exists()


def test_empty_wrt_and_seeds_are_errors(model):
    with pytest.raises(onnxbp.WrtError, match="wrt is empty; name initializers or graph inputs"):
        onnxbp.gradient(model, [])
    with pytest.raises(onnxbp.WrtError, match="seeds is empty"):
        onnxbp.backward(model, seeds=[])
    gm = onnxbp.gradient(model, "fc1.weight")  # one name, not a list of characters
    assert [o.name for o in gm.graph.output][-1] == "fc1.weight_grad"


@pytest.mark.parametrize("extra, text", [
    (["-o", "{model}"], "output path '{model}' is the input model; choose another path"),
    (["--metrics", "{tmp}/missing/m.json"], "--metrics directory '{tmp}/missing' does not exist"),
    (["--plot", "{tmp}/missing/p.png"], "--plot directory '{tmp}/missing' does not exist"),
    (["--checkpoint", "{tmp}/afile"], "--checkpoint '{tmp}/afile' is a file; give a directory"),
    (["-o", "/dev/null"], "output path '/dev/null' is a character device, not a regular file"),
])
def test_train_checks_every_path_before_training(tmp_path, capsys, extra, text):
    from cli.main import main

    model = tmp_path / "lenet.onnx"
    model.write_bytes(Path(MLP).read_bytes())
    (tmp_path / "afile").write_bytes(b"")
    before = model.read_bytes()
    args = [a.format(model=model, tmp=tmp_path) for a in extra]
    assert main(["train", str(model), "--data", "digits", "--epochs", "1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and text.format(model=model, tmp=tmp_path) in err
    assert "training" not in capsys.readouterr().out and model.read_bytes() == before
