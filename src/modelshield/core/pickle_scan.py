"""Static inspection of pickle-based model files: which globals would loading import?

:func:`inspect_pickle` walks the pickle opcodes with :func:`pickletools.genops` and a small
symbolic stack (strings, numbers, tuples, dicts and memo entries are tracked; everything
else is an opaque placeholder), so the operands of ``STACK_GLOBAL`` are recovered even
when they come from the memo. Nothing from the file is ever imported, called or
unpickled here.

Handled containers:

- raw pickles, protocols 0-5, including the legacy (pre-1.6) ``torch.save`` format, which
  is several pickles back to back, and ``joblib`` files, whose numpy array payloads are
  skipped and whose zlib/gzip/bz2/xz/lzma compression is undone in memory;
- ``torch.save`` zip archives (every member whose name ends in ``pkl``);
- TorchScript archives (``code/`` + ``constants.pkl``);
- ``torch.export`` ``.pt2`` archives, whose pickled weights, constants, opaque objects and
  sample inputs are nested pickles or nested ``torch.save`` archives (``torch.export.load``
  unpickles some of them with ``weights_only=False``).

Each global is classified ``dangerous`` (can run code, touch files or the network, or
import more code), ``safe`` (on a short allowlist of tensor/array rebuild helpers and
standard ``torch.nn`` layers) or ``unknown`` (anything else, e.g. the user's model class).
The allowlist is deliberately small: ``unknown`` means "not vetted", not "malicious".
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import logging
import lzma
import math
import os
import pickletools
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from modelshield.core.errors import ModelLoadError

logger = logging.getLogger(__name__)

__all__ = [
    "DANGEROUS_MODULES",
    "DANGEROUS_NAMES",
    "PickleReport",
    "classify_global",
    "inspect_pickle",
]

PickleFormat = Literal["pickle", "torch-zip", "torchscript", "torch-export", "not-pickle"]

ZIP_MAGIC = b"PK\x03\x04"
#: ``pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)``: the first pickle of a legacy
#: (non-zip) ``torch.save`` file.
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_LEGACY_TORCH_PICKLES = 5  # magic, protocol version, sys info, object, storage keys

# Decompressed joblib payloads larger than this are not inspected (zip-bomb guard).
MAX_DECOMPRESSED_BYTES = 4 << 30
# Zip members larger than this are not read into memory.
MAX_MEMBER_BYTES = 2 << 30
_MAX_NESTING = 4

# --------------------------------------------------------------------------------------
# Classification lists
# --------------------------------------------------------------------------------------

#: Module roots that are dangerous as a whole: importing anything from them gives code
#: execution, file-system or network access, or a way to import/unpickle more code.
DANGEROUS_MODULES: frozenset[str] = frozenset(
    {
        "os", "posix", "nt", "subprocess", "_posixsubprocess", "sys", "socket", "_socket",
        "shutil", "pty", "runpy", "importlib", "imp", "zipimport", "pkgutil", "ctypes",
        "_ctypes", "pickle", "_pickle", "cPickle", "pickletools", "dill", "cloudpickle",
        "marshal", "code", "codeop", "types", "webbrowser", "urllib", "urllib2", "urllib3",
        "http", "httplib", "requests", "httpx", "aiohttp", "ftplib", "smtplib", "telnetlib",
        "xmlrpc", "socketserver", "ssl", "asyncio", "multiprocessing", "concurrent",
        "threading", "_thread", "signal", "commands", "popen2", "pdb", "bdb", "timeit",
        "cProfile", "profile", "trace", "pydoc", "doctest", "idlelib", "tkinter", "site",
        "ensurepip", "venv", "distutils", "setuptools", "pip", "pathlib", "tempfile",
        "glob", "fileinput", "gc", "inspect", "antigravity", "platform", "sysconfig",
        "ctypes.util", "_io", "mmap", "resource", "fcntl", "select", "selectors",
        "logging.config",
    }
)  # fmt: skip

#: Specific ``module.name`` globals (or ``module.prefix`` ending in ``.``) that are
#: dangerous although their module is not.
DANGEROUS_NAMES: frozenset[str] = frozenset(
    {
        # builtins that evaluate code, reach arbitrary attributes, or touch files
        *(
            f"{mod}.{name}"
            for mod in ("builtins", "__builtin__", "exceptions")
            for name in (
                "eval", "exec", "execfile", "compile", "open", "file", "__import__",
                "getattr", "setattr", "delattr", "globals", "locals", "vars", "input",
                "raw_input", "breakpoint", "apply", "reload", "exit", "quit", "help",
                "memoryview", "__loader__", "__spec__", "__build_class__", "super",
            )
        ),
        "operator.attrgetter", "operator.methodcaller", "_operator.attrgetter",
        "_operator.methodcaller", "functools.partial", "_functools.partial",
        "functools.reduce", "_functools.reduce", "io.open", "io.FileIO", "io.open_code",
        "codecs.open", "codecs.EncodedFile",
        # torch entry points that load more (unrestricted) pickles or code
        "torch.load", "torch.serialization.load", "torch.serialization._load",
        "torch.serialization._legacy_load", "torch.storage._load_from_bytes",
        "torch.hub.", "torch.jit.load", "torch.jit._serialization.load", "torch.package.",
        "torch.utils.cpp_extension.", "torch.fx.graph_module.", "torch.save",
        "torch.export.load", "torch._export.", "torch.ops.", "torch.classes.",
        "torch._C._load_for_lite_interpreter", "torch._C.import_ir_module",
        "torch.from_file", "torch.UntypedStorage.from_file",
        # numpy / pandas / yaml / joblib loaders
        "numpy.load", "numpy.lib.npyio.", "numpy.fromfile", "numpy.memmap",
        "numpy.core.memmap.", "numpy._core.memmap.", "numpy.testing.", "numpy.f2py.",
        "numpy.distutils.", "numpy.ctypeslib.", "numpy.lib.format.", "pandas.read_pickle",
        "pandas.io.", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "joblib.load",
        "joblib.numpy_pickle.load", "joblib._memmapping_reducer.", "scipy.io.",
    }
)  # fmt: skip

_DANGEROUS_BUILTIN_NAMES = frozenset(
    n.split(".", 1)[1] for n in DANGEROUS_NAMES if n.startswith("builtins.")
)

#: Exact ``module.name`` globals known to be safe to import and call.
SAFE_NAMES: frozenset[str] = frozenset(
    {
        "collections.OrderedDict", "collections.defaultdict", "collections.deque",
        "collections.Counter", "_collections.OrderedDict",
        *(
            f"{mod}.{name}"
            for mod in ("builtins", "__builtin__")
            for name in (
                "set", "frozenset", "slice", "complex", "bytearray", "range", "list",
                "dict", "tuple", "int", "float", "bool", "str", "bytes", "object",
                "NoneType", "Ellipsis", "NotImplemented",
            )
        ),
        "copyreg._reconstructor", "copy_reg._reconstructor", "_codecs.encode",
        "torch.serialization._get_layout", "torch.device", "torch.dtype", "torch.Size",
        "torch.Tensor", "torch._tensor._rebuild_from_type_v2", "torch.layout",
        "torch.memory_format", "torch.nn.parameter.Parameter", "torch.nn.parameter.Buffer",
        "torch.nn.parameter.UninitializedParameter", "torch.storage.UntypedStorage",
        "torch.storage.TypedStorage", "torch.storage._TypedStorage",
        "torch.strided", "torch.sparse_coo", "torch.sparse_csr", "torch.sparse_csc",
        "torch.sparse_bsr", "torch.sparse_bsc", "torch._mkldnn", "torch.contiguous_format",
        "torch.channels_last", "torch.channels_last_3d", "torch.preserve_format",
        "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.ndarray",
        "numpy.dtype", "numpy.random._pickle.__randomstate_ctor",
        "numpy.random._pickle.__bit_generator_ctor", "numpy.random._pickle.__generator_ctor",
        "numpy.random.mtrand._legacy_seeding", "joblib.numpy_pickle.NumpyArrayWrapper",
        "argparse.Namespace",
    }
)  # fmt: skip

_SAFE_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"torch\._utils\._rebuild_[A-Za-z0-9_]+"),
    re.compile(r"torch(\.storage|\.cuda)?\.[A-Z][A-Za-z0-9]*Storage"),
    re.compile(
        r"torch\.(u?int\d+|float\d*|bfloat16|complex\d*|c?float|c?double|half|long|int|short"
        r"|bool|chalf|cdouble|qint8|quint8|qint32|quint4x2|float8_\w+|bits\w*)"
    ),
    # standard layers: CamelCase classes defined in torch.nn.modules.*
    re.compile(r"torch\.nn\.modules\.[a-z_0-9]+(\.[a-z_0-9]+)*\.[A-Z][A-Za-z0-9]*"),
    re.compile(r"torch\.jit\._pickle\.[A-Za-z_0-9]+"),
    re.compile(r"numpy\.dtypes\.[A-Za-z0-9]+DType"),
)

# Python 2 module names that the unpickler maps to Python 3 ones for protocols < 3.
_PY2_MODULES = {
    "__builtin__": "builtins",
    "exceptions": "builtins",
    "copy_reg": "copyreg",
    "cPickle": "pickle",
    "commands": "subprocess",
    "urllib2": "urllib.request",
    "httplib": "http.client",
    "Tkinter": "tkinter",
}

Verdict = Literal["dangerous", "unknown", "safe"]


def _in_module_set(module: str, modules: frozenset[str]) -> bool:
    parts = module.split(".")
    return any(".".join(parts[: i + 1]) in modules for i in range(len(parts)))


def _matches_dangerous_name(qualname: str) -> bool:
    if qualname in DANGEROUS_NAMES:
        return True
    return any(p.endswith(".") and qualname.startswith(p) for p in DANGEROUS_NAMES)


def classify_global(module: str, name: str) -> Verdict:
    """Classify the global ``module.name`` that a pickle imports.

    ``name`` may be dotted: from protocol 4 on, the unpickler walks attributes
    (``posixpath`` + ``os.system`` reaches ``os.system``), so every segment is checked and
    a dotted name is never considered safe.
    """
    modules = {module, _PY2_MODULES.get(module.split(".")[0], module)}
    for mod in modules:
        qual = f"{mod}.{name}"
        if _in_module_set(mod, DANGEROUS_MODULES) or _matches_dangerous_name(qual):
            return "dangerous"
    if "." in name:
        for seg in name.split("."):
            if (
                seg.startswith("__")
                or seg in DANGEROUS_MODULES
                or seg in _DANGEROUS_BUILTIN_NAMES
                or seg in {"system", "popen", "Popen", "spawn", "check_output", "run"}
            ):
                return "dangerous"
        return "unknown"
    if not module or not name or not name.isidentifier():
        return "unknown"
    qual = f"{module}.{name}"
    if qual in SAFE_NAMES or any(p.fullmatch(qual) for p in _SAFE_PATTERNS):
        return "safe"
    if module == "__torch__" or module.startswith("__torch__."):
        # TorchScript class types: compiled from the archive's code/, not Python imports
        return "safe"
    return "unknown"


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


@dataclass
class PickleReport:
    """What loading a pickle-based file would import, found without executing it.

    ``globals`` lists every ``module.name`` in first-seen order; each also appears in
    exactly one of ``dangerous``, ``unknown`` and ``safe``. ``errors`` holds problems that
    stopped the walk (a truncated stream, an unknown opcode); a report with errors is
    incomplete. ``members`` names the pickle streams inspected (zip members, nested
    archives as ``outer!inner``); ``notes`` holds remarks that are not findings.
    """

    format: PickleFormat = "pickle"
    globals: list[str] = field(default_factory=list)
    dangerous: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    safe: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when every global is allowlisted and the walk completed."""
        return not (self.dangerous or self.unknown or self.errors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "globals": list(self.globals),
            "dangerous": list(self.dangerous),
            "unknown": list(self.unknown),
            "safe": list(self.safe),
            "errors": list(self.errors),
            "members": list(self.members),
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------
# Symbolic pickle machine
# --------------------------------------------------------------------------------------


class _Mark:
    def __repr__(self) -> str:
        return "<mark>"


_MARK = _Mark()


class _Opaque:
    """A value the walker does not model."""

    def __repr__(self) -> str:
        return "<?>"


@dataclass(eq=False)
class _Global:
    module: str
    name: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False)
