"""The torch-free TorchScript reader on hand-made archives: tensors rebuilt from storages,
the module walk, and the restricted unpickler's refusals. No torch needed.

`_Archive` writes a zip laid out as `torch.jit.save` does (<prefix>/data.pkl, data/<key>,
code/, constants.pkl, version), its data.pkl made of the same opcodes (GLOBAL, NEWOBJ + BUILD
for modules, `_rebuild_tensor_v2` with a BINPERSID storage for tensors).
"""

import io
import os
import pickle
import pickletools
import zipfile

import numpy as np
import pytest

from diffusion.metrics import torchscript


class T:
    """A tensor: `size`/`stride` (elements) from `offset` into storage `key` (a numpy array)."""

    def __init__(self, key, storage_type, offset, size, stride):
        self.key, self.storage_type = key, storage_type
        self.offset, self.size, self.stride = offset, tuple(size), tuple(stride)


class M:
    """A module of TorchScript class `cls` with attributes `attrs` (dict, in order)."""

    def __init__(self, cls, **attrs):
        self.cls, self.attrs = cls, attrs


def _global(qualified: str) -> bytes:
    module, _, name = qualified.rpartition(".")
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


class _Archive:
    def __init__(self, storages: dict):
        self.storages = storages                    # key -> 1-D numpy array

    def pickle(self, value) -> bytes:
        return b"\x80\x02" + self._value(value) + b"."

    def _value(self, v) -> bytes:
        if isinstance(v, M):
            items = b"".join(self._value(k) + self._value(x) for k, x in v.attrs.items())
            return _global(v.cls) + b")\x81}(" + items + b"ub"       # NEWOBJ, dict, BUILD
        if isinstance(v, T):
            numel = self.storages[v.key].size
            storage = (b"(" + self._value("storage") + _global(f"torch.{v.storage_type}")
                       + self._value(v.key) + self._value("cpu") + self._value(numel) + b"tQ")
            args = (storage + self._value(v.offset) + self._value(v.size)
                    + self._value(v.stride) + b"\x89" + _global("collections.OrderedDict")
                    + b")R")
            return _global("torch._utils._rebuild_tensor_v2") + b"(" + args + b"tR"
        if isinstance(v, bytes):                    # a raw opcode fragment
            return v
        return pickletools.optimize(pickle.dumps(v, protocol=2))[2:-1]

    def zip(self, root, code: dict | None = None, data_pkl: bytes | None = None,
            byteorder: str | None = None, prefix: str = "archive") -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr(f"{prefix}/data.pkl", data_pkl if data_pkl is not None
                       else self.pickle(root))
            for key, array in self.storages.items():
                z.writestr(f"{prefix}/data/{key}", array.tobytes())
            for path, text in (code or {}).items():
                z.writestr(f"{prefix}/code/__torch__/{path}", text)
            z.writestr(f"{prefix}/constants.pkl", b"\x80\x02).")
            z.writestr(f"{prefix}/version", b"3\n")
            if byteorder:
                z.writestr(f"{prefix}/byteorder", byteorder)
        return buf.getvalue()


NET_CODE = {"net.py": '''class Net(Module):
  __parameters__ = ["w", "b", ]
  __buffers__ = ["running_mean", "steps", ]
  w : Tensor
  b : Optional[Tensor]
  lookup : Tensor
  running_mean : Tensor
  steps : Tensor
  training : bool
  block : __torch__.net.Block
  def forward(self: __torch__.net.Net, x: Tensor) -> Tensor:
    return x
class Block(Module):
  __parameters__ = ["weight", ]
  __buffers__ = []
  weight : Tensor
  def forward(self: __torch__.net.Block, x: Tensor) -> Tensor:
    return x
'''}


