"""Loading and saving models.

- load: parse the protobuf, refuse external data whose ``location`` leaves the model's folder
  (absolute paths, ``..``), then read the external tensors.
- save: atomic. Everything is written to a temporary folder inside the output's folder and moved
  into place with ``os.replace``; on any failure nothing is left behind. Models whose weights
  exceed the 2 GB protobuf limit (or that came with external data) are saved with their weights
  in ``OUT.data`` beside the model.
- large models: a model read from a path whose external data passes ``EXTERNAL_THRESHOLD`` is not
  read into memory. Its big tensors stay external, their ``location`` replaced by a token that
  names the file in a process-wide table (``is_lazy``, ``read_external``); rewritten weights of
  such models are written to a temporary spill file as the graph is exported (``spill_array``), so
  the weights of a model exist once, on disk, and are read a tensor at a time (or memory-mapped
  into ONNX Runtime sessions). Saving streams each tensor from its file into ``OUT.data``.
- temporary files: one work folder per process (``_work_dir``, removed at exit) holds the
  short-lived session folders, copies of data files that cannot be hard-linked, and one folder per
  ``SpillStore``. ``shrink`` makes a store for each call and makes it the active one
  (``spilling``); the returned ``Result`` owns it and removes it on ``close()``, at the end of a
  ``with`` block, or when it is garbage-collected; a call that fails removes it at once (unless the
  error carries a ``.result``, which then owns it). Exports outside any call (``normalize`` used
  directly) spill to one process-wide store, removed at exit. A tensor of a removed store raises a
  ``UsageError`` when used, instead of reading a missing file. The CLI turns SIGTERM into a normal
  exit, so these folders are removed then too; only SIGKILL leaves them behind.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import itertools
import os
import re
import secrets
import shutil
import tempfile

import numpy as np
import onnx
from onnx import external_data_helper

from .errors import InputError, OutputError, UsageError, first_line

PROTOBUF_LIMIT = 2**31 - 1
# Keep a margin: the graph itself also needs room inside the 2 GB message.
EXTERNAL_THRESHOLD = 1_800_000_000
# In a large model, external tensors smaller than this are read into memory on load (shape
# constants and the like must be visible to shape inference); bigger ones stay on disk.
LAZY_MIN_BYTES = 1 << 20
_ALIGN = 4096

_FILES: dict[str, str] = {}      # location token -> absolute path of the data file
_TOKENS: dict[str, str] = {}     # absolute path -> token
_COUNTER = itertools.count()
_CLOSED: set[str] = set()        # tokens of spill files already removed
_WORK: dict = {}                 # the process's work folder and fallback spill store
_CLOSED_MSG = ("the weights of this model were in the spill folder of a shrink() Result that has "
               "been closed or garbage-collected; keep the Result while using its model, or save it first")


def _work_dir() -> str:
    """A temporary folder, removed at exit, holding the spill folders, the short-lived session
    folders and, across file systems, one copy of each large model's data file."""
    if not _WORK.get("dir") or not os.path.isdir(_WORK["dir"]):
        _WORK.clear()
        _remove_stale_work_dirs()
        _WORK["dir"] = tempfile.mkdtemp(prefix=f"onnxshrink-{os.getpid()}-")
        atexit.register(shutil.rmtree, _WORK["dir"], True)
    return _WORK["dir"]


def _remove_stale_work_dirs() -> None:
    """Work folders of processes that are gone (killed with SIGKILL): removed."""
    base = tempfile.gettempdir()
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        m = re.fullmatch(r"onnxshrink-(\d+)-[\w]+", name)
        if not m:
            continue
        path = os.path.join(base, name)
        try:
            mine = os.path.isdir(path) and not os.path.islink(path) and os.stat(path).st_uid == os.getuid()
        except OSError:
            continue
        if mine and not _pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _token_for(path: str) -> str:
    path = os.path.realpath(path)
    if path not in _TOKENS:
        token = f"onnxshrink-{os.getpid()}-{next(_COUNTER)}-{os.path.basename(path)}"
        _TOKENS[path], _FILES[token] = token, path
    return _TOKENS[path]