class _Obj:
    """Result of calling/instantiating ``func`` (REDUCE, NEWOBJ, OBJ, INST)."""

    func: Any
    args: Any
    state: Any = None


_STR_OPS = {
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
    "BINUNICODE8",
}  # fmt: skip
_BYTES_OPS = {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_NUM_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}

_DTYPE_RE = re.compile(r"[<>|=]?([a-zA-Z?])(\d*)")
_DTYPE_CHAR_SIZE = {
    "?": 1, "b": 1, "B": 1, "h": 2, "H": 2, "i": 4, "I": 4, "l": 8, "L": 8, "q": 8, "Q": 8,
    "e": 2, "f": 4, "d": 8, "g": 16, "F": 8, "D": 16, "G": 32,
}  # fmt: skip


class _Walker:
    """Walks pickle streams and collects globals into a :class:`PickleReport`."""

    def __init__(self, report: PickleReport, depth: int = 0) -> None:
        self.report = report
        self.depth = depth
        self._seen: set[str] = set()

    # -- findings --------------------------------------------------------------------------
    def add_global(self, module: str, name: str) -> None:
        qual = f"{module}.{name}"
        if qual in self._seen:
            return
        self._seen.add(qual)
        self.report.globals.append(qual)
        getattr(self.report, classify_global(module, name)).append(qual)

    def add_dangerous_marker(self, text: str) -> None:
        if text not in self._seen:
            self._seen.add(text)
            self.report.globals.append(text)
            self.report.dangerous.append(text)

    def error(self, label: str, text: str) -> None:
        msg = f"{label}: {text}" if label else text
        if msg not in self.report.errors:
            self.report.errors.append(msg)

    # -- streams ---------------------------------------------------------------------------
    def scan_raw(self, stream: IO[bytes], label: str) -> None:
        """Scan a raw (non-zip) pickle file: one pickle, or the legacy torch sequence."""
        start = stream.tell()
        head = stream.read(len(LEGACY_TORCH_MAGIC))
        stream.seek(start)
        legacy = head == LEGACY_TORCH_MAGIC
        if legacy:
            self.report.notes.append(f"{label or 'file'}: legacy (non-zip) torch.save format")
        self.report.members.append(label or "<pickle>")
        count = 0
        while True:
            pos = stream.tell()
            peek = stream.read(1)
            stream.seek(pos)
            if not peek:
                if legacy and count < _LEGACY_TORCH_PICKLES:
                    self.error(label, f"legacy torch.save file ends after {count} pickle(s)")
                return
            if count == 0 or (legacy and count < _LEGACY_TORCH_PICKLES):
                if not self.scan_one(stream, label):
                    return
                count += 1
                continue
            if legacy:
                return  # raw storage bytes follow the legacy pickles; torch never unpickles them
            # Extra data after the pickle the loader reads: scan further pickles if they
            # parse cleanly (a custom loader could read them), else just note it.
            if peek != b"\x80":
                self.report.notes.append(f"{label or 'file'}: trailing data after STOP")
                return
            sub = PickleReport()
            ok = _Walker(sub, self.depth).scan_one(stream, label)
            if not (ok and not sub.errors):
                self.report.notes.append(f"{label or 'file'}: trailing data after STOP")
                return
            for qual in sub.globals:
                self._merge_global(qual, sub)
            count += 1

    def _merge_global(self, qual: str, sub: PickleReport) -> None:
        if qual in self._seen:
            return
        self._seen.add(qual)
        self.report.globals.append(qual)
        for cat in ("dangerous", "unknown", "safe"):
            if qual in getattr(sub, cat):
                getattr(self.report, cat).append(qual)

    def merge(self, sub: PickleReport) -> None:
        """Merge a nested archive's report into this one."""
        for qual in sub.globals:
            self._merge_global(qual, sub)
        for err in sub.errors:
            if err not in self.report.errors:
                self.report.errors.append(err)
        for member in sub.members:
            if member not in self.report.members:
                self.report.members.append(member)
        for note in sub.notes:
            if note not in self.report.notes:
                self.report.notes.append(note)

    def scan_one(self, stream: IO[bytes], label: str) -> bool:
        """Walk one pickle up to its STOP; False when the walk had to stop early."""
        stack: list[Any] = []
        memo: dict[int, Any] = {}
        proto = 0
        size = _stream_size(stream)

        def pop() -> Any:
            if not stack:
                raise _WalkError("stack underflow")
            return stack.pop()

        def pop_mark() -> list[Any]:
            items: list[Any] = []
            while stack:
                top = stack.pop()
                if top is _MARK:
                    items.reverse()
                    return items
                items.append(top)
            raise _WalkError("MARK expected but not found")

        pos: int | None = stream.tell()
        arg: Any
        try:
            for op, arg, pos in pickletools.genops(stream):
                name = op.name
                if name == "PROTO":
                    proto = int(arg)
                    if proto > 5:
                        raise _WalkError(f"unsupported pickle protocol {proto}")
                elif name in _STR_OPS or name in _BYTES_OPS or name in _NUM_OPS:
                    stack.append(arg)
                elif name == "NONE":
                    stack.append(None)
                elif name in ("NEWTRUE", "NEWFALSE"):
                    stack.append(name == "NEWTRUE")
                elif name == "MARK":
                    stack.append(_MARK)
                elif name in _PUT_OPS:
                    if not stack:
                        raise _WalkError("PUT on an empty stack")
                    memo[int(arg)] = stack[-1]
                elif name == "MEMOIZE":
                    if not stack:
                        raise _WalkError("MEMOIZE on an empty stack")
                    memo[len(memo)] = stack[-1]
                elif name in _GET_OPS:
                    if int(arg) not in memo:
                        raise _WalkError(f"memo key {arg} read before it was written")
                    stack.append(memo[int(arg)])
                elif name in ("GLOBAL", "INST"):
                    module, _, gname = str(arg).partition(" ")
                    self.add_global(module, gname)
                    glob = _Global(module, gname)
                    if name == "INST":
                        stack.append(_Obj(glob, tuple(pop_mark())))
                    else:
                        stack.append(glob)
                elif name == "STACK_GLOBAL":
                    gname, module = pop(), pop()
                    if isinstance(module, str) and isinstance(gname, str):
                        self.add_global(module, gname)
                        stack.append(_Global(module, gname))
                    else:
                        self.add_dangerous_marker(
                            f"<STACK_GLOBAL with non-constant operands at byte {pos}>"
                        )
                        stack.append(_Opaque())
                elif name in ("EXT1", "EXT2", "EXT4"):
                    self.add_dangerous_marker(f"<copyreg extension code {arg}>")
                    stack.append(_Opaque())
                elif name == "EMPTY_TUPLE":
                    stack.append(())
                elif name == "TUPLE":
                    stack.append(tuple(pop_mark()))
                elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                    n = int(name[-1])
                    items = [pop() for _ in range(n)]
                    stack.append(tuple(reversed(items)))
                elif name == "EMPTY_LIST":
                    stack.append([])
                elif name == "LIST":
                    stack.append(pop_mark())
                elif name == "APPEND":
                    value = pop()
                    if stack and isinstance(stack[-1], list):
                        stack[-1].append(value)
                elif name == "APPENDS":
                    values = pop_mark()
                    if stack and isinstance(stack[-1], list):
                        stack[-1].extend(values)
                elif name == "EMPTY_DICT":
                    stack.append({})
                elif name == "DICT":
                    items = pop_mark()
                    stack.append(_pairs_to_dict(items))
                elif name == "SETITEM":
                    value, key = pop(), pop()
                    if stack and isinstance(stack[-1], dict):
                        _dict_set(stack[-1], key, value)
                elif name == "SETITEMS":
                    items = pop_mark()
                    if stack and isinstance(stack[-1], dict):
                        stack[-1].update(_pairs_to_dict(items))
                elif name == "POP":
                    pop()
                elif name == "POP_MARK":
                    pop_mark()
                elif name == "DUP":
                    if not stack:
                        raise _WalkError("DUP on an empty stack")
                    stack.append(stack[-1])
                elif name == "REDUCE":
                    args, func = pop(), pop()
                    obj = _Obj(func, args)
                    self._nested_payload(obj, label)
                    stack.append(obj)
                elif name == "NEWOBJ":
                    args, cls = pop(), pop()
                    stack.append(_Obj(cls, args))
                elif name == "NEWOBJ_EX":
                    _kwargs, args, cls = pop(), pop(), pop()
                    stack.append(_Obj(cls, args))
                elif name == "OBJ":
                    items = pop_mark()
                    stack.append(_Obj(items[0] if items else _Opaque(), tuple(items[1:])))
                elif name == "BUILD":
                    state = pop()
                    if not stack:
                        raise _WalkError("BUILD on an empty stack")
                    target = stack[-1]
                    if isinstance(target, _Obj):
                        target.state = state
                        if _is_global(target.func, "joblib.numpy_pickle.NumpyArrayWrapper"):
                            self._skip_joblib_array(stream, target, label, size)
                elif name == "STOP":
                    return True
                else:
                    self._generic(op, stack, pop, pop_mark)
        except _WalkError as exc:
            self.error(label, f"{exc} at byte {pos}")
            return False
        except ValueError as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if any(w in text for w in ("exhausted", "remain", "not enough data", "no newline")):
                self.error(label, f"truncated pickle stream ({text})")
            else:
                self.error(label, f"malformed pickle stream ({text})")
            return False
        self.error(label, "truncated pickle stream (no STOP opcode)")
        return False

    @staticmethod
    def _generic(op: Any, stack: list[Any], pop: Any, pop_mark: Any) -> None:
        """Apply an opcode's documented stack effect with opaque results."""
        before = list(op.stack_before)
        if pickletools.markobject in before:
            pop_mark()
            before = before[: before.index(pickletools.markobject)]
        for _ in before:
            pop()
        for _ in op.stack_after:
            stack.append(_Opaque())

    def _nested_payload(self, obj: _Obj, label: str) -> None:
        """``torch.storage._load_from_bytes(b)`` unpickles ``b``: inspect it too."""
        if not _is_global(obj.func, "torch.storage._load_from_bytes"):
            return
        args = obj.args
        payload = args[0] if isinstance(args, tuple) and args else None
        if isinstance(payload, _Obj) and _is_global(payload.func, "_codecs.encode"):
            inner = payload.args
            if isinstance(inner, tuple) and inner and isinstance(inner[0], str):
                payload = inner[0].encode("latin-1")
        if not isinstance(payload, (bytes, bytearray)):
            return
        if self.depth >= _MAX_NESTING:
            self.error(label, "nested payloads too deep to inspect")
            return
        sub = PickleReport()
        inner_label = f"{label}!_load_from_bytes" if label else "_load_from_bytes"
        _scan_bytes(bytes(payload), inner_label, sub, self.depth + 1)
        self.merge(sub)

    def _skip_joblib_array(self, stream: IO[bytes], wrapper: _Obj, label: str, size: int) -> None:
        """Step over the raw array data joblib writes right after a NumpyArrayWrapper."""
        state = wrapper.state if isinstance(wrapper.state, dict) else {}
        dtype = state.get("dtype")
        shape = state.get("shape")
        itemsize, has_object = _dtype_itemsize(dtype)
        if has_object:
            # object arrays are written as a nested protocol-5 pickle
            self.scan_one(stream, f"{label}[joblib object array]")
            return
        if (
            itemsize is None
            or not isinstance(shape, tuple)
            or not all(isinstance(s, int) and s >= 0 for s in shape)
        ):
            raise _WalkError("cannot size a joblib array payload")
        nbytes = math.prod(shape) * itemsize
        if state.get("numpy_array_alignment_bytes") is not None:
            pad = stream.read(1)
            if not pad:
                raise ValueError("joblib array padding byte missing: stream exhausted")
            stream.seek(pad[0], os.SEEK_CUR)
        end = stream.tell() + nbytes
        if end > size:
            raise ValueError(
                f"joblib array data needs {nbytes} bytes but only {size - stream.tell()} remain"
            )
        stream.seek(end)


