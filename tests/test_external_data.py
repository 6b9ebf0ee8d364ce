"""Models with external data and models over protobuf's 2 GB limit (issue 13), at small sizes.

The 2 GB limit is ``onnxbp.modelio.MAX_INLINE_BYTES``; tests lower it to take the >2 GB paths
(external data on write, sessions from a temporary folder) with kilobyte models.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxbp
from onnxbp import modelio
from onnxbp.errors import ModelLoadError, OutputPathError

MLP = Path(__file__).resolve().parent.parent / "models" / "mlp.onnx"


def _external_copy(d: Path, name: str = "ext.onnx", location: str = "weights.bin") -> Path:
    """models/mlp.onnx saved with every initializer in one external data file."""
    m = onnx.load(str(MLP))
    onnx.save_model(m, str(d / name), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return d / name


def _feeds(session: ort.InferenceSession, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d if isinstance(d, int) else 3 for d in i.shape]).astype(np.float32)
            for i in session.get_inputs()}


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run_both(a: Path, b: Path):
    sa, sb = _session(a), _session(b)
    feeds = _feeds(sa)
    assert sorted(feeds) == sorted(i.name for i in sb.get_inputs())
    names = [o.name for o in sa.get_outputs()]
    return names, sa.run(names, feeds), sb.run(names, feeds)


def _assert_external(path: Path) -> None:
    """``path`` has its large initializers in ``<path>.data``, passes the full check and runs."""
    data = modelio.data_file_for(path)
    assert data.is_file() and data.stat().st_size > 0
    shell = onnx.load(str(path), load_external_data=False)
    refs = {e.value for t in shell.graph.initializer for e in t.external_data if e.key == "location"}
    assert refs == {data.name}
    onnx.checker.check_model(str(path), full_check=True)


# ----------------------------------------------------------------------------- loading
def test_path_with_external_data_loads_and_differentiates(tmp_path):
    ext = _external_copy(tmp_path)
    loaded = onnxbp.load_model(ext)
    inline = onnxbp.load_model(MLP)
    assert not modelio._external_tensors(loaded)
    for a, b in zip(loaded.graph.initializer, inline.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    gm = onnxbp.gradient(ext)
    assert [o.name for o in gm.graph.output][-4:] == [t.name + "_grad" for t in inline.graph.initializer]


def test_proto_with_external_references_needs_base_dir(tmp_path):
    ext = _external_copy(tmp_path)
    refs = onnx.load(str(ext), load_external_data=False)
    with pytest.raises(ModelLoadError, match=r"tensor 'fc1.weight' keeps its data in the external file "
                                             r"'weights.bin'; pass base_dir="):
        onnxbp.gradient(refs)
    gm = onnxbp.gradient(refs, base_dir=str(tmp_path))
    reference = onnxbp.gradient(str(MLP))
    assert [o.name for o in gm.graph.output] == [o.name for o in reference.graph.output]
    # the caller's proto is not modified: it still refers to the file
    assert all(t.data_location == TensorProto.EXTERNAL for t in refs.graph.initializer)
    out, ref_out = tmp_path / "g.onnx", tmp_path / "ref.onnx"
    onnxbp.save_model_atomic(gm, out)
    onnxbp.save_model_atomic(reference, ref_out)
    names, a, b = _run_both(out, ref_out)
    for n, x, y in zip(names, a, b):
        np.testing.assert_array_equal(x, y, err_msg=n)


def test_missing_external_data_file_names_the_tensor_and_file(tmp_path):
    ext = _external_copy(tmp_path)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ModelLoadError, match=r"cannot load external data of tensor 'fc1.weight' from 'weights.bin'"):
        onnxbp.load_model(ext)


def test_a_file_over_the_limit_is_refused_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(modelio, "MAX_INLINE_BYTES", 1000)
    with pytest.raises(ModelLoadError, match=r"over protobuf's 2 GB limit .* save_as_external_data=True"):
        onnxbp.load_model(MLP)


# ----------------------------------------------------------------------------- writing
def test_cli_grad_external_data_flag_round_trip(tmp_path, capsys):
    from cli.main import main

    ext_out, inline_out = tmp_path / "g_ext.onnx", tmp_path / "g.onnx"
    assert main(["grad", str(MLP), "-o", str(ext_out), "--external-data"]) == 0
    assert "; weights in g_ext.onnx.data beside it" in capsys.readouterr().out
    assert main(["grad", str(MLP), "-o", str(inline_out)]) == 0
    assert "weights in" not in capsys.readouterr().out
    assert not modelio.data_file_for(inline_out).exists()  # inline below the limit by default
    _assert_external(ext_out)
    assert ext_out.stat().st_size < inline_out.stat().st_size / 2
    reloaded = onnxbp.load_model(ext_out)
    assert onnxbp.metadata.gradient_names(reloaded) == onnxbp.metadata.gradient_names(onnxbp.load_model(inline_out))
    names, a, b = _run_both(ext_out, inline_out)
    assert any(n.endswith("_grad") for n in names)
    for n, x, y in zip(names, a, b):
        np.testing.assert_array_equal(x, y, err_msg=n)


def test_external_input_keeps_external_output_and_its_data_file(tmp_path):
    from cli.main import main

    ext = _external_copy(tmp_path)
    data = tmp_path / "weights.bin"
    before, mtime = data.read_bytes(), data.stat().st_mtime_ns
    out = tmp_path / "out" / "g.onnx"
    out.parent.mkdir()
    assert main(["grad", str(ext), "-o", str(out)]) == 0
    _assert_external(out)
    assert data.read_bytes() == before and data.stat().st_mtime_ns == mtime
    # the gradient of the gradient model, from the external-data output, again external
    out2 = tmp_path / "out" / "g2.onnx"
    assert main(["grad", str(out), "-o", str(out2)]) == 0
    _assert_external(out2)
    sess = _session(out2)
    res = sess.run(None, _feeds(sess))
    assert all(np.isfinite(r).all() for r in res)


def test_output_data_file_may_not_be_the_inputs(tmp_path, capsys):
    from cli.main import main

    ext = _external_copy(tmp_path, "a.onnx", location="b.onnx.data")
    data = tmp_path / "b.onnx.data"
    before = data.read_bytes()
    assert main(["grad", str(ext), "-o", str(tmp_path / "b.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "a data file of the input model; choose another output path" in err
    assert data.read_bytes() == before and not (tmp_path / "b.onnx").exists()


def test_over_the_limit_is_written_with_external_data(tmp_path, monkeypatch):
    gm = onnxbp.gradient(str(MLP))
    monkeypatch.setattr(modelio, "MAX_INLINE_BYTES", 4000)
    with pytest.raises(OutputPathError, match=r"over protobuf's 2 GB limit; write it with external data"):
        onnxbp.save_model_atomic(gm, tmp_path / "one.onnx", external_data=False)
    assert not any(tmp_path.iterdir())
    out = onnxbp.save_model_atomic(gm, tmp_path / "g.onnx")
    _assert_external(out)
    monkeypatch.undo()
    ref = onnxbp.save_model_atomic(gm, tmp_path / "ref.onnx")
    names, a, b = _run_both(out, ref)
    for n, x, y in zip(names, a, b):
        np.testing.assert_array_equal(x, y, err_msg=n)


def test_streamed_one_file_write_parses_to_the_same_model(tmp_path, monkeypatch):
    gm = onnxbp.gradient(str(MLP))
    monkeypatch.setattr(modelio, "STREAM_MIN_BYTES", 0)
    out = onnxbp.save_model_atomic(gm, tmp_path / "g.onnx")
    assert not modelio.data_file_for(out).exists()
    assert onnx.load(str(out)) == gm
    onnx.checker.check_model(str(out), full_check=True)


def test_train_exports_with_external_data(tmp_path):
    from cli.main import main

    out = tmp_path / "trained.onnx"
    assert main(["train", str(MLP), "--data", "digits", "--epochs", "1", "--no-progress", "-o", str(out),
                 "--external-data"]) == 0
    _assert_external(out)
    sess = _session(out)
    assert sess.run(None, _feeds(sess))[0].shape == (3, 10)
    # from an external-data input, the trained model keeps external data by default
    ext = _external_copy(tmp_path)
    out2 = tmp_path / "trained2.onnx"
    assert main(["train", str(ext), "--data", "digits", "--epochs", "1", "--no-progress", "-o", str(out2)]) == 0
    _assert_external(out2)


# ----------------------------------------------------------------------------- atomicity
def _failing_replace(monkeypatch, fail_on: str):
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == fail_on:
            raise OSError(28, "No space left on device (injected)")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(modelio.os, "replace", replace)


@pytest.mark.parametrize("existing", [False, True])
def test_failed_model_rename_leaves_neither_file(tmp_path, monkeypatch, existing):
    gm = onnxbp.gradient(str(MLP))
    out = tmp_path / "g.onnx"
    if existing:
        out.write_bytes(b"old model")
        modelio.data_file_for(out).write_bytes(b"old data")
    _failing_replace(monkeypatch, "g.onnx")
    with pytest.raises(OSError, match="injected"):
        onnxbp.save_model_atomic(gm, out, external_data=True)
    left = sorted(p.name for p in tmp_path.iterdir())
    if existing:
        assert left == ["g.onnx", "g.onnx.data"]
        assert out.read_bytes() == b"old model" and modelio.data_file_for(out).read_bytes() == b"old data"
    else:
        assert left == []


def test_failure_while_writing_data_leaves_nothing(tmp_path, monkeypatch):
    gm = onnxbp.gradient(str(MLP))
    real = modelio._externalized

    def half(model, fh, location):
        fh.write(b"partial")
        raise MemoryError("injected")

    monkeypatch.setattr(modelio, "_externalized", half)
    with pytest.raises(MemoryError):
        onnxbp.save_model_atomic(gm, tmp_path / "g.onnx", external_data=True)
    assert not any(tmp_path.iterdir())
    monkeypatch.setattr(modelio, "_externalized", real)
    _assert_external(onnxbp.save_model_atomic(gm, tmp_path / "g.onnx", external_data=True))


# ----------------------------------------------------------------------------- sessions and the checker
def test_cpu_session_over_the_limit_loads_from_a_folder(tmp_path, monkeypatch, caplog):
    gm = onnxbp.gradient(str(MLP))
    inline = modelio.cpu_session(gm)
    monkeypatch.setattr(modelio, "MAX_INLINE_BYTES", 4000)
    with caplog.at_level("INFO", logger="onnxbp.modelio"):
        big = modelio.cpu_session(gm)
    assert "onnxruntime session from" in caplog.text and "with external data" in caplog.text
    feeds = _feeds(inline)
    for x, y in zip(inline.run(None, feeds), big.run(None, feeds)):  # the temporary folder is gone by now
        np.testing.assert_array_equal(x, y)


def test_gradient_checker_over_the_limit(monkeypatch, caplog):
    model = onnxbp.load_model(MLP)
    monkeypatch.setattr(modelio, "MAX_INLINE_BYTES", 4000)
    with caplog.at_level("INFO", logger="onnxbp.modelio"):
        report = onnxbp.check_gradients(model, seed=0)
    assert "with external data" in caplog.text
    assert report.results and all(r.passed for r in report.results)


def test_opset_conversion_keeps_large_initializers(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 40)).astype(np.float32)  # above the skeleton's 1024 elements
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
         helper.make_node("ReduceSum", ["y"], ["s"], name="sum", axes=[1], keepdims=0)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 48])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [2])], [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)], ir_version=7)
    converted = modelio.convert_opset(m, 13, "the test")
    assert converted.opset_import[0].version == 13
    assert [i.name for i in converted.graph.input] == ["x"]
    np.testing.assert_array_equal(numpy_helper.to_array(converted.graph.initializer[0]), w)
    modelio.check_full(converted, AssertionError, "converted")
    x = rng.standard_normal((2, 48)).astype(np.float32)
    np.testing.assert_allclose(modelio.cpu_session(converted).run(None, {"x": x})[0], (x @ w).sum(1), rtol=1e-5)


def test_gradient_inplace_builds_on_the_given_model():
    model = onnxbp.load_model(MLP)
    gm = onnxbp.gradient(model, inplace=True)
    assert gm is model  # no second copy of the weights
    reference = onnxbp.gradient(str(MLP))
    assert gm == reference


def test_large_tensors_start_on_page_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(modelio, "_ALIGN_MIN_BYTES", 1024)  # the MLP's weights are 8 KiB and 1.3 KiB
    gm = onnxbp.gradient(str(MLP))
    out = onnxbp.save_model_atomic(gm, tmp_path / "g.onnx", external_data=True)
    shell = onnx.load(str(out), load_external_data=False)
    offsets = {t.name: int(next(e.value for e in t.external_data if e.key == "offset"))
               for t in shell.graph.initializer if t.external_data}
    assert set(offsets) == {"fc1.weight", "fc2.weight"} and all(o % 4096 == 0 for o in offsets.values())
    small = {t.name for t in shell.graph.initializer if not t.external_data}
    assert {"fc1.bias", "fc2.bias"} <= small  # under EXTERNAL_MIN_BYTES: inline
    onnx.checker.check_model(str(out), full_check=True)
    reference = modelio.cpu_session(gm)
    feeds = _feeds(reference)
    for x, y in zip(reference.run(None, feeds), _session(out).run(None, feeds)):
        np.testing.assert_array_equal(x, y)