def session_folder(model: onnx.ModelProto) -> str:
    """A new temporary folder holding each data file of the model's lazy tensors under its token:
    a hard link (or, across file systems, a link to one cached copy in the work folder). ONNX
    Runtime maps the files from there; the caller removes the folder once the session exists, so
    the user's files carry the extra link only that long (onnx refuses hard-linked data files)."""
    d = tempfile.mkdtemp(prefix="session-", dir=_work_dir())
    try:
        for token in sorted({_ext_info(t)["location"] for t in lazy_tensors(model)}):
            src = _FILES[token]
            try:
                os.link(src, os.path.join(d, token))
            except OSError:
                copy = os.path.join(_work_dir(), "copy-" + token)
                if not os.path.exists(copy):
                    shutil.copyfile(src, copy + ".part")
                    os.replace(copy + ".part", copy)
                os.link(copy, os.path.join(d, token))
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return d


def _ext_info(tensor) -> dict:
    return {e.key: e.value for e in tensor.external_data}


def copy_fields(src, dst, skip=()) -> None:
    """Copy every field set in the protobuf message ``src`` but those named in ``skip`` into
    ``dst`` (the same message type) as it is: repeated fields extended, messages copied, scalars
    set. What a trimmed or stand-in copy of a model (or its graph) keeps unchanged."""
    for f, value in src.ListFields():
        if f.name in skip:
            continue
        if hasattr(value, "extend"):     # a repeated field
            getattr(dst, f.name).extend(value)
        elif f.message_type is not None:
            getattr(dst, f.name).CopyFrom(value)
        else:
            setattr(dst, f.name, value)