class _WalkError(Exception):
    pass


def _is_global(obj: Any, qualname: str) -> bool:
    return isinstance(obj, _Global) and obj.qualname == qualname


def _dict_set(d: dict[Any, Any], key: Any, value: Any) -> None:
    with contextlib.suppress(TypeError):  # unhashable placeholder key (a list, a dict)
        d[key] = value


def _pairs_to_dict(items: list[Any]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for i in range(0, len(items) - 1, 2):
        _dict_set(out, items[i], items[i + 1])
    return out


def _dtype_itemsize(dtype: Any) -> tuple[int | None, bool]:
    """Item size of a symbolically rebuilt ``numpy.dtype(...)``; (None, False) if unknown."""
    if not isinstance(dtype, _Obj):
        return None, False
    args = dtype.args if isinstance(dtype.args, tuple) else ()
    code = args[0] if args and isinstance(args[0], str) else None
    if code is None:
        return None, False
    m = _DTYPE_RE.fullmatch(code)
    if m is None:
        return None, False
    kind, digits = m.group(1), m.group(2)
    if kind == "O":
        return None, True
    state = dtype.state
    if isinstance(state, tuple) and len(state) >= 6 and isinstance(state[5], int) and state[5] > 0:
        return state[5], False  # flexible/structured dtypes carry their element size
    if digits:
        return int(digits) * (4 if kind == "U" else 1), False
    return _DTYPE_CHAR_SIZE.get(kind), False


def _stream_size(stream: IO[bytes]) -> int:
    pos = stream.tell()
    stream.seek(0, os.SEEK_END)
    end = stream.tell()
    stream.seek(pos)
    return end


# --------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------


def _compression(head: bytes) -> str | None:
    """The joblib-style whole-file compression ``head`` announces, if any."""
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:3] == b"BZh":
        return "bz2"
    if head[:5] == b"\xfd7zXZ":
        return "xz"
    if head[:2] == b"\x5d\x00":
        return "lzma"
    if head[:4] == b"\x04\x22\x4d\x18":
        return "lz4"
    if len(head) >= 2 and head[0] == 0x78 and (head[0] * 256 + head[1]) % 31 == 0:
        return "zlib"
    return None


