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


def load_model(model: ModelLike, *, check: bool = True, base_dir: Union[str, os.PathLike, None] = None,
               copy: bool = True) -> onnx.ModelProto:
    """Return a private copy of ``model`` (a ModelProto or a path), repaired (:mod:`onnxbp.repair`), checked.

    External data is loaded into the copy: a path's data files are read from its folder; a ModelProto
    whose tensors still refer to external files (``onnx.load(..., load_external_data=False)``) needs
    ``base_dir``, the folder holding them.  ``copy=False`` (a ModelProto only) works on ``model``
    itself instead of a copy, saving one copy of the weights: it is repaired and its external data
    loaded in place.  The input's data files are only read.
    """
    if isinstance(model, onnx.ModelProto):
        where = "the model"
        if copy:
            proto = onnx.ModelProto()
            proto.CopyFrom(model)
        else:
            proto = model
        if _external_tensors(proto):
            if base_dir is None:
                t = _external_tensors(proto)[0]
                raise ModelLoadError(
                    f"{where}: tensor {t.name!r} keeps its data in the external file "
                    f"{_external_location(t)!r}; pass base_dir= (the folder of the .onnx file and its data "
                    f"files), or give the model's path")
            _load_external(proto, Path(base_dir), f"{where} (base_dir '{base_dir}')")
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        where = f"'{path}'"
        if not path.exists():
            raise ModelLoadError(f"{where}: no such file")
        if path.is_dir():
            raise ModelLoadError(f"{where} is a directory, not an ONNX file")
        if not path.is_file():
            raise ModelLoadError(f"{where} is a {_file_kind(path)}, not a regular file; give an .onnx file")
        size = path.stat().st_size
        if size > MAX_INLINE_BYTES:
            raise ModelLoadError(
                f"{where} is {size} bytes, over protobuf's 2 GB limit for one message: no ONNX reader can parse "
                f"it; save the model with its weights as external data (onnx.save_model(..., "
                f"save_as_external_data=True)) and give that .onnx file")
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
        del data  # the bytes and the parsed model would be two copies of the weights
        if not proto.HasField("graph") or not proto.opset_import:
            raise ModelLoadError(f"{where} is not an ONNX model (no graph or no opset_import)")
        if base_dir is not None and Path(base_dir).resolve() != path.resolve().parent:
            raise ModelLoadError(f"{where}: base_dir is for a ModelProto; a path's external data is read from "
                                 f"its own folder ('{path.resolve().parent}')")
        files = _load_external(proto, path.parent, where) if _external_tensors(proto) else []
        st = path.stat()
        _DATA_FILES[str(path.resolve())] = (st.st_mtime_ns, st.st_size, files)
    else:
        raise ModelLoadError(
            f"expected an onnx.ModelProto or a path, got {type(model).__name__}"
        )
    from .repair import repair

    repair(proto, where)  # a private copy: missing output types, ceil_mode pool sizes (onnxbp/repair.py)
    if check:
        try:
            check_stripped(proto)
            onnx.checker.check_model(skeleton(proto))
        except Exception as exc:  # noqa: BLE001 - ValidationError or InferenceError
            raise ModelLoadError(f"{where} fails the ONNX checker: {first_line(exc)}") from None
    return proto


# -------------------------------------------------------------- external data
# protobuf refuses to serialize or parse a message over 2 GB, so a larger model keeps its weights in
# a data file beside the .onnx (ONNX's external data).  onnxbp reads such models from their folder
# (or a ModelProto with base_dir), holds the weights in memory while it builds, and writes its
# outputs with external data when they would exceed the limit, when the input had external data, or
# when asked (--external-data).  MAX_INLINE_BYTES is a module attribute so tests can lower it.
MAX_INLINE_BYTES = 2**31 - 1  # protobuf's limit on one serialized message
STREAM_MIN_BYTES = 64 * 2**20  # one-file models this large are written one initializer at a time
SESSION_FILE_MIN_BYTES = 256 * 2**20  # cpu_session loads models this large from a file with external data
EXTERNAL_MIN_BYTES = 1024  # initializers at least this large go to the data file (onnx's default)
_ALIGN_MIN_BYTES, _ALIGN = 2**20, 4096  # large tensors start on a page boundary (onnxruntime can map them)
_DATA_FILES: dict = {}  # resolved model path -> (mtime_ns, size, [resolved data files]) of what load_model read


def _external_location(t: onnx.TensorProto) -> str:
    return next((e.value for e in t.external_data if e.key == "location"), "")