def _varint_size(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def serialized_size(model: onnx.ModelProto) -> int:
    """``model.ByteSize()`` without serializing the whole model (which copies every weight: a
    quarter second for a 100 MB model): the wire format's size is the sum of its fields' sizes,
    so it is the size of the model without its graph, plus the graph's (field 7: a one-byte tag
    and the length) counted as the graph without its initializers plus each initializer (field 5:
    a one-byte tag, the length and the tensor's own size)."""
    g = model.graph
    if not model.HasField("graph") or not len(g.initializer):
        return model.ByteSize()
    shell, graph = onnx.ModelProto(), onnx.GraphProto()
    copy_fields(model, shell, skip=("graph",))
    copy_fields(g, graph, skip=("initializer",))
    size = graph.ByteSize()
    for t in g.initializer:
        n = t.ByteSize()
        size += 1 + _varint_size(n) + n
    return shell.ByteSize() + 1 + _varint_size(size) + size


def is_lazy(tensor) -> bool:
    """A tensor whose data stays in a file this process knows (a large model's weights). Raises
    UsageError for a tensor whose spill store was closed."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return False
    location = _ext_info(tensor).get("location")
    if location in _CLOSED:
        raise UsageError(_CLOSED_MSG)
    return location in _FILES


def lazy_tensors(model: onnx.ModelProto) -> list:
    """Lazy tensors anywhere in the model (initializers, Constant attributes, subgraphs)."""
    if not _FILES and not _CLOSED:
        return []
    return [t for t in external_data_helper._get_all_tensors(model) if is_lazy(t)]


def has_lazy(model: onnx.ModelProto) -> bool:
    return (bool(_FILES) or bool(_CLOSED)) and any(is_lazy(t) for t in external_data_helper._get_all_tensors(model))


def _np_dtype(tensor):
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


def read_external(tensor, mmap: bool = False) -> np.ndarray:
    """The value of a lazy tensor: a fresh array, or a read-only memory map of its file."""
    info = _ext_info(tensor)
    if info["location"] in _CLOSED:
        raise UsageError(_CLOSED_MSG)
    path, offset = _FILES[info["location"]], int(info.get("offset", 0))
    dtype, shape = _np_dtype(tensor), tuple(tensor.dims)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.zeros(shape, dtype)
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    return np.fromfile(path, dtype=dtype, count=count, offset=offset).reshape(shape)


def _set_external(tensor, token: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", token), ("offset", str(offset)), ("length", str(length))):
        e = tensor.external_data.add()
        e.key, e.value = k, v


class SpillStore:
    """Where rewritten weights of large models go: a folder of the work folder holding one spill
    file, both made on the first write (a call on a small model writes nothing). ``close`` removes
    the folder and forgets its token; it may be called more than once."""

    def __init__(self):
        self.dir = self.path = self.token = None
        self.closed = False

    def file(self) -> tuple[str, str]:
        if self.closed:
            raise UsageError(_CLOSED_MSG)
        if self.path is None or not os.path.exists(self.path):
            self.dir = tempfile.mkdtemp(prefix="spill-", dir=_work_dir())
            self.token = f"onnxshrink-{os.getpid()}-{next(_COUNTER)}-spill.data"
            self.path = os.path.join(self.dir, self.token)
            open(self.path, "wb").close()
            _FILES[self.token] = self.path
        return self.path, self.token

    def close(self) -> None:
        self.closed = True
        if self.token is not None:
            _FILES.pop(self.token, None)
            _CLOSED.add(self.token)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("onnxshrink_spill_store", default=None)


@contextlib.contextmanager
def spilling(store: SpillStore):
    """Make ``store`` the one ``spill_array`` writes to inside the block (per thread/context)."""
    reset = _ACTIVE.set(store)
    try:
        yield store
    finally:
        _ACTIVE.reset(reset)


def active_store() -> SpillStore | None:
    """The store of the enclosing ``spilling`` block, if any."""
    return _ACTIVE.get()


def spill_array(name: str, array: np.ndarray) -> onnx.TensorProto:
    """Write an array to the active spill store's file (outside any ``spilling`` block: the
    process-wide one); returns a lazy TensorProto for it."""
    store = active_store()
    if store is None:
        store = _WORK.setdefault("store", SpillStore())
    path, token = store.file()
    array = np.ascontiguousarray(array)
    with open(path, "ab") as f:
        offset = f.tell()
        if offset % _ALIGN:
            f.write(b"\0" * (_ALIGN - offset % _ALIGN))
            offset = f.tell()
        array.tofile(f)
    t = onnx.TensorProto()
    t.name = name
    t.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    t.dims.extend(array.shape)
    _set_external(t, token, offset, array.nbytes)
    return t


def _expected_nbytes(tensor) -> int | None:
    try:
        return int(np.prod(tuple(tensor.dims), dtype=np.int64)) * _np_dtype(tensor).itemsize
    except Exception:  # sub-byte or unknown types: no size check
        return None


def _external_locations(model: onnx.ModelProto):
    for tensor in external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            yield tensor.name, info.get("location", "")


def check_external_paths(model: onnx.ModelProto, base_dir: str) -> None:
    base = os.path.realpath(base_dir)
    for name, loc in _external_locations(model):
        if not loc or os.path.isabs(loc) or loc.startswith(("/", "\\")) or ":" in loc[:3]:
            raise InputError(f"refusing external data of tensor '{name}': location '{loc}' is not a "
                             "relative path inside the model's folder")
        target = os.path.realpath(os.path.join(base, loc))
        if os.path.commonpath([base, target]) != base:
            raise InputError(f"refusing external data of tensor '{name}': location '{loc}' points "
                             "outside the model's folder")
        if not os.path.isfile(target):
            raise InputError(f"external data file '{loc}' of tensor '{name}' not found next to the model")


def load_model(path_or_model, base_dir: str | None = None) -> onnx.ModelProto:
    """Load a model from a path, bytes or a ModelProto (which is copied, never modified).

    A ModelProto or bytes whose tensors point at external data that was not loaded is resolved
    against ``base_dir`` (the folder of its data files, checked like a path's); without
    ``base_dir`` it is refused: never resolved against the process's working folder."""
    if isinstance(path_or_model, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(path_or_model)
        return _resolve_external(model, base_dir, "<ModelProto>")
    if isinstance(path_or_model, (bytes, bytearray)):
        return _resolve_external(_parse(bytes(path_or_model), "<bytes>"), base_dir, "<bytes>")
    path = os.fspath(path_or_model)
    if not os.path.exists(path):
        raise InputError(f"model file '{path}' does not exist")
    if os.path.isdir(path):
        raise InputError(f"model path '{path}' is a directory, not an .onnx file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"cannot read model file '{path}': {e.strerror}") from None
    model = _parse(data, path)
    return _resolve_external(model, os.path.dirname(os.path.abspath(path)), path)


def _resolve_external(model: onnx.ModelProto, base_dir: str | None, where: str) -> onnx.ModelProto:
    unloaded = [(n, loc) for n, loc in _external_locations(model) if loc not in _FILES and loc not in _CLOSED]
    if not unloaded:
        return model
    if base_dir is None:
        name, loc = unloaded[0]
        raise UsageError(f"tensor '{name}' of the {where} keeps its data in external file '{loc}', which "
                         "was not loaded: load the model with its external data (onnx.load(path)), pass "
                         "its path instead, or pass base_dir= the folder holding its data files")
    if not os.path.isdir(base_dir):
        raise UsageError(f"base_dir '{base_dir}' is not a folder")
    check_external_paths(model, base_dir)
    if _external_total(model) > EXTERNAL_THRESHOLD:
        _attach_lazily(model, base_dir, where)
        return model
    try:
        external_data_helper.load_external_data_for_model(model, base_dir)
    except Exception as e:  # truncated data files and the like
        raise InputError(f"cannot read external data of '{where}': {e}") from None
    return model


def has_external_data(path: str) -> bool:
    """Whether the model file at ``path`` keeps tensors in external files (its graph only is read)."""
    try:
        m = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:
        return True
    return any(True for _ in _external_locations(m))


def _external_total(model) -> int:
    total = 0
    for t in external_data_helper._get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            n = _expected_nbytes(t)
            total += n if n is not None else int(_ext_info(t).get("length", 0) or 0)
    return total


def _attach_lazily(model, base_dir, where) -> None:
    """Large model: big external tensors stay in their files (checked for size), small ones are
    read now."""
    for t in external_data_helper._get_all_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = _ext_info(t)
        target = os.path.join(base_dir, info["location"])
        offset = int(info.get("offset", 0) or 0)
        size = os.path.getsize(target)
        length = int(info["length"]) if info.get("length") else size - offset
        want = _expected_nbytes(t)
        if offset < 0 or length < 0 or offset + length > size or (want is not None and length != want):
            raise InputError(f"cannot read external data of '{where}': tensor '{t.name}' needs "
                             f"{want if want is not None else length} bytes at offset {offset} of "
                             f"'{info['location']}' ({size} bytes)")
        if length < LAZY_MIN_BYTES or want is None:
            with open(target, "rb") as f:
                f.seek(offset)
                data = f.read(length)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = data
        else:
            _set_external(t, _token_for(target), offset, length)


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    if not data:
        raise InputError(f"model file '{where}' is empty")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:
        raise InputError(f"'{where}' is not a valid ONNX model (protobuf parse failed; "
                         "truncated or not an .onnx file)") from None
    if not model.HasField("graph") or not model.opset_import:
        raise InputError(f"'{where}' parses as protobuf but is not an ONNX model "
                         "(no graph or no opset_import)")
    if len(model.graph.node) == 0 or len(model.graph.output) == 0:
        raise InputError(f"'{where}' is not a usable ONNX model: its graph has no nodes or no outputs")
    return model


def weight_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in external_data_helper._get_all_tensors(model):
        if t.HasField("raw_data"):
            total += len(t.raw_data)
        elif is_lazy(t):
            total += int(_ext_info(t)["length"])
        else:
            total += t.ByteSize()
    return total


TMP_RE = re.compile(r"\.onnxshrink-(\d+)-[0-9a-f]+\.tmp")


def _temp_name(folder: str) -> str:
    """A short, recognisable temporary name in ``folder``: ``.onnxshrink-<pid>-<rand>.tmp``
    (short so that a 250-character OUT name still works; the pid lets a later run remove what a
    killed one left)."""
    return os.path.join(folder, f".onnxshrink-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:        # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: str) -> list[str]:
    """Remove the temporary files of earlier runs in ``folder`` whose process is gone (SIGKILL
    during a save); returns their paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = TMP_RE.fullmatch(name)
        if m and not _pid_alive(int(m.group(1))):
            path = os.path.join(folder, name)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def _name_max(folder: str) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _same(a: str, b: str) -> bool:
    """Same file: the same path after resolving links, or (both existing) the same inode
    (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def check_writable(path: str, what: str = "output") -> str:
    """The folder of ``path`` exists and is writable, ``path`` is not a folder, its name fits the
    file system. Returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.dirname(path), os.path.basename(path)
    if not os.path.isdir(folder):
        raise UsageError(f"{what} directory '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{what} directory '{folder}' is not writable")
    if os.path.isdir(path):
        raise UsageError(f"{what} path '{path}' is a directory")
    limit = _name_max(folder)
    if len(os.fsencode(name)) > limit:
        raise UsageError(f"{what} file name '{name[:40]}...' is too long ({len(os.fsencode(name))} bytes; "
                         f"this file system allows {limit})")
    return path


def check_output_paths(out_path, in_path=None, report_path=None, force: bool = False,
                       external: bool = False, data_paths=()) -> None:
    """Before any work: every file the run will write (the model, ``OUT.data`` when ``external``
    and the report) can be written, and none of them is the input (the model, or ``OUT`` itself
    without ``force``) or a data file. The report may never be the input or OUT."""
    out = check_writable(out_path, "output")
    outputs = [("output", out)]
    if external:
        outputs.append(("external data", check_writable(out + ".data", "external data")))
    if report_path is not None:
        rep = check_writable(report_path, "report")
        for what, p in outputs:
            if _same(rep, p):
                raise UsageError(f"the report path '{report_path}' is the {what} path; give the report its own file")
        outputs.append(("report", rep))
    if in_path is not None:
        for what, p in outputs:
            if not _same(p, os.fspath(in_path)):
                continue
            if what == "output":
                if not force:
                    raise UsageError("output path is the input file; refusing to overwrite the input "
                                     "(force=True allows it)")
            else:
                raise UsageError(f"the {what} path '{p}' is the input model; refusing to overwrite the input")
    for data in data_paths:
        if data is None or not isinstance(data, (str, os.PathLike)):
            continue
        for what, p in outputs:
            if _same(p, os.fspath(data)):
                raise UsageError(f"the {what} path '{p}' is a data file of this run; refusing to overwrite it")


def check_output_path(out_path: str, in_path: str | None = None, force: bool = False) -> str:
    check_output_paths(out_path, in_path, force=force)
    return os.path.abspath(os.fspath(out_path))


class Staging:
    """Files written under temporary names beside their final paths, then published together:
    ``publish`` renames each into place; if one rename fails, those already published are rolled
    back (the previous file restored from a hard-link backup, or the new one removed), so a
    failure leaves no output, or the previous outputs, never a mix. ``discard`` removes the
    temporary files. Use as a context manager: leaving the block without ``publish`` discards."""

    def __init__(self):
        self.pending: list[tuple[str, str]] = []    # (tmp, final)

    def path_for(self, final: str) -> str:
        final = os.path.abspath(os.fspath(final))
        folder = os.path.dirname(final)
        if not self.pending or all(os.path.dirname(f) != folder for _, f in self.pending):
            remove_stale_temps(folder)
        tmp = _temp_name(folder)
        self.pending.append((tmp, final))
        return tmp

    def write_bytes(self, final: str, data: bytes) -> None:
        tmp = self.path_for(final)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise _output_error(final, e) from None

    def publish(self) -> list[str]:
        umask = os.umask(0)
        os.umask(umask)
        done = []       # (final, backup or None)
        final = None
        try:
            for tmp, final in self.pending:
                if not os.path.exists(tmp):
                    continue
                backup = None
                if os.path.isfile(final) and not os.path.islink(final):
                    backup = _temp_name(os.path.dirname(final))
                    try:
                        os.link(final, backup)
                    except OSError:
                        backup = None
                try:
                    os.chmod(tmp, 0o666 & ~umask)   # temporary files are private; outputs are not
                    os.replace(tmp, final)
                except BaseException:
                    if backup:
                        os.unlink(backup)
                    raise
                done.append((final, backup))
        except BaseException as e:
            for published, backup in reversed(done):
                try:
                    if backup:
                        os.replace(backup, published)
                    else:
                        os.unlink(published)
                except OSError:
                    pass
            self.discard()
            if isinstance(e, OSError):
                raise _output_error(final, e) from None
            raise
        for _, backup in done:
            if backup:
                try:
                    os.unlink(backup)
                except OSError:
                    pass
        self.pending.clear()
        return [final for final, _ in done]

    def discard(self) -> None:
        for tmp, _ in self.pending:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self.pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()


def _output_error(path, e: OSError) -> OutputError:
    return OutputError(f"{path}: {e.strerror or first_line(e)}")


def save_model(model: onnx.ModelProto, out_path: str, external: bool | None = None,
               staging: Staging | None = None, copy_from: str | None = None) -> list[str]:
    """Write atomically; returns the list of files written. With ``staging`` the files are only
    staged (the caller publishes them with other files). ``copy_from``: write that file's bytes
    instead of serialising ``model`` (a model that nothing changed, saved byte-identical)."""
    own = staging is None
    staging = Staging() if own else staging
    try:
        _stage_model(model, out_path, external, staging, copy_from)
        return staging.publish() if own else [f for _, f in staging.pending]
    finally:
        if own:
            staging.discard()


def _stage_model(model, out_path, external, staging, copy_from) -> None:
    out_path = check_writable(out_path)
    name = os.path.basename(out_path)
    if copy_from is not None:
        tmp = staging.path_for(out_path)
        try:
            shutil.copyfile(copy_from, tmp)
        except OSError as e:
            raise _output_error(out_path, e) from None
        return
    if external is None:
        external = weight_bytes(model) > EXTERNAL_THRESHOLD
    if external:
        data_final = check_writable(out_path + ".data", "external data")
        tmp_data = staging.path_for(data_final)
        tmp_model = staging.path_for(out_path)
        try:
            _save_streaming(model, tmp_model, tmp_data, name + ".data")
        except OSError as e:
            raise _output_error(out_path, e) from None
    else:
        staging.write_bytes(out_path, (materialized(model) if has_lazy(model) else model).SerializeToString())


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every lazy tensor read into memory."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in lazy_tensors(m):
        data = read_external(t).tobytes()
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
        t.raw_data = data
    return m


def _save_streaming(model, model_path, data_path, data_name) -> None:
    """Save with external data, copying each tensor's bytes from its file (or from the proto for
    inline tensors) into ``data_path``: one tensor at a time in memory."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    with open(data_path, "wb") as out:
        for t in external_data_helper._get_all_tensors(m):
            if is_lazy(t):
                info = _ext_info(t)
                src, offset, length = _FILES[info["location"]], int(info.get("offset", 0)), int(info["length"])
            elif t.HasField("raw_data") and len(t.raw_data) >= 1024:
                src, offset, length = None, 0, len(t.raw_data)
            else:
                continue
            pos = out.tell()
            if pos % _ALIGN:
                out.write(b"\0" * (_ALIGN - pos % _ALIGN))
                pos = out.tell()
            if src is None:
                out.write(t.raw_data)
            else:
                with open(src, "rb") as f:
                    f.seek(offset)
                    left = length
                    while left:
                        chunk = f.read(min(left, 64 << 20))
                        if not chunk:
                            raise OSError(f"external data of tensor '{t.name}' is shorter than recorded")
                        out.write(chunk)
                        left -= len(chunk)
            _set_external(t, data_name, pos, length)
        out.flush()
        os.fsync(out.fileno())
    with open(model_path, "wb") as f:
        f.write(m.SerializeToString())
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str, text: str) -> None:
    path = check_writable(path, "report")
    with Staging() as st:
        st.write_bytes(path, text.encode())
        st.publish()
