"""Cache entries: standard safetensors, read back zero-copy and exact, and any altered byte is caught."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bevkit.cache.entry import (
    EntryError,
    entry_name,
    open_entry,
    read_header,
    verify_entry,
    write_entry,
)

CACHE_ID = "c" * 32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_entry_round_trip_is_exact_and_standard_safetensors(tmp_path, dtype):
    x = (torch.randn(16, 8, 12, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)  # (C, Y, X)
    path = tmp_path / entry_name("tok1")
    info = write_entry(path, "tok1", CACHE_ID, x)
    assert info.size == path.stat().st_size and info.offset % 8 == 0
    y = open_entry(path)
    assert y.dtype == dtype and y.shape == x.shape and torch.equal(y, x)
    assert torch.equal(load_file(path)["features"], x)  # the safetensors library reads it unchanged
    assert verify_entry(path, "tok1", CACHE_ID, info.sha256, str(dtype).removeprefix("torch."), (16, 8, 12)) == info
    y += 1  # copy-on-write mapping: the tensor is writable, the file is not changed
    assert torch.equal(open_entry(path), x)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_every_altered_byte_is_caught(tmp_path):
    x = torch.arange(4 * 5 * 6, dtype=torch.float32).view(4, 5, 6).half()
    path = tmp_path / entry_name("tok")
    info = write_entry(path, "tok", CACHE_ID, x)
    clean = path.read_bytes()
    for pos in range(0, len(clean), 7):  # every 7th byte: length prefix, header JSON, padding, tensor bytes
        bad = bytearray(clean)
        bad[pos] ^= 0xFF
        path.write_bytes(bytes(bad))
        with pytest.raises(EntryError):
            verify_entry(path, "tok", CACHE_ID, info.sha256)
    path.write_bytes(clean[:-2])
    with pytest.raises(EntryError, match="bytes"):
        verify_entry(path, "tok", CACHE_ID)
    path.write_bytes(clean)
    with pytest.raises(EntryError, match="another cache"):
        verify_entry(path, "tok", "d" * 32)
    with pytest.raises(EntryError, match="holds sample"):
        verify_entry(path, "other", CACHE_ID)
    path.unlink()
    with pytest.raises(EntryError, match="missing"):
        read_header(path)


def test_entry_names_are_safe_file_names():
    assert entry_name("ca9a282c9e77460f8360f564131a8af5") == "ca9a282c9e77460f8360f564131a8af5.safetensors"
    for token in ("../etc/passwd", ".hidden", "a/b", "x.tmp-1", ""):
        name = entry_name(token)
        assert name.startswith("t-") and "/" not in name


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_open_entry_maps_the_file_instead_of_copying_it(tmp_path):
    path = tmp_path / entry_name("tok")
    write_entry(path, "tok", CACHE_ID, torch.ones(64, 32, 32, dtype=torch.bfloat16))
    x = open_entry(path)
    ptr = x.data_ptr()
    owners = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        lo, hi = (int(v, 16) for v in fields[0].split("-"))
        if lo <= ptr < hi:
            owners.append(fields[-1])
    assert owners == [str(path)]  # the tensor's memory is a mapping of the entry file
    assert x.dtype == torch.bfloat16 and bool((x == 1).all())