def _decompress(data: bytes, codec: str) -> bytes:
    """Undo whole-file compression in memory, bounded by ``MAX_DECOMPRESSED_BYTES``."""
    if codec == "lz4":
        raise _WalkError("lz4-compressed file: decompress it first to inspect it")
    try:
        if codec == "zlib":
            d = zlib.decompressobj()
            out = d.decompress(data, MAX_DECOMPRESSED_BYTES)
            if d.unconsumed_tail:
                raise _WalkError("decompressed size exceeds the inspection limit")
            if not d.eof:
                raise _WalkError("zlib-compressed data is truncated")
            return out
        if codec == "gzip":
            return _bounded_read(gzip.GzipFile(fileobj=io.BytesIO(data)))
        if codec == "bz2":
            return _bounded_read(bz2.BZ2File(io.BytesIO(data)))
        fmt = lzma.FORMAT_XZ if codec == "xz" else lzma.FORMAT_ALONE
        return _bounded_read(lzma.LZMAFile(io.BytesIO(data), format=fmt))
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise _WalkError(f"{codec}-compressed data is truncated or corrupt ({exc})") from exc


def _bounded_read(fh: Any) -> bytes:
    with fh:
        out = fh.read(MAX_DECOMPRESSED_BYTES + 1)
    if len(out) > MAX_DECOMPRESSED_BYTES:
        raise _WalkError("decompressed size exceeds the inspection limit")
    return out


