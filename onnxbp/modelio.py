"""Loading and saving models: clear errors, atomic writes, inputs never modified."""

from __future__ import annotations

import logging
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Optional, Union

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelLoadError, OutputPathError, UnsupportedOpError

log = logging.getLogger(__name__)

ModelLike = Union[onnx.ModelProto, str, os.PathLike]


def load_model(model: ModelLike, *, check: bool = True) -> onnx.ModelProto:
    """Return a private copy of ``model`` (a ModelProto or a path), checked."""
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        where = "the model"
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        where = f"'{path}'"
        if not path.exists():
            raise ModelLoadError(f"{where}: no such file")
        if path.is_dir():
            raise ModelLoadError(f"{where} is a directory, not an ONNX file")
        if not path.is_file():
            raise ModelLoadError(f"{where} is a {_file_kind(path)}, not a regular file; give an .onnx file")
        data = path.read_bytes()
        if not data:
            raise ModelLoadError(f"{where} is empty, not an ONNX model")
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(data)
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(
                f"{where} is not an ONNX model or is truncated ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'parse failed'})"
            ) from None
        if not proto.HasField("graph") or not proto.opset_import:
            raise ModelLoadError(f"{where} is not an ONNX model (no graph or no opset_import)")
        if any(t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
               for t in proto.graph.initializer):
            try:
                onnx.load_external_data_for_model(proto, str(path.parent))
            except Exception as exc:  # noqa: BLE001 - any failure is a load failure
                raise ModelLoadError(f"{where}: cannot load external data ({exc})") from None
    else:
        raise ModelLoadError(
            f"expected an onnx.ModelProto or a path, got {type(model).__name__}"
        )
    if check:
        try:
            check_stripped(proto)
            onnx.checker.check_model(skeleton(proto))
        except Exception as exc:  # noqa: BLE001 - ValidationError or InferenceError
            raise ModelLoadError(f"{where} fails the ONNX checker: {first_line(exc)}") from None
    return proto


# ------------------------------------------------------------------ skeletons
# onnx's checker and shape inference take a serialized copy of the whole model,
# weights included: for ResNet-50 (100 MB) four such copies were 0.54 s of a
# 1.0 s gradient build, and a model over 2 GB cannot be serialized at all.
# Neither reads the values of large float tensors, so they run on a skeleton:
# the same model with each such initializer turned into a graph input of the
# same type and shape.  check_stripped does for those tensors what the
# checker's tensor check would have (one value field, enough data).
_SKELETON_MIN_ELEMENTS = 1024
_SKELETON_TYPES = {onnx.TensorProto.FLOAT: ("float_data", 4), onnx.TensorProto.DOUBLE: ("double_data", 8),
                   onnx.TensorProto.FLOAT16: ("int32_data", 2), onnx.TensorProto.BFLOAT16: ("int32_data", 2)}
_VALUE_FIELDS = ("raw_data", "float_data", "double_data", "int32_data", "int64_data", "uint64_data",
                 "string_data")


def _stripped(t: onnx.TensorProto) -> bool:
    if t.data_type not in _SKELETON_TYPES or t.data_location == onnx.TensorProto.EXTERNAL:
        return False
    n = 1
    for d in t.dims:
        n *= d
    return n >= _SKELETON_MIN_ELEMENTS


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without the data of its large float initializers (each becomes a graph input of the
    same type and shape), for onnx's checker and shape inference.  ``model`` is not modified; the
    skeleton shares nothing with it."""
    graph = model.graph
    big = [t for t in graph.initializer if _stripped(t)]
    if not big:
        return model
    sk = onnx.ModelProto()
    _copy_fields(model, sk, skip="graph")
    _copy_fields(graph, sk.graph, skip="initializer")
    sk.graph.initializer.extend(t for t in graph.initializer if not _stripped(t))
    declared = {i.name for i in graph.input}
    sk.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                          for t in big if t.name not in declared)
    return sk


def _copy_fields(src, dst, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def check_stripped(model: onnx.ModelProto) -> None:
    """The checker's tensor check for the initializers :func:`skeleton` takes out: exactly one value
    field, holding at least the elements the shape declares.  Raises ``ValueError``."""
    for t in model.graph.initializer:
        if not _stripped(t):
            continue
        present = [f for f in _VALUE_FIELDS if (t.HasField(f) if f == "raw_data" else len(getattr(t, f)))]
        field, size = _SKELETON_TYPES[t.data_type]
        n = 1
        for d in t.dims:
            n *= d
        if len(present) != 1 or present[0] not in ("raw_data", field):
            raise ValueError(f"TensorProto (tensor name: {t.name}) should hold its values in exactly one of "
                             f"raw_data and {field}; it has {', '.join(present) or 'none'}")
        if present[0] == "raw_data" and len(t.raw_data) < n * size:
            raise ValueError(f"TensorProto (tensor name: {t.name}) raw_data size ({len(t.raw_data)} bytes) is "
                             f"too small for the declared shape and type ({n * size} bytes required).")
        if present[0] == field and len(getattr(t, field)) < n:
            raise ValueError(f"TensorProto (tensor name: {t.name}) {field} size ({len(getattr(t, field))}) is "
                             f"too small for the declared shape ({n} values required).")


def first_line(exc: BaseException, default: str = "validation failed") -> str:
    """The first line of an exception's message (onnx's checker errors run to many lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else default


def check_full(model: onnx.ModelProto, error: type, what: str) -> None:
    """``onnx.checker.check_model(full_check=True)``; raise ``error("<what>: <first line>")``."""
    try:
        check_stripped(model)
        onnx.checker.check_model(skeleton(model), full_check=True)
    except Exception as exc:  # noqa: BLE001 - ValidationError or InferenceError
        raise error(f"{what}: {first_line(exc)}") from None


