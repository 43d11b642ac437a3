"""Read PyTorch weight files into numpy without importing torch.

Pretrained weights that users bring (LPIPS's VGG16 and linear layers, Stable Diffusion's VAE)
come as `torch.save` files (.pth: the zip format, or the legacy format that torchvision's and
lpips' own files use) or as safetensors. Reading them needs no torch: a .pth is a pickle whose
tensors point into raw storages. The unpickler admits only the handful of globals a state dict
uses, so a file cannot run code (like torch.load(weights_only=True)).
"""
import collections
import json
import os
import pickle
import struct
import zipfile

import numpy as np

_DTYPES = {  # torch storage class -> numpy dtype (bfloat16 is widened to float32 below)
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_SAFETENSORS_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": "bfloat16",
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                       "U8": np.uint8, "BOOL": np.bool_}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    def __init__(self, name):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *unused):
    if not size:
        return np.array(storage[offset], copy=True)
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], tuple(size),
                                           tuple(s * item for s in stride))
    return np.array(view, copy=True)


def _rebuild_parameter(data, *unused):
    return data


class _Unpickler(pickle.Unpickler):
    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module, name):
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"weight file: global {module}.{name} is not allowed in a "
                                     "state dict (only tensors, dicts and OrderedDicts are)")

    def persistent_load(self, pid):
        if pid[0] != "storage":
            raise pickle.UnpicklingError(f"weight file: unexpected persistent id {pid[0]!r}")
        storage_type, key, _location, numel = pid[1:5]
        return self._load_storage(storage_type.name, str(key), int(numel))


def _dtype(name):
    dtype = _DTYPES[name] if name in _DTYPES else _SAFETENSORS_DTYPES[name]
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def _widen(array, name):
    """bfloat16 (read as uint16) -> float32; everything else unchanged."""
    if _DTYPES.get(name, _SAFETENSORS_DTYPES.get(name)) == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _read_zip(path):
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        prefix = pkl[: -len("data.pkl")]

        def load_storage(type_name, key, numel):
            raw = archive.read(f"{prefix}data/{key}")
            return _widen(np.frombuffer(raw, _dtype(type_name))[:numel], type_name)

        with archive.open(pkl) as f:
            return _Unpickler(f, load_storage).load()


class _Pending:
    """A tensor of a legacy file whose storage bytes come after the pickle."""

    def __init__(self, key, offset, size, stride):
        self.key, self.offset, self.size, self.stride = key, offset, size, stride


def _read_legacy(path):
    # torch.serialization._legacy_load: magic, protocol, sys info, the object (storages by
    # key), the storage keys in file order, then per storage an int64 count and its raw bytes.
    with open(path, "rb") as f:
        try:
            magic = pickle.load(f)
        except Exception:
            magic = None
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"weight file {path!r}: not a torch.save file (zip or legacy)")
        pickle.load(f), pickle.load(f)
        types = {}

        def load_storage(type_name, key, numel):
            types[key] = type_name
            return key

        unpickler = _Unpickler(f, load_storage)
        unpickler._ALLOWED = {**_Unpickler._ALLOWED, ("torch._utils", "_rebuild_tensor_v2"):
                              lambda key, offset, size, stride, *rest: _Pending(key, offset, size,
                                                                                 stride)}
        obj = unpickler.load()
        storages = {}
        for key in pickle.load(f):
            numel = struct.unpack("<q", f.read(8))[0]
            dtype = _dtype(types[key])
            raw = np.frombuffer(f.read(numel * dtype.itemsize), dtype)
            storages[str(key)] = _widen(raw, types[key])
    return _resolve(obj, storages)


def _resolve(obj, storages):
    if isinstance(obj, _Pending):
        return _rebuild_tensor(storages[obj.key], obj.offset, obj.size, obj.stride)
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v, storages)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, storages) for v in obj)
    return obj


def read_pth(path: str) -> dict[str, np.ndarray]:
    """A torch.save'd state dict (zip or legacy format) -> {name: numpy array}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file {path!r} does not exist")
    state = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k: v for k, v in state.items() if isinstance(v, np.ndarray)}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A .safetensors file -> {name: numpy array}: an 8-byte header size, a JSON header, bytes."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file {path!r} does not exist")
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        array = np.frombuffer(data[start:end], _dtype(info["dtype"])).reshape(info["shape"])
        out[name] = _widen(array, info["dtype"]).copy()
    return out


def read_weights(path: str) -> dict[str, np.ndarray]:
    """By extension: .safetensors, .npz, else a torch.save file."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith(".npz"):
        with np.load(path) as f:
            return dict(f)
    return read_pth(path)