def _zip_format(names: list[str], read: Any) -> PickleFormat:
    if any(n.endswith("constants.pkl") for n in names) and any("/code/" in f"/{n}" for n in names):
        return "torchscript"
    for n in names:
        if n.endswith("archive_format"):
            try:
                if read(n).strip() == b"pt2":
                    return "torch-export"
            except (OSError, zipfile.BadZipFile, KeyError):
                pass
    if any(n.endswith(".json") and "/models/" in f"/{n}" for n in names):
        return "torch-export"
    if any(n.endswith("pkl") for n in names):
        return "torch-zip"
    return "not-pickle"


def _pt2_raw_members(zf: zipfile.ZipFile) -> set[str]:
    """Members of a .pt2 archive that hold raw tensor bytes, not pickles."""
    raw: set[str] = set()
    for info in zf.infolist():
        n = info.filename
        if not n.endswith("_config.json"):
            continue
        try:
            cfg = json.loads(zf.read(info))
        except (ValueError, OSError, zipfile.BadZipFile):
            continue
        base = n.rsplit("/", 1)[0]
        entries = cfg.get("config", {}) if isinstance(cfg, dict) else {}
        for meta in entries.values() if isinstance(entries, dict) else ():
            if isinstance(meta, dict) and not meta.get("use_pickle", False):
                path = meta.get("path_name")
                if isinstance(path, str) and not path.startswith(("custom_obj", "opaque_obj")):
                    raw.add(f"{base}/{path}")
    return raw


