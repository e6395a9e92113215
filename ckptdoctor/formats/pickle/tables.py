"""The tables globals are judged by: torch's weights_only allowlist, a deny list, Python 2 names.

``scan`` gives its verdicts from them; the readers use the deny list and the names too (a
refusal that names ``posix.system`` must not invite the user to allow it).

The allowlist is copied from ``_get_allowed_globals()`` in ``torch/_weights_only_unpickler.py``
(torch 2.13) rather than imported, because the scanner must work without torch and must not
change its answer when the installed torch changes. Note that it holds ``builtins.set``,
``bytearray`` and ``complex`` but not ``frozenset``, and that ``torch.cuda.*`` storage/tensor
classes are allowed (loading them on a CPU machine is a device question, not a safety one).

The deny list names what can run code or touch the system when *imported and called* by an
unpickler. It is deliberately broader than torch's own ``_blocklisted_modules`` (sys, os,
posix, nt), which only matter after a user allowlists something; here they decide the verdict
"dangerous" even when a name is merely referenced (a referenced ``os.system`` is a gadget
waiting for a later REDUCE on a computed callable).
"""

from __future__ import annotations

import _compat_pickle
import re


def _names(module: str, *names: str) -> set[str]:
    return {f"{module}.{n}" for n in names}


_TYPES = (
    "BFloat16",
    "Bool",
    "Byte",
    "Char",
    "ComplexDouble",
    "ComplexFloat",
    "Double",
    "Float",
    "Half",
    "Int",
    "Long",
    "Short",
)
_DENSE_TENSOR_TYPES = tuple(t for t in _TYPES if not t.startswith("Complex"))
_SPARSE_TENSOR_TYPES = tuple(t for t in _DENSE_TENSOR_TYPES if t != "Bool")

_DTYPES = (
    "bfloat16",
    "bits16",
    "bits1x8",
    "bits2x4",
    "bits4x2",
    "bits8",
    "bool",
    "complex128",
    "complex32",
    "complex64",
    "float16",
    "float32",
    "float4_e2m1fn_x2",
    "float64",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "int16",
    "int32",
    "int64",
    "int8",
    "qint32",
    "qint8",
    "quint2x4",
    "quint4x2",
    "quint8",
    "uint16",
    "uint32",
    "uint64",
    "uint8",
    *(f"int{n}" for n in range(1, 8)),
    *(f"uint{n}" for n in range(1, 8)),
)

#: Exactly the keys of ``torch._weights_only_unpickler._get_allowed_globals()`` in torch 2.13.
WEIGHTS_ONLY_GLOBALS: frozenset[str] = frozenset(
    {
        "collections.OrderedDict",
        "collections.Counter",
        "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout",
        "torch.Size",
        "torch.Tensor",
        "torch.device",
        "_codecs.encode",
        "builtins.bytearray",
        "builtins.set",
        "builtins.complex",
        "torch._tensor._rebuild_from_type_v2",
        "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
    }
    | _names("torch", *_DTYPES)
    | _names("torch", *(f"{t}Storage" for t in _TYPES))
    | _names("torch", "QInt32Storage", "QInt8Storage", "QUInt2x4Storage", "QUInt4x2Storage", "QUInt8Storage")
    | _names("torch.cuda", *(f"{t}Storage" for t in _TYPES))
    | _names("torch", *(f"{t}Tensor" for t in _DENSE_TENSOR_TYPES))
    | _names("torch.cuda", *(f"{t}Tensor" for t in _DENSE_TENSOR_TYPES))
    | _names("torch.sparse", *(f"{t}Tensor" for t in _SPARSE_TENSOR_TYPES))
    | _names("torch.cuda.sparse", *(f"{t}Tensor" for t in _SPARSE_TENSOR_TYPES))
    | _names(
        "torch",
        "per_tensor_affine",
        "per_tensor_symmetric",
        "per_channel_affine",
        "per_channel_symmetric",
        "per_channel_affine_float_qparams",
    )
    | _names(
        "torch._utils",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
        "_rebuild_qtensor",
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_sparse_tensor",
        "_rebuild_meta_tensor_no_storage",
        "_rebuild_nested_tensor",
        "_rebuild_wrapper_subclass",
        "_rebuild_device_tensor_from_numpy",
        "_rebuild_device_tensor_from_cpu_tensor",
    )
)

#: Opcodes ``torch._weights_only_unpickler.Unpickler.load`` implements (it raises
#: "Unsupported operand" for any other). torch.save's default protocol 2 stays inside this set;
#: protocol 4/5 pickles (FRAME, SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL) do not.
WEIGHTS_ONLY_OPCODES: frozenset[str] = frozenset(
    {
        "GLOBAL",
        "NEWOBJ",
        "REDUCE",
        "BUILD",
        "APPEND",
        "APPENDS",
        "SETITEM",
        "SETITEMS",
        "MARK",
        "TUPLE",
        "TUPLE1",
        "TUPLE2",
        "TUPLE3",
        "NONE",
        "NEWFALSE",
        "NEWTRUE",
        "EMPTY_TUPLE",
        "EMPTY_LIST",
        "EMPTY_DICT",
        "EMPTY_SET",
        "BININT",
        "BININT1",
        "BININT2",
        "BINFLOAT",
        "BINUNICODE",
        "SHORT_BINSTRING",
        "BINPERSID",
        "BINGET",
        "LONG_BINGET",
        "BINPUT",
        "LONG_BINPUT",
        "LONG1",
        "PROTO",
        "STOP",
    }
)