def test_rebuilds_strided_offset_tensors_and_walks_parameters_then_buffers():
    base = np.arange(60, dtype=np.float32)
    a = _Archive({"0": base, "1": np.array([7, -3, 2**40], np.int64),
                  "2": np.arange(6, dtype=np.float64), "3": np.array([1.5, -2], np.float16)})
    root = M("__torch__.net.Net", training=True,
             running_mean=T("2", "DoubleStorage", 1, (2, 2), (1, 2)),   # column-major view
             w=T("0", "FloatStorage", 5, (3, 4), (10, 2)),              # offset, row stride
             b=None,                                                    # parameter left out
             lookup=T("0", "FloatStorage", 0, (2,), (1,)),              # not state: left out
             block=M("__torch__.net.Block", weight=T("3", "HalfStorage", 0, (2,), (1,))),
             steps=T("1", "LongStorage", 2, (), ()))                    # 0-d, from offset
    state = torchscript.load_state_dict(a.zip(root, NET_CODE))
    assert list(state) == ["w", "running_mean", "steps", "block.weight"]
    expected = {
        "w": base[5 + 10 * np.arange(3)[:, None] + 2 * np.arange(4)],     # offset + i*10 + j*2
        "running_mean": np.array([[1.0, 3.0], [2.0, 4.0]]),
        "steps": np.array(2**40, np.int64),
        "block.weight": np.array([1.5, -2], np.float16),
    }
    for key, want in expected.items():
        assert state[key].dtype == want.dtype and state[key].shape == want.shape, key
        np.testing.assert_array_equal(state[key], want, err_msg=key)
        assert state[key].flags.writeable and state[key].flags.c_contiguous


@pytest.mark.parametrize("storage_type,dtype", [
    ("FloatStorage", np.float32), ("DoubleStorage", np.float64), ("HalfStorage", np.float16),
    ("LongStorage", np.int64), ("IntStorage", np.int32), ("ShortStorage", np.int16),
    ("CharStorage", np.int8), ("ByteStorage", np.uint8), ("BoolStorage", np.bool_)])
@pytest.mark.parametrize("byteorder", [None, "little", "big"])
def test_storage_types_and_byte_orders(storage_type, dtype, byteorder):
    values = np.array([[0, 1, 0], [1, 1, 0]]).astype(dtype)
    raw = values.astype(np.dtype(dtype).newbyteorder(">" if byteorder == "big" else "<"))
    a = _Archive({"0": raw.ravel()})
    root = M("__torch__.net.Block", weight=T("0", storage_type, 0, (3, 2), (1, 3)))
    state = torchscript.load_state_dict(a.zip(root, NET_CODE, byteorder=byteorder))
    assert state["weight"].dtype == np.dtype(dtype) and state["weight"].dtype.isnative
    np.testing.assert_array_equal(state["weight"], values.T)


def test_bfloat16_is_widened_to_float32_exactly():
    want = np.array([1.0, -2.5, 3.140625], np.float32)                 # exact in bfloat16
    words = (want.view(np.uint32) >> 16).astype("<u2")
    a = _Archive({"0": words})
    root = M("__torch__.net.Block", weight=T("0", "BFloat16Storage", 0, (3,), (1,)))
    state = torchscript.load_state_dict(a.zip(root, NET_CODE))
    assert state["weight"].dtype == np.float32
    np.testing.assert_array_equal(state["weight"], want)


def test_a_view_outside_its_storage_is_refused():
    a = _Archive({"0": np.zeros(10, np.float32)})
    root = M("__torch__.net.Block", weight=T("0", "FloatStorage", 4, (3, 2), (2, 1)))
    state = torchscript.load_state_dict(a.zip(root, NET_CODE))        # last: 4 + 2*2 + 1 = 9
    assert state["weight"].shape == (3, 2)
    root.attrs["weight"] = T("0", "FloatStorage", 5, (3, 2), (2, 1))
    with pytest.raises(ValueError, match="reaches element 10 of storage 0"):
        torchscript.load_state_dict(a.zip(root, NET_CODE))