def _scan_zip(zf: zipfile.ZipFile, label: str, report: PickleReport, depth: int) -> PickleFormat:
    names = [i.filename for i in zf.infolist()]
    fmt = _zip_format(names, zf.read)
    walker = _Walker(report, depth)
    raw = _pt2_raw_members(zf) if fmt == "torch-export" else set()
    for info in zf.infolist():  # infolist, not namelist: duplicate names are all scanned
        n = info.filename
        member_label = f"{label}!{n}" if label else n
        is_pkl = n.endswith("pkl")
        candidate = (
            fmt == "torch-export"
            and "/data/" in f"/{n}"
            and not n.endswith(".json")
            and "/.data/" not in f"/{n}"
            and n not in raw
        )
        if not (is_pkl or candidate) or info.is_dir():
            continue
        if info.file_size > MAX_MEMBER_BYTES:
            walker.error(member_label, f"member too large to inspect ({info.file_size} bytes)")
            continue
        try:
            data = zf.read(info)
        except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
            walker.error(member_label, f"cannot read zip member ({exc})")
            continue
        if is_pkl:
            report.members.append(member_label)
            walker.scan_one(io.BytesIO(data), member_label)
        elif data.startswith(ZIP_MAGIC) or data[:1] == b"\x80":
            if depth >= _MAX_NESTING:
                walker.error(member_label, "nested archives too deep to inspect")
                continue
            sub = PickleReport()
            _scan_bytes(data, member_label, sub, depth + 1)
            walker.merge(sub)
    native = [n for n in names if n.endswith((".so", ".dll", ".dylib", ".pyd"))]
    if native:
        report.notes.append(
            f"{label or 'archive'}: contains native libraries, not inspected: {', '.join(native[:4])}"
        )
    if fmt == "not-pickle":
        report.notes.append(f"{label or 'archive'}: zip archive without pickle members")
    return fmt