# Whole modules (and their submodules) whose callables run code, spawn processes, touch files
# or the network, or unpickle further data.
_DENY_MODULES: tuple[str, ...] = (
    "os",
    "posix",
    "nt",
    "posixpath",
    "ntpath",
    "subprocess",
    "sys",
    "importlib",
    "runpy",
    "pickle",
    "_pickle",
    "pickletools",
    "shelve",
    "marshal",
    "shutil",
    "socket",
    "_socket",
    "ssl",
    "http",
    "urllib",
    "ftplib",
    "smtplib",
    "telnetlib",
    "code",
    "codeop",
    "pty",
    "tty",
    "webbrowser",
    "dill",
    "cloudpickle",
    "joblib",
    "ctypes",
    "_ctypes",
    "cffi",
    "multiprocessing",
    "_posixsubprocess",
    "signal",
    "_thread",
    "threading",
    "asyncio",
    "concurrent",
    "pdb",
    "bdb",
    "timeit",
    "trace",
    "profile",
    "cProfile",
    "doctest",
    "tempfile",
    "glob",
    "io",
    "_io",
    "zipimport",
    "pkgutil",
    "site",
    "sysconfig",
    "platform",
    "commands",
    "popen2",
    "types",
    "inspect",
    "gc",
    "atexit",
    "builtins.__import__",
    "distutils",
    "setuptools",
    "pip",
    "torch._C",
    "torch.ops",
    "torch.hub",
    "torch.jit",
    "torch.package",
    "torch.utils.cpp_extension",
    "torch._dynamo",
    "torch._inductor",
    "torch.fx",
    "torch.testing",
    "torch.distributed.rpc",
    "torch.multiprocessing",
    "torch.cuda.memory",
    "torch.compiler",
    "torch.export",
    "numpy.f2py",
    "numpy.distutils",
    "numpy.testing",
    "numpy.lib.npyio",
    "numpy.ctypeslib",
    "yaml",
    "jinja2",
    "IPython",
    "pandas.io",
    "__builtin__.eval",
)

# Builtins that run code, reach attributes or load data: denied under Python 3's `builtins` and
# Python 2's `__builtin__` alike (both names reach the same module through pickle's fix_imports).
_DANGEROUS_BUILTINS = (
    "eval", "exec", "execfile", "compile", "getattr", "setattr", "delattr", "__import__", "open", "breakpoint",
    "apply", "input", "globals", "locals", "vars", "dir", "help", "exit", "quit", "memoryview", "classmethod",
    "staticmethod", "property", "super", "type", "object.__new__", "reload", "file",
)

# Single names (not whole modules) that run code or load further untrusted data.
_DENY_NAMES: frozenset[str] = frozenset(
    _names("builtins", *_DANGEROUS_BUILTINS)
    | _names("__builtin__", *_DANGEROUS_BUILTINS)
    | _names("functools", "partial", "partialmethod", "reduce", "wraps", "update_wrapper")
    | _names("operator", "attrgetter", "methodcaller", "itemgetter", "call", "getitem", "setitem")
    | _names("copyreg", "_reconstructor_unsafe", "add_extension")
    | {
        "torch.load",
        "torch.serialization.load",
        "torch.serialization._load",
        "torch.serialization._legacy_load",
        "torch.storage._load_from_bytes",
        "torch.load_state_dict_from_url",
        "torch.utils.model_zoo.load_url",
        "numpy.load",
        "numpy.loadtxt",
        "numpy.fromfile",
        "numpy.testing._private.utils.runstring",
        "numpy.core.multiarray._reconstruct_unsafe",
        "codecs.open",
        "codecs.decode",
        "pathlib.Path.write_text",
        "pathlib.Path.write_bytes",
        "pathlib.Path.unlink",
        "pathlib.Path.open",
        "pathlib.Path.touch",
        "logging.config.listen",
    }
)

#: TorchScript's pickler rebuilds typed lists through these (torch/jit/_pickle.py); they only
#: return their argument, so they are data constructors although torch.jit is denied.
TORCHSCRIPT_BUILDERS: frozenset[str] = frozenset(
    _names(
        "torch.jit._pickle",
        "build_intlist",
        "build_tensorlist",
        "build_doublelist",
        "build_boollist",
        "build_tensor_from_id",
        "restore_type_tag",
    )
)