def test_missing_class_declaration_and_non_archives_are_clear_errors(tmp_path):
    a = _Archive({"0": np.zeros(2, np.float32)})
    root = M("__torch__.other.Thing", weight=T("0", "FloatStorage", 0, (2,), (1,)))
    with pytest.raises(ValueError, match=r"no declaration of class __torch__\.other\.Thing"):
        torchscript.load_state_dict(a.zip(root, NET_CODE))
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        torchscript.load_state_dict(b"not a zip")
    with pytest.raises(FileNotFoundError):
        torchscript.load_state_dict(str(tmp_path / "absent.pt"))


class _RunsACommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_pickle_that_would_run_a_command_is_refused_before_running_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsACommand(f"echo pwned > {marker}"), protocol=2)
    globals_named = [arg for op, arg, _ in pickletools.genops(payload) if op.name == "GLOBAL"]
    assert globals_named == [f"{os.system.__module__} system"]          # it would call system
    a = _Archive({"0": np.zeros(2, np.float32)})
    evil = M("__torch__.net.Block", weight=T("0", "FloatStorage", 0, (2,), (1,)),
             hook=pickletools.optimize(payload)[2:-1])                    # after allowed globals
    path = tmp_path / "model.pt"
    path.write_bytes(a.zip(evil, NET_CODE))
    with pytest.raises(torchscript.UnsafeArchiveError,
                       match=rf"refuses global '{os.system.__module__}\.system'"):
        torchscript.load_state_dict(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("qualified", ["os.system", "builtins.eval", "subprocess.Popen",
                                       "torch.load", "numpy.load", "torch._utils._rebuild_qtensor"])
@pytest.mark.parametrize("protocol", [2, 4])                           # GLOBAL / STACK_GLOBAL
def test_every_other_global_is_refused_by_name(qualified, protocol):
    module, _, name = qualified.rpartition(".")
    if protocol == 2:
        data = b"\x80\x02" + _global(qualified) + b"."
    else:
        data = (b"\x80\x04" + _Archive({})._value(module) + _Archive({})._value(name)
                + b"\x93.")                                              # STACK_GLOBAL
    archive = _Archive({}).zip(None, data_pkl=data)
    with pytest.raises(torchscript.UnsafeArchiveError, match=rf"refuses global '{qualified}'"):
        torchscript.load_state_dict(archive)


def test_persistent_ids_other_than_storages_are_refused():
    data = b"\x80\x02" + _Archive({})._value(("file", "/etc/passwd")) + b"Q."
    with pytest.raises(torchscript.UnsafeArchiveError, match="refuses persistent id"):
        torchscript.load_state_dict(_Archive({}).zip(None, data_pkl=data))


def torch_save_bytes(tensors: dict, storages: dict) -> bytes:
    """A `torch.save` archive of the dict {name: tensor} (`T`s into `storages`, key -> 1-D array)
    as torch writes it: an OrderedDict filled by SETITEMS, each value a `_rebuild_parameter`.
    Also used by test_inception.py to stand in for the downloaded network."""
    a = _Archive(storages)
    hooks = _global("collections.OrderedDict") + b")R"
    items = b"".join(a._value(name) + _global("torch._utils._rebuild_parameter") + b"("
                     + a._value(t) + b"\x89" + hooks + b"tR" for name, t in tensors.items())
    return a.zip(None, data_pkl=b"\x80\x02" + hooks + b"(" + items + b"u.")


def test_a_torch_save_dict_of_tensors_is_read_as_it_is():
    storages = {"0": np.arange(4, dtype=np.float32), "1": np.array([2, -1], np.float16)}
    data = torch_save_bytes({"p": T("0", "FloatStorage", 0, (2, 2), (2, 1)),
                             "q": T("1", "HalfStorage", 1, (1,), (1,))}, storages)
    state = torchscript.load_state_dict(data)
    assert list(state) == ["p", "q"]
    np.testing.assert_array_equal(state["p"], np.arange(4, dtype=np.float32).reshape(2, 2))
    assert state["q"].dtype == np.float16 and state["q"].tolist() == [-1.0]