def _scan_bytes(data: bytes, label: str, report: PickleReport, depth: int) -> PickleFormat:
    """Scan an in-memory file (raw pickle, compressed joblib or zip archive)."""
    if data.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                return _scan_zip(zf, label, report, depth)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            report.errors.append(f"{label or 'file'}: truncated or corrupt zip archive ({exc})")
            return "torch-zip"
    return _scan_raw(io.BytesIO(data), label, report, depth)


class _BoundedReader:
    """A seekable binary stream whose ``read(n)`` never asks for more than remains.

    ``pickletools`` trusts length prefixes from the file; a forged 2**60-byte length
    would otherwise make a buffered file try to allocate that much.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._size = _stream_size(raw)

    def read(self, n: int = -1) -> bytes:
        remaining = max(self._size - self._raw.tell(), 0)
        return self._raw.read(remaining if n is None or n < 0 else min(n, remaining))

    def readline(self) -> bytes:
        return self._raw.readline()

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(pos, whence)


def _scan_raw(stream: IO[bytes], label: str, report: PickleReport, depth: int) -> PickleFormat:
    name = label or "file"
    start = stream.tell()
    head = stream.read(8)
    stream.seek(start)
    if not head:
        report.errors.append(f"{name}: empty")
        return "not-pickle"
    codec = None if head[:1] == b"\x80" else _compression(head)
    if codec is not None:
        try:
            data = _decompress(stream.read(), codec)
        except _WalkError as exc:
            report.errors.append(f"{name}: {exc}")
            return "pickle"
        report.notes.append(f"{name}: {codec}-compressed (joblib style)")
        stream = io.BytesIO(data)
        head = data[:8]
    has_proto = len(head) >= 2 and head[0] == 0x80 and head[1] <= 5
    _Walker(report, depth).scan_raw(_BoundedReader(stream), label)  # type: ignore[arg-type]
    if not has_proto and not report.globals and report.errors:
        # Not a pickle at all (text, ONNX, random bytes): say so instead of listing errors.
        reason = report.errors[0]
        report.errors.clear()
        report.members.clear()
        report.notes.append(f"not a pickle stream ({reason})")
        return "not-pickle"
    return "pickle"


def inspect_pickle(source: str | os.PathLike[str] | bytes) -> PickleReport:
    """List every global a pickle-based file would import, without executing anything.

    ``source`` is a path or the file's bytes: a raw pickle (protocols 0-5, legacy
    ``torch.save``, joblib), a ``torch.save`` zip, a TorchScript archive or a
    ``torch.export`` ``.pt2`` archive. Raises :class:`ModelLoadError` when a path does
    not exist or is a directory; problems inside the file go to ``report.errors``.
    """
    report = PickleReport()
    if isinstance(source, (bytes, bytearray, memoryview)):
        report.format = _scan_bytes(bytes(source), "", report, 0)
        return report
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"file not found: {path}")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not a file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
            fh.seek(0)
            if magic == ZIP_MAGIC:
                try:
                    with zipfile.ZipFile(fh) as zf:
                        report.format = _scan_zip(zf, "", report, 0)
                except (zipfile.BadZipFile, EOFError) as exc:
                    report.format = "torch-zip"
                    report.errors.append(f"truncated or corrupt zip archive ({exc})")
            else:
                report.format = _scan_raw(fh, "", report, 0)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if report.dangerous:
        logger.info("%s imports dangerous globals: %s", path, ", ".join(report.dangerous))
    return report
