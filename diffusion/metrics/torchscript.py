"""Reads the weights of a TorchScript file (`torch.jit.save`) safely, without torch.

The file is PyTorch's zip serialization (torch/csrc/jit/serialization/export_module.cpp and
import.cpp; tensors as in torch/serialization.py and torch/_utils.py), under one folder <prefix>:

  <prefix>/data.pkl         pickle (protocol 2) of the module tree: each module is an object of
                            class `__torch__.<module path>.<Class>` (NEWOBJ, then BUILD with the
                            dict of its attributes: submodules, tensors, ints, ...)
  <prefix>/data/<key>       raw bytes of storage <key>, in the byte order that <prefix>/byteorder
                            names (little endian when the file is absent, as in older archives)
  <prefix>/code/__torch__/<module path>.py
                            TorchScript source of the classes; each class states which of its
                            attributes are `__parameters__ = [...]` and `__buffers__ = [...]`
  <prefix>/constants.pkl, version, ...   not needed for the weights

A tensor in data.pkl is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, backward_hooks[, metadata])`, its storage the persistent id ('storage',
torch.<Type>Storage, key, location, numel). Unpickling with `pickle.load` would import and call
any global the file names (`os.system` as well as `torch._utils._rebuild_tensor_v2`), so
`_Unpickler` admits only the names listed in `_allowed_globals` and refuses every other one
with `UnsafeArchiveError`; module classes become inert `ScriptObject`s that keep their state.
The source under code/ is read as text for the two lists above (`ast.literal_eval`), never run.

    state = torchscript.load_state_dict("default_1.pt")    # {"net.layers.conv.weight": array, ...}

gives the arrays of `torch.jit.load(path).state_dict()`, with the same names and order.
A `torch.save` archive (the same layout, a dict instead of a module tree) gives its arrays too.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import BinaryIO, NamedTuple

import numpy as np

# torch.<Name>Storage -> numpy dtype (byte order added from the archive); bfloat16 is read as
# 16-bit words and widened to float32, which represents every bfloat16 exactly.
STORAGE_DTYPES = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "BFloat16Storage": "u2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "b1",
}


class UnsafeArchiveError(pickle.UnpicklingError):
    """The pickle names a global or a persistent id that reading weights never needs."""


class ScriptObject:
    """Stands for an object of a TorchScript class (`__torch__.*`): its class name and state."""

    torch_class = "__torch__"

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"ScriptObject({self.torch_class})"


class _StorageType(NamedTuple):          # immutable: BUILD cannot change what a storage holds
    name: str
    dtype: np.dtype


class _Storage(NamedTuple):
    key: str
    name: str
    array: np.ndarray                    # 1-D, read-only, in the archive's byte order


class _Unpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals of a weights file; see the module doc."""

    def __init__(self, file: BinaryIO, archive: zipfile.ZipFile, prefix: str, label: str):
        super().__init__(file)
        self.archive, self.prefix, self.label = archive, prefix, label
        self.byteorder = _byteorder(archive, prefix)
        self.storages: dict[str, _Storage] = {}
        self.classes: dict[str, type] = {}         # per load: a BUILD cannot reach another load
        self.allowed = _allowed_globals(self)

    def find_class(self, module: str, name: str):
        qualified = f"{module}.{name}"
        if qualified in self.allowed:
            return self.allowed[qualified]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, np.dtype(self.byteorder + STORAGE_DTYPES[name]))
        if (module == "__torch__" or module.startswith("__torch__.")) and name.isidentifier():
            if qualified not in self.classes:
                self.classes[qualified] = type(name, (ScriptObject,), {"torch_class": qualified})
            return self.classes[qualified]
        raise UnsafeArchiveError(
            f"{self.label}: data.pkl refuses global {qualified!r}: a TorchScript weights file "
            f"needs only {', '.join(sorted(self.allowed))}, torch.<Type>Storage and __torch__.* "
            f"classes, so this file would import or call something else and was not loaded.")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and type(pid[4]) is int and pid[4] >= 0):
            raise UnsafeArchiveError(f"{self.label}: data.pkl refuses persistent id {pid!r}; "
                                     f"only ('storage', torch.<Type>Storage, key, location, "
                                     f"numel) is read.")
        _, storage_type, key, _, numel = pid
        if key not in self.storages:
            path = f"{self.prefix}/data/{key}"
            try:
                raw = self.archive.read(path)
            except KeyError:
                raise ValueError(f"{self.label}: storage {path} is missing.") from None
            if len(raw) < numel * storage_type.dtype.itemsize:
                raise ValueError(f"{self.label}: storage {path} holds {len(raw)} bytes, fewer "
                                 f"than {numel} x {storage_type.name}.")
            array = np.frombuffer(raw, storage_type.dtype, count=numel)
            self.storages[key] = _Storage(key, storage_type.name, array)
        return self.storages[key]

    def rebuild_tensor(self, storage, offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> np.ndarray:
        """torch._utils._rebuild_tensor_v2 as numpy: the strided view of `storage`, copied."""
        return _rebuild_tensor(storage, offset, size, stride)

    def rebuild_parameter(self, data, requires_grad=False, backward_hooks=None) -> np.ndarray:
        if not isinstance(data, np.ndarray):
            raise ValueError(f"{self.label}: a parameter wraps {type(data).__name__}, not a "
                             f"tensor.")
        return data

    def identity(self, value, *type_tag):
        return value


def _allowed_globals(unpickler: _Unpickler) -> dict:
    """The globals a weights file may name. Bound methods and C types: BUILD cannot alter them."""
    return {
        "torch._utils._rebuild_tensor_v2": unpickler.rebuild_tensor,
        "torch._utils._rebuild_parameter": unpickler.rebuild_parameter,
        "collections.OrderedDict": OrderedDict,
        # TorchScript tags typed lists; torch.jit._pickle returns the value unchanged
        **{f"torch.jit._pickle.{name}": unpickler.identity for name in (
            "build_intlist", "build_doublelist", "build_boollist", "build_tensorlist",
            "restore_type_tag")},
    }


def _rebuild_tensor(storage: _Storage, offset: int, size, stride) -> np.ndarray:
    """The tensor (size, stride in elements, from element `offset`) of `storage`, as a new
    native-endian array; refuses a view that reaches outside the storage."""
    size, stride = tuple(size), tuple(stride)
    ints = (offset, *size, *stride)
    if (not isinstance(storage, _Storage) or len(size) != len(stride)
            or any(type(v) is not int or v < 0 for v in ints)):
        raise ValueError(f"Not a tensor: storage {storage!r}, offset {offset!r}, size {size!r}, "
                         f"stride {stride!r}.")
    data = storage.array
    if 0 in size:
        out = np.zeros(size, data.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= data.size:
            raise ValueError(f"A tensor of size {size}, stride {stride} from offset {offset} "
                             f"reaches element {last} of storage {storage.key} "
                             f"({data.size} elements).")
        view = np.lib.stride_tricks.as_strided(
            data[offset:], size, [s * data.itemsize for s in stride], writeable=False)
        out = view.copy()
    out = out.astype(out.dtype.newbyteorder("="), copy=False)
    if storage.name == "BFloat16Storage":
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _byteorder(archive: zipfile.ZipFile, prefix: str) -> str:
    try:
        order = archive.read(f"{prefix}/byteorder").decode().strip()
    except KeyError:
        return "<"
    if order not in ("little", "big"):
        raise ValueError(f"Unknown byte order {order!r} in {prefix}/byteorder.")
    return "<" if order == "little" else ">"


def _prefix(archive: zipfile.ZipFile, label: str) -> str:
    roots = sorted({n.rpartition("/")[0] for n in archive.namelist()
                    if n.endswith("/data.pkl") and n.count("/") == 1})
    if len(roots) != 1:
        raise ValueError(f"{label} is not a TorchScript archive: expected one <folder>/data.pkl, "
                         f"found {len(roots)}.")
    return roots[0]


def _open(source: str | os.PathLike | bytes | BinaryIO) -> tuple[zipfile.ZipFile, str]:
    if isinstance(source, bytes | bytearray):
        source, label = io.BytesIO(source), "TorchScript bytes"
    else:
        label = os.fspath(source) if isinstance(source, str | os.PathLike) else "TorchScript file"
    if isinstance(source, str | os.PathLike) and not os.path.exists(source):
        raise FileNotFoundError(f"No TorchScript file at {label}.")
    try:
        return zipfile.ZipFile(source), label
    except zipfile.BadZipFile:
        raise ValueError(f"{label} is not a TorchScript archive (not a zip file; an archive of "
                         f"torch < 1.6 or a plain pickle is not read).") from None


def load_state_dict(source: str | os.PathLike | bytes | BinaryIO) -> dict[str, np.ndarray]:
    """`torch.jit.load(source).state_dict()` as numpy arrays: each module's parameters, then its
    buffers (in attribute order; None entries left out), then its submodules', named by their
    dotted attribute path. A torch.save'd dict of tensors is returned as it is."""
    archive, label = _open(source)
    with archive:
        prefix = _prefix(archive, label)
        with archive.open(f"{prefix}/data.pkl") as f:
            root = _Unpickler(f, archive, prefix, label).load()
        if isinstance(root, dict):
            if not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in root.items()):
                raise ValueError(f"{label}: a torch.save archive of something other than a "
                                 f"dict of tensors.")
            return dict(root)
        state: dict[str, np.ndarray] = {}
        _walk(root, "", _Declarations(archive, prefix, label), state)
        return state


def _walk(module, name: str, declarations: _Declarations, state: dict) -> None:
    if not isinstance(module, ScriptObject) or not isinstance(getattr(module, "state", None),
                                                               dict):
        raise ValueError(f"{declarations.label}: module {name or '<root>'} is "
                         f"{type(module).__name__}, not a TorchScript module with attributes.")
    is_module, parameters, buffers = declarations(module.torch_class)
    if not is_module:
        raise ValueError(f"{declarations.label}: {module.torch_class} is not a Module.")
    attributes = module.state
    for kind in (parameters, buffers):
        for key, value in attributes.items():
            if key in kind and value is not None:
                if not isinstance(value, np.ndarray):
                    raise ValueError(f"{declarations.label}: {name}{key} is declared a "
                                     f"parameter or buffer but holds {type(value).__name__}.")
                state[name + key] = value
    for key, value in attributes.items():
        if isinstance(value, ScriptObject) and declarations(value.torch_class)[0]:
            _walk(value, f"{name}{key}.", declarations, state)


class _Declarations:
    """class name -> (is a Module, __parameters__, __buffers__) from the archive's code/ (text)."""

    _CLASS = re.compile(r"^class (\w+)\((.*)\):\s*$", re.M)
    _LIST = re.compile(r"^\s+(__parameters__|__buffers__)\s*=\s*(\[.*?\])\s*$", re.M | re.S)

    def __init__(self, archive: zipfile.ZipFile, prefix: str, label: str):
        self.archive, self.prefix, self.label = archive, prefix, label
        self.files: dict[str, dict] = {}

    def __call__(self, torch_class: str) -> tuple[bool, frozenset, frozenset]:
        module, _, name = torch_class.rpartition(".")
        path = f"{self.prefix}/code/{module.replace('.', '/')}.py"
        if path not in self.files:
            try:
                self.files[path] = self._parse(self.archive.read(path).decode())
            except KeyError:
                self.files[path] = {}
        if name not in self.files[path]:
            raise ValueError(f"{self.label}: no declaration of class {torch_class} in {path}; "
                             f"is this a TorchScript module archive?")
        return self.files[path][name]

    def _parse(self, source: str) -> dict:
        classes = {}
        heads = list(self._CLASS.finditer(source))
        for head, nxt in zip(heads, [*heads[1:], None], strict=True):
            body = source[head.end():nxt.start() if nxt else len(source)]
            body = re.split(r"^\S", body, maxsplit=1, flags=re.M)[0]    # up to the next dedent
            lists = {kind: frozenset(ast.literal_eval(text))
                     for kind, text in self._LIST.findall(body)}
            classes[head.group(1)] = (head.group(2).strip() == "Module",
                                      lists.get("__parameters__", frozenset()),
                                      lists.get("__buffers__", frozenset()))
        return classes