def check_loadable(model: onnx.ModelProto, where: str = "the model") -> None:
    """What onnxruntime refuses although onnx's checker passes, found before any work is done.

    Duplicate node names, and a default-domain opset newer than this onnx
    knows (onnxruntime supports at most that).  :func:`check_onnxruntime_loads`
    asks onnxruntime itself.
    """
    from .types import default_opset

    seen: dict = {}
    for node in model.graph.node:
        if node.name:
            seen[node.name] = seen.get(node.name, 0) + 1
    dup = next((name for name, count in seen.items() if count > 1), None)
    if dup is not None:
        raise ModelLoadError(f"{where}: {seen[dup]} nodes are named {dup!r}; onnxruntime refuses duplicate node "
                             f"names: give each node its own name (or none)")
    newest = onnx.defs.onnx_opset_version()
    if default_opset(model) > newest:
        raise ModelLoadError(f"{where}: default opset {default_opset(model)} is newer than any this onnx knows "
                             f"(1..{newest}); onnxruntime cannot run it either")


def check_onnxruntime_loads(model: onnx.ModelProto, where: str = "the model") -> None:
    """Raise :class:`ModelLoadError` naming onnxruntime's reason when its CPU provider cannot load ``model``
    (an op version it has no kernel for, such as Gemm before opset 7)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    try:
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        text = " ".join(first_line(exc).split())
        text = text.split("FAIL : ", 1)[-1] if "FAIL : " in text else text
        text = re.sub(r"^/\S+:\d+ [^)]*\)\s*", "", text)  # onnxruntime's C++ source location and function
        raise ModelLoadError(f"{where}: onnxruntime {ort.__version__} cannot load it: {text[:300]}") from None


def convert_opset(model: onnx.ModelProto, target: int, why: str, error: type = UnsupportedOpError) -> onnx.ModelProto:
    """The model converted to default opset ``target`` by onnx's version converter, checked.

    ``why`` says what needs the opset (for the message when conversion fails).
    """
    from .types import default_opset

    try:
        converted = onnx.version_converter.convert_version(model, target)
        # The converter keeps the IR version; the new opset may need a newer one.
        converted.ir_version = max(converted.ir_version,
                                   onnx.helper.find_min_ir_version_for(list(converted.opset_import)))
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise error(f"{why} needs opset {target}, and onnx's version converter could not convert the model "
                    f"from opset {default_opset(model)}: {first_line(exc, type(exc).__name__)}") from None
    return converted


def save_model_atomic(model: onnx.ModelProto, path: Union[str, os.PathLike],
                      *, source: Union[str, os.PathLike, None] = None) -> Path:
    """Write ``model`` to ``path`` via a temporary file and a rename.

    Refuses to overwrite ``source`` (the input model).  Nothing is left behind
    on failure.
    """
    out = Path(path)
    if source is not None and isinstance(source, (str, os.PathLike)):
        src = Path(source)
        if src.exists() and (out.resolve() == src.resolve()):
            raise OutputPathError(
                f"output path '{out}' is the input model; choose another path (the input is never modified)"
            )
    if out.is_dir():
        raise OutputPathError(f"output path '{out}' is a directory; give a file name ending in .onnx")
    target = writable_target(out)
    if not target.parent.exists():
        raise OutputPathError(f"output directory '{target.parent}' does not exist")
    data = model.SerializeToString()
    write_bytes_atomic(out, data)
    log.info("wrote %s (%d bytes)", out, len(data))
    return out


def _file_kind(path: Path) -> str:
    mode = path.stat().st_mode
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return kind
    return "special file"


def writable_target(path: Union[str, os.PathLike]) -> Path:
    """The file an atomic write to ``path`` replaces: the path, or a symlink's target (written through).

    Raises :class:`OutputPathError` when that is an existing non-regular file
    (a device, FIFO or socket): onnxbp never replaces one with a regular file.
    """
    out = Path(path)
    target = out.resolve() if out.is_symlink() else out
    if target.exists() and not target.is_file():
        raise OutputPathError(f"output path '{out}' is a {_file_kind(target)}, not a regular file; onnxbp writes "
                              f"files atomically and never replaces a special file: give a file path")
    return target


def write_bytes_atomic(path: Union[str, os.PathLike], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    Readers see the old file or the new one, never a half-written one; on any
    failure the temporary file is removed and ``path`` is untouched.  A
    symlink is written through (its target is replaced, the link stays); an
    existing special file is refused (:func:`writable_target`).  Temporaries
    left by a writer that was killed (its process is gone) are removed.
    """
    out = writable_target(path)
    _remove_stale_temporaries(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved model gets the usual mode
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return out


def _remove_stale_temporaries(out: Path) -> None:
    """Delete ``.<name>.<pid>.*.tmp`` beside ``out`` whose writing process no longer exists."""
    prefix = f".{out.name}."
    try:
        entries = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return
    for entry in entries:
        rest = entry.name[len(prefix):] if entry.name.startswith(prefix) and entry.name.endswith(".tmp") else ""
        pid = rest.split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                entry.unlink()
                log.info("removed %s, left by a writer that was stopped", entry)
            except OSError:
                pass
        except OSError:  # the process exists (no permission to signal it): not stale
            continue


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cpu_session(model: onnx.ModelProto, threads: Optional[int] = 1, *, mem_pattern: bool = True):
    """An onnxruntime CPU session: ``threads`` intra-op threads (None: onnxruntime's default), no
    busy-waiting, quiet.  ``mem_pattern=False`` turns off onnxruntime's one-block memory plan
    (training steps: see :class:`onnxbp.training.Trainer`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_mem_pattern = mem_pattern
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