#: Callables that build plain data (numpy arrays, dates, paths, argparse namespaces, Python
#: containers). Calling them is not an attack by itself, so they get ``unknown-class``
#: instead of ``dangerous`` -- still not weights_only-loadable, hence still unsafe.
DATA_CONSTRUCTORS: frozenset[str] = frozenset(
    _names(
        "builtins",
        "frozenset",
        "slice",
        "range",
        "list",
        "tuple",
        "dict",
        "bytes",
        "str",
        "int",
        "float",
        "bool",
        "object",
    )
    | _names("__builtin__", "frozenset", "slice", "range", "object")
    | _names("collections", "defaultdict", "deque", "namedtuple")
    | _names("numpy.core.multiarray", "_reconstruct", "scalar")
    | _names("numpy._core.multiarray", "_reconstruct", "scalar")
    | _names("numpy", "dtype", "ndarray")
    | _names("datetime", "datetime", "date", "time", "timedelta", "timezone")
    | _names("decimal", "Decimal")
    | _names("fractions", "Fraction")
    | _names("uuid", "UUID")
    | _names("pathlib", "PurePath", "PurePosixPath", "PureWindowsPath", "PosixPath", "WindowsPath", "Path")
    | _names("argparse", "Namespace")
    | _names("enum", "Enum")
    | _names("re", "_compile")
    # torch.distributed.checkpoint's .metadata pickles this Enum by value (filesystem.py writes
    # the metadata with plain pickle.dump, read back with pickle.load).
    | {"torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING"}
    | TORCHSCRIPT_BUILDERS
)

#: Functions that instantiate their *first argument* as a class, the way protocol 0/1 pickles
#: do for plain objects (``copyreg._reconstructor(cls, object, None)``, see
#: ``object.__reduce_ex__`` in CPython's Objects/typeobject.c).
RECONSTRUCTORS: frozenset[str] = frozenset(
    {"copyreg._reconstructor", "copy_reg._reconstructor", "copyreg.__newobj__", "copyreg.__newobj_ex__"}
)

_DUNDER = re.compile(r"^__\w+__$")


def is_denied(module: str, qualname: str) -> bool:
    """True when ``module.qualname``, or the object it reaches by attribute traversal, is denied.

    Protocol 4 lets ``find_class`` walk dotted names (``pickle._getattribute``), so
    ``pathlib`` + ``os.system`` imports ``pathlib`` and returns ``pathlib.os.system`` --
    the same function as ``os.system``. Every suffix of a dotted *qualname* is therefore checked
    as if it were a top-level name, and any dunder attribute in it (``__globals__``,
    ``__builtins__``, ``__subclasses__``, ``__new__``) counts as traversal into internals.
    The module part is only matched as a whole (``mymodel.code`` is not the stdlib ``code``).
    """
    full = f"{module}.{qualname}"
    if full in RECONSTRUCTORS or full in TORCHSCRIPT_BUILDERS:
        return False
    if _matches(full):
        return True
    parts = qualname.split(".")
    if any(_matches(".".join(parts[start:])) for start in range(len(parts) - 1)):
        return True
    return any(_DUNDER.match(p) for p in parts)


def _matches(candidate: str) -> bool:
    if candidate in _DENY_NAMES:
        return True
    return any(candidate == mod or candidate.startswith(mod + ".") for mod in _DENY_MODULES)


def python3_name(module: str, name: str) -> tuple[str, str]:
    """The global a Python 3 unpickler resolves ``module.name`` to.

    Protocol 2 pickles (what ``torch.save`` writes) name some globals as Python 2 did
    (``__builtin__.xrange`` for ``builtins.range``, ``copy_reg`` for ``copyreg``); both ``pickle``
    (``fix_imports``) and torch's weights-only unpickler rename them before looking them up, so
    every judgement, message and allowance here uses the Python 3 name too.
    """
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def python2_name(module: str, name: str) -> tuple[str, str]:
    """How a protocol 2 pickle names the Python 3 global ``module.name`` (``pickle``'s
    ``fix_imports``, which ``torch.save`` leaves on): the inverse of :func:`python3_name`."""
    if (module, name) in _compat_pickle.REVERSE_NAME_MAPPING:
        return _compat_pickle.REVERSE_NAME_MAPPING[(module, name)]
    return _compat_pickle.REVERSE_IMPORT_MAPPING.get(module, module), name


#: What ``torch.distributed.checkpoint`` pickles into a ``.metadata`` file (``filesystem.py`` writes it
#: with plain ``pickle.dump`` and reads it with plain ``pickle.load``, never ``weights_only``):
#: its own dataclasses and enum, and the checkpoint id as a ``pathlib`` path. Building them runs
#: no code beyond setting fields, so a ``.metadata`` holding only these (and weights-only names)
#: is what DCP itself writes.
DCP_METADATA_GLOBALS: frozenset[str] = frozenset(
    _names("torch.distributed.checkpoint.metadata", "Metadata", "MetadataIndex", "ChunkStorageMetadata",
           "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties", "StorageMeta",
           "_MEM_FORMAT_ENCODING")
    | _names("torch.distributed.checkpoint.filesystem", "_StorageInfo", "_StoragePrefix")
    | _names("pathlib", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path")
)
