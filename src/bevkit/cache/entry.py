"""One cache entry: a single-tensor safetensors file, written atomically, read zero-copy, self-verifying.

The file is standard safetensors (``safetensors.torch.load_file`` reads it)::

    u64 little-endian N | N bytes of JSON header, space-padded to a multiple of 8 | tensor bytes

    header = {"__metadata__": {"cache": <cache id>, "format": "bevkit-bev-cache/1",
                               "sha256": <sha256 of the tensor bytes>, "token": <sample token>},
              "features": {"data_offsets": [0, nbytes], "dtype": "F16", "shape": [C, Y, X]}}

bevkit writes the header itself with sorted keys and no spaces, so the header is a function of
(token, cache id, dtype, shape, checksum): ``verify_entry`` rebuilds it and compares bytes, then
hashes the tensor bytes. A flipped byte anywhere in the file is therefore caught, and an entry can be
checked without any manifest (what resuming a killed job relies on).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ENTRY_FORMAT = "bevkit-bev-cache/1"
TENSOR = "features"
SUFFIX = ".safetensors"
TMP_MARK = ".tmp-"  # temporary files: ".<name>.tmp-<pid>"

# torch dtype name -> (safetensors code, torch dtype, numpy dtype the bytes are mapped as)
DTYPES = {
    "float16": ("F16", torch.float16, np.float16),
    "bfloat16": ("BF16", torch.bfloat16, np.uint16),  # numpy has no bfloat16: map as uint16, view in torch
    "float32": ("F32", torch.float32, np.float32),
}
_CODES = {code: name for name, (code, _, _) in DTYPES.items()}
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


class EntryError(ValueError):
    """An entry file that is missing, truncated, altered or not the entry it should be."""


def entry_name(token: str) -> str:
    """The file name of a sample's entry: the token itself when it is a safe file name (nuScenes tokens
    are 32 hex digits), else a hash of it."""
    if _SAFE_NAME.fullmatch(token) and TMP_MARK not in token:
        return token + SUFFIX
    return "t-" + hashlib.sha256(token.encode()).hexdigest()[:40] + SUFFIX


def header_bytes(token: str, cache_id: str, dtype: str, shape, sha256: str) -> bytes:
    """The exact header (length prefix included) of an entry; the tensor bytes start right after it."""
    code, tdtype, _ = DTYPES[dtype]
    nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=tdtype).element_size()
    header = {"__metadata__": {"cache": cache_id, "format": ENTRY_FORMAT, "sha256": sha256, "token": token},
              TENSOR: {"data_offsets": [0, nbytes], "dtype": code, "shape": [int(s) for s in shape]}}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensor bytes start 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def tensor_bytes(x: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor (no copy)."""
    x = x.detach().cpu().contiguous()
    if x.dtype == torch.bfloat16:
        x = x.view(torch.int16)
    return memoryview(x.numpy()).cast("B")


@dataclass(frozen=True)
class EntryInfo:
    """What an entry file says about itself (from its header)."""

    token: str
    cache_id: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str
    offset: int  # where the tensor bytes start
    nbytes: int  # tensor bytes
    size: int  # file size


def write_entry(path: Path, token: str, cache_id: str, x: torch.Tensor) -> EntryInfo:
    """Write ``x`` as the entry of ``token``: to a temporary name beside ``path``, then renamed, so a
    kill leaves either the previous file or the complete new one (never part of one).

    No fsync: a file torn by a power loss fails ``verify_entry`` and is rewritten by a resumed job.

    Shapes:
        x: any shape, e.g. (C, Y, X), dtype float16, bfloat16 or float32 (stored as is)
    """
    dtype = str(x.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"cache entries hold {', '.join(DTYPES)}, not {dtype}")
    data = tensor_bytes(x)
    sha = hashlib.sha256(data).hexdigest()
    head = header_bytes(token, cache_id, dtype, tuple(x.shape), sha)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return EntryInfo(token, cache_id, dtype, tuple(x.shape), sha, len(head), data.nbytes, len(head) + data.nbytes)


def read_header(path: Path) -> EntryInfo:
    """Parse an entry's header (reads only the header). Raises ``EntryError`` naming the file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise EntryError(f"{path}: truncated ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 1 << 20):
                raise EntryError(f"{path}: header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise EntryError(f"{path}: missing") from None
    except (UnicodeDecodeError, ValueError) as e:
        if isinstance(e, EntryError):
            raise
        raise EntryError(f"{path}: header is not valid JSON ({e})") from None
    try:
        meta, spec = header["__metadata__"], header[TENSOR]
        info = EntryInfo(meta["token"], meta["cache"], _CODES[spec["dtype"]], tuple(int(s) for s in spec["shape"]),
                         meta["sha256"], 8 + n, int(spec["data_offsets"][1]) - int(spec["data_offsets"][0]), size)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        raise EntryError(f"{path}: not a bevkit cache entry (header {str(header)[:120]})") from None
    if meta.get("format") != ENTRY_FORMAT:
        raise EntryError(f"{path}: entry format {meta.get('format')!r}, expected {ENTRY_FORMAT!r}")
    return info


def verify_entry(path: Path, token: str, cache_id: str, sha256: str | None = None, dtype: str | None = None,
                 shape=None) -> EntryInfo:
    """Check an entry completely: the header is byte for byte the one bevkit writes for ``token`` in cache
    ``cache_id`` (and ``dtype`` / ``shape`` when given), the file has no missing or extra bytes, and the
    tensor bytes hash to ``sha256`` (default: the checksum its own header records).

    Returns its ``EntryInfo``; raises ``EntryError`` with the reason.
    """
    info = read_header(path)
    if info.token != token:
        raise EntryError(f"{path}: holds sample {info.token!r}, expected {token!r}")
    if info.cache_id != cache_id:
        raise EntryError(f"{path}: written for another cache ({info.cache_id}, expected {cache_id})")
    if dtype is not None and info.dtype != dtype:
        raise EntryError(f"{path}: dtype {info.dtype}, expected {dtype}")
    if shape is not None and tuple(info.shape) != tuple(shape):
        raise EntryError(f"{path}: shape {list(info.shape)}, expected {list(shape)}")
    expected = sha256 or info.sha256
    head = header_bytes(token, cache_id, info.dtype, info.shape, expected)
    if info.size != len(head) + info.nbytes:
        raise EntryError(f"{path}: {info.size} bytes, expected {len(head) + info.nbytes}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if f.read(len(head)) != head:
            raise EntryError(f"{path}: header differs from the one written (altered or checksum mismatch)")
        while block := f.read(1 << 20):
            h.update(block)
    if h.hexdigest() != expected:
        raise EntryError(f"{path}: checksum mismatch (tensor bytes altered)")
    return info


def open_entry(path: Path, info: EntryInfo | None = None) -> torch.Tensor:
    """The entry's tensor, memory-mapped (zero-copy: pages are read from the file when touched).

    The mapping is copy-on-write, so writing to the tensor never changes the file. Validates the header
    (not the checksum: ``verify_entry`` does that).
    """
    info = info or read_header(path)
    _, tdtype, ndtype = DTYPES[info.dtype]
    if info.size != info.offset + info.nbytes:
        raise EntryError(f"{path}: {info.size} bytes, the header describes {info.offset + info.nbytes}")
    if not info.nbytes:
        return torch.empty(info.shape, dtype=tdtype)
    arr = np.memmap(path, dtype=ndtype, mode="c", offset=info.offset, shape=info.shape)
    x = torch.from_numpy(arr)
    return x.view(tdtype) if tdtype == torch.bfloat16 else x