def _external_tensors(model: onnx.ModelProto) -> list:
    """The tensors of ``model`` (initializers and attributes, subgraphs included) whose data is external."""
    from onnx.external_data_helper import _get_all_tensors

    return [t for t in _get_all_tensors(model)
            if t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL]


def _load_external(proto: onnx.ModelProto, base_dir: Path, where: str) -> list:
    """Read every external tensor of ``proto`` from ``base_dir`` into the proto; the files read."""
    from onnx.external_data_helper import load_external_data_for_tensor

    files: list = []
    tensors = _external_tensors(proto)
    for t in tensors:
        location = _external_location(t)
        try:
            load_external_data_for_tensor(t, str(base_dir))
        except Exception as exc:  # noqa: BLE001 - any failure is a load failure
            raise ModelLoadError(f"{where}: cannot load external data of tensor {t.name!r} from {location!r} "
                                 f"({first_line(exc, type(exc).__name__)})") from None
        f = str((base_dir / location).resolve())
        if f not in files:
            files.append(f)
    log.info("%s: loaded %d tensors from external data (%s)", where, len(tensors), ", ".join(files))
    return files


def source_data_files(source: Union[ModelLike, None]) -> list:
    """The external data files (resolved paths) of the model at ``source``, as :func:`load_model` read them.

    A path load_model has not read, or that changed since, is parsed again without its data, when it is
    below STREAM_MIN_BYTES (a larger file is mostly inline weights: parsing it again would hold them
    twice more; it is taken to have no data files)."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_file():
        return []
    path = Path(source).resolve()
    st = path.stat()
    known = _DATA_FILES.get(str(path))
    if known is not None and known[:2] == (st.st_mtime_ns, st.st_size):
        return list(known[2])
    if st.st_size >= STREAM_MIN_BYTES:
        log.debug("%s was not read by load_model and is %d bytes: not parsed again for its data files", path,
                  st.st_size)
        return []
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model we can read: it has no data files we know of
        return []
    return sorted({str((path.parent / _external_location(t)).resolve()) for t in _external_tensors(proto)})


def data_file_for(path: Union[str, os.PathLike]) -> Path:
    """Where onnxbp writes the external data of the model at ``path``: ``<path>.data`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def serialized_size(model: onnx.ModelProto) -> int:
    """About the bytes ``model`` serializes to (the sum of its parts; it works where the whole is over 2 GB
    and protobuf cannot measure it)."""
    g = model.graph
    parts = (g.initializer, g.sparse_initializer, g.node, g.input, g.output, g.value_info, model.functions,
             model.metadata_props)
    return sum(x.ByteSize() for part in parts for x in part) + 4096


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is over protobuf's 2 GB limit, so it can only be written with external data."""
    return serialized_size(model) > MAX_INLINE_BYTES


def _tensor_bytes(t: onnx.TensorProto) -> Optional[bytes]:
    """The little-endian raw bytes of an initializer that can go to a data file (None: keep it inline)."""
    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED) or t.data_location == onnx.TensorProto.EXTERNAL:
        return None
    if t.HasField("raw_data"):
        return t.raw_data
    if t.ByteSize() < EXTERNAL_MIN_BYTES:
        return None
    from onnx import numpy_helper

    return numpy_helper.to_array(t).tobytes()


def _externalized(model: onnx.ModelProto, data_fh, location: str) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers of at least EXTERNAL_MIN_BYTES refer to ``location``; their
    bytes are written to ``data_fh`` one tensor at a time (the weights are never held twice)."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    offset = 0
    for t in model.graph.initializer:
        data = _tensor_bytes(t)
        if data is None or len(data) < EXTERNAL_MIN_BYTES:
            out.graph.initializer.append(t)
            continue
        if len(data) >= _ALIGN_MIN_BYTES and offset % _ALIGN:
            data_fh.write(b"\0" * (_ALIGN - offset % _ALIGN))
            offset += _ALIGN - offset % _ALIGN
        data_fh.write(data)
        ref = out.graph.initializer.add()
        ref.name, ref.data_type, ref.data_location = t.name, t.data_type, onnx.TensorProto.EXTERNAL
        ref.dims.extend(t.dims)
        if t.doc_string:
            ref.doc_string = t.doc_string
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
            entry = ref.external_data.add()
            entry.key, entry.value = key, value
        offset += len(data)
        del data
    return out


def write_with_external_data(model: onnx.ModelProto, path: Union[str, os.PathLike]) -> tuple:
    """Write ``model`` to ``path`` and its weights to ``<path>.data`` (not atomically: for private
    temporary files; :func:`save_model_atomic` is the atomic writer).  Returns (model bytes, data bytes)."""
    path = Path(path)
    data_path = data_file_for(path)
    with open(data_path, "wb") as dfh:
        shell = _externalized(model, dfh, data_path.name)
        size = dfh.tell()
    blob = shell.SerializeToString()
    path.write_bytes(blob)
    return len(blob), size


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
    big = {t.name for t in model.graph.initializer if _stripped(t)}
    return initializers_as_inputs(model, big) if big else model


def initializers_as_inputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of ``model`` in which the initializers ``names`` are graph inputs of the same type and
    shape (their data is not copied, so a model's weights are not held twice to take them out)."""
    names = set(names)
    graph = model.graph
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(graph, out.graph, skip="initializer")
    out.graph.initializer.extend(t for t in graph.initializer if t.name not in names)
    declared = {i.name for i in graph.input}
    out.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                           for t in graph.initializer if t.name in names and t.name not in declared)
    return out


def compact(model: onnx.ModelProto) -> onnx.ModelProto:
    """A fresh copy of ``model``: protobuf keeps the memory of removed initializers until the whole
    message is freed, so a model whose weights were taken out (a training step) is copied once,
    small, and the original dropped."""
    return initializers_as_inputs(model, ())


def serialized_parts(model: onnx.ModelProto):
    """Deterministic bytes of ``model`` in pieces: the model without its initializers, then each
    initializer (for hashing a model of any size without holding its whole encoding)."""
    head = onnx.ModelProto()
    _copy_fields(model, head, skip="graph")
    _copy_fields(model.graph, head.graph, skip="initializer")
    yield head.SerializeToString(deterministic=True)
    del head
    for t in model.graph.initializer:
        if t.HasField("raw_data"):  # the tensor's other fields, then its bytes as they are
            meta = onnx.TensorProto()
            _copy_fields(t, meta, skip="raw_data")
            yield meta.SerializeToString(deterministic=True)
            yield t.raw_data
        else:
            yield t.SerializeToString(deterministic=True)


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
        # The skeleton (large weights as inputs): whether a kernel exists does not depend on the weights'
        # values, and a model over 2 GB could not be serialized whole; the weights are not copied.
        ort.InferenceSession(skeleton(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        text = " ".join(first_line(exc).split())
        text = text.split("FAIL : ", 1)[-1] if "FAIL : " in text else text
        text = re.sub(r"^/\S+:\d+ [^)]*\)\s*", "", text)  # onnxruntime's C++ source location and function
        raise ModelLoadError(f"{where}: onnxruntime {ort.__version__} cannot load it: {text[:300]}") from None


def convert_opset(model: onnx.ModelProto, target: int, why: str, error: type = UnsupportedOpError) -> onnx.ModelProto:
    """The model converted to default opset ``target`` by onnx's version converter, checked.

    ``why`` says what needs the opset (for the message when conversion fails).  The converter runs on
    the skeleton (it serializes what it converts, which a model over 2 GB cannot be); the large
    initializers are put back afterwards.
    """
    from .types import default_opset

    big = [t.name for t in model.graph.initializer if _stripped(t)]
    try:
        work = initializers_as_inputs(model, big) if big else model
        converted = onnx.version_converter.convert_version(work, target)
        # The converter keeps the IR version; the new opset may need a newer one.
        converted.ir_version = max(converted.ir_version,
                                   onnx.helper.find_min_ir_version_for(list(converted.opset_import)))
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise error(f"{why} needs opset {target}, and onnx's version converter could not convert the model "
                    f"from opset {default_opset(model)}: {first_line(exc, type(exc).__name__)}") from None
    if big:
        _restore_initializers(converted, model, set(big))
    return converted


def _restore_initializers(converted: onnx.ModelProto, original: onnx.ModelProto, names: set) -> None:
    """Put ``original``'s initializers ``names`` (taken out as inputs for the converter) back into
    ``converted``, in the original order, and drop the inputs that stood for them."""
    declared = {i.name for i in original.graph.input}
    g = converted.graph
    inputs = [i for i in g.input if i.name not in names or i.name in declared]
    del g.input[:]
    g.input.extend(inputs)
    small = {t.name: t for t in g.initializer}
    order = [t.name for t in original.graph.initializer if t.name in names or t.name in small]
    rest = [t for t in g.initializer if t.name not in set(order)]
    by_name = {t.name: t for t in original.graph.initializer if t.name in names}
    tensors = [by_name[n] if n in by_name else onnx.TensorProto.FromString(small[n].SerializeToString())
               for n in order] + [onnx.TensorProto.FromString(t.SerializeToString()) for t in rest]
    del g.initializer[:]
    g.initializer.extend(tensors)


def save_model_atomic(model: onnx.ModelProto, path: Union[str, os.PathLike],
                      *, source: Union[str, os.PathLike, None] = None,
                      external_data: Optional[bool] = None) -> Path:
    """Write ``model`` to ``path`` via temporary files and renames.

    ``external_data``: ``True`` writes the initializers of at least EXTERNAL_MIN_BYTES to
    ``<path>.data`` beside the model (ONNX external data, location relative to the model's folder);
    ``False`` writes one file (refused over protobuf's 2 GB limit); ``None`` (default) writes external
    data when the model is over the limit or ``source`` (the input model) had external data, one file
    otherwise.  Refuses to overwrite ``source`` or any of its data files.  Nothing is left behind on
    failure, and the model and its data file are replaced together (:func:`_write_pair_atomic`).
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
    pending = _external_tensors(model)
    if pending:
        raise OutputPathError(
            f"cannot write '{out}': tensor {pending[0].name!r} still refers to the external file "
            f"{_external_location(pending[0])!r} (not loaded); load the model with onnxbp.load_model(..., "
            f"base_dir=...) first")
    size = serialized_size(model)
    src_files = source_data_files(source)
    if external_data is False and size > MAX_INLINE_BYTES:
        raise OutputPathError(
            f"cannot write '{out}' as one file: the model is {size} bytes, over protobuf's 2 GB limit; write it "
            f"with external data (external_data=True, --external-data)")
    external_data, why = external_data_choice(model, source, external_data)
    if external_data:
        log.info("writing %s with external data: %s", out, why)
    if not external_data:
        if size >= STREAM_MIN_BYTES:  # one initializer at a time: the weights are not held twice
            written = _write_atomic(out, lambda fh: _write_streamed(model, fh))
        else:
            data = model.SerializeToString()
            write_bytes_atomic(out, data)
            written = len(data)
            del data
        log.info("wrote %s (%d bytes)", out, written)
        stale = data_file_for(target)
        if stale.exists():
            log.info("%s is left as it was: the model written to %s does not use it", stale, out)
        return out
    data_out = data_file_for(target)
    if str(data_out.resolve()) in src_files:
        raise OutputPathError(
            f"the external data of '{out}' would go to '{data_out}', a data file of the input model; choose "
            f"another output path (the input is never modified)")
    if data_out.is_dir() or (data_out.exists() and not data_out.is_file()):
        raise OutputPathError(f"the external data path '{data_out}' of '{out}' exists and is not a regular file; "
                              f"choose another output path")
    model_bytes, data_bytes = _write_pair_atomic(model, target, data_out)
    log.info("wrote %s (%d bytes) and its external data %s (%d bytes)", out, model_bytes, data_out, data_bytes)
    return out


def external_data_choice(model: onnx.ModelProto, source: Union[str, os.PathLike, None] = None,
                         external_data: Optional[bool] = None) -> tuple:
    """``(external, why)``: whether :func:`save_model_atomic` writes ``model`` with external data, and why."""
    if external_data is not None:
        return bool(external_data), "asked for" if external_data else "asked for one file"
    size = serialized_size(model)
    if size > MAX_INLINE_BYTES:
        return True, f"the model is {size} bytes, over protobuf's 2 GB limit"
    if source_data_files(source):
        return True, "the input model had external data"
    return False, "below protobuf's 2 GB limit"


def _write_pair_atomic(model: onnx.ModelProto, out: Path, data_out: Path) -> tuple:
    """Write the model and its data file to temporaries beside them, fsync both, then rename the data
    file and the model into place.  On any failure both temporaries are removed and the previous
    files (if any) are put back, so neither a half-written model nor a half-written data file is left.
    (Between the two renames a concurrent reader can see the new data file with the old model.)"""
    _remove_stale_temporaries(out)
    _remove_stale_temporaries(data_out)
    pid = os.getpid()
    temps = []
    backup = None
    placed = False
    try:
        dfd, dtmp = tempfile.mkstemp(prefix=f".{data_out.name}.{pid}.", suffix=".tmp", dir=data_out.parent)
        temps.append(dtmp)
        mfd, mtmp = tempfile.mkstemp(prefix=f".{out.name}.{pid}.", suffix=".tmp", dir=out.parent)
        temps.append(mtmp)
        with os.fdopen(dfd, "wb") as dfh, os.fdopen(mfd, "wb") as mfh:
            shell = _externalized(model, dfh, data_out.name)
            data_bytes = dfh.tell()
            blob = shell.SerializeToString()
            del shell
            mfh.write(blob)
            for fh in (dfh, mfh):
                fh.flush()
                os.fsync(fh.fileno())
        for tmp in temps:
            os.chmod(tmp, 0o666 & ~_umask())
        if data_out.exists():
            fd, backup = tempfile.mkstemp(prefix=f".{data_out.name}.{pid}.", suffix=".tmp", dir=data_out.parent)
            os.close(fd)
            os.replace(data_out, backup)
        os.replace(dtmp, data_out)
        placed = True
        os.replace(mtmp, out)
    except BaseException:
        for tmp in temps:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        try:
            if backup is not None:
                os.replace(backup, data_out)
            elif placed:
                os.unlink(data_out)
        except OSError:
            pass
        raise
    if backup is not None:
        try:
            os.unlink(backup)
        except OSError:
            pass
    return len(blob), data_bytes


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


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_MODEL_GRAPH_TAG = bytes([(7 << 3) | 2])  # ModelProto.graph = 7, length-delimited
_GRAPH_INITIALIZER_TAG = bytes([(5 << 3) | 2])  # GraphProto.initializer = 5


def _write_streamed(model: onnx.ModelProto, fh) -> int:
    """Write ``model``'s protobuf encoding to ``fh`` with its initializers serialized one at a time
    (``SerializeToString`` would hold the whole encoding, a second copy of the weights, at once).
    The bytes parse to the same ModelProto; fields are in another order than protobuf's own writer
    (the graph's initializers last), which protobuf's format allows.  Returns the bytes written."""
    head = onnx.ModelProto()
    _copy_fields(model, head, skip="graph")
    graph = onnx.GraphProto()
    _copy_fields(model.graph, graph, skip="initializer")
    graph_bytes = graph.SerializeToString()
    del graph
    sizes = [t.ByteSize() for t in model.graph.initializer]
    graph_len = len(graph_bytes) + sum(len(_GRAPH_INITIALIZER_TAG) + len(_varint(n)) + n for n in sizes)
    chunks = [head.SerializeToString(), _MODEL_GRAPH_TAG, _varint(graph_len), graph_bytes]
    total = 0
    for c in chunks:
        fh.write(c)
        total += len(c)
    for t, n in zip(model.graph.initializer, sizes):
        data = t.SerializeToString()
        fh.write(_GRAPH_INITIALIZER_TAG + _varint(n))
        fh.write(data)
        total += len(_GRAPH_INITIALIZER_TAG) + len(_varint(n)) + n
        del data
    return total


def _write_atomic(path: Union[str, os.PathLike], write) -> int:
    """:func:`write_bytes_atomic` for a writer ``write(fh) -> bytes written`` (data produced while it is
    written); returns what ``write`` returned."""
    out = writable_target(path)
    _remove_stale_temporaries(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            written = write(fh)
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
    return written


def write_bytes_atomic(path: Union[str, os.PathLike], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    Readers see the old file or the new one, never a half-written one; on any
    failure the temporary file is removed and ``path`` is untouched.  A
    symlink is written through (its target is replaced, the link stays); an
    existing special file is refused (:func:`writable_target`).  Temporaries
    left by a writer that was killed (its process is gone) are removed.
    """
    out = writable_target(path)
    _write_atomic(out, lambda fh: fh.write(data))
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


def cpu_session(model: onnx.ModelProto, threads: Optional[int] = 1, *, mem_pattern: bool = True,
                profile_prefix: Optional[str] = None):
    """An onnxruntime CPU session: ``threads`` intra-op threads (None: onnxruntime's default), no
    busy-waiting, quiet.  ``mem_pattern=False`` turns off onnxruntime's one-block memory plan
    (training steps: see :class:`onnxbp.training.Trainer`); ``profile_prefix``: onnxruntime's
    profiler on, its JSON written under that prefix (benchmarks/profile_step.py)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_mem_pattern = mem_pattern
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    if needs_external_data(model) or serialized_size(model) >= SESSION_FILE_MIN_BYTES:
        # Over 2 GB the model cannot be serialized, and below that its encoding would be one more copy of
        # the weights: onnxruntime reads it from a temporary folder, the weights as external data
        # (written one tensor at a time); the folder goes once the session is built.
        with tempfile.TemporaryDirectory(prefix="onnxbp-session-") as tmp:
            path = Path(tmp) / "model.onnx"
            model_bytes, data_bytes = write_with_external_data(model, path)
            log.info("onnxruntime session from %s (%d bytes) with external data (%d bytes)", path, model_bytes,
                     data_bytes)
            return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
