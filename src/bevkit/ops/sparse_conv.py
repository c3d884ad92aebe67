"""Sparse 3D convolution on voxel sets (submanifold and strided), pure PyTorch: gather, matmul, scatter.

A :class:`SparseVoxels` holds the features of the occupied voxels only. A convolution visits each
kernel offset once: it finds, for every output voxel, the input voxel at that offset (a binary
search in the input's sorted voxel keys), gathers those inputs, multiplies them by the offset's
weight matrix and adds the products into the outputs. Nothing of size (grid) or (voxels x kernel
volume x channels) is formed, so the cost follows the occupied voxels, as spconv's does, without a
compiled extension. Autograd comes from the gather / matmul / index_add it is made of.

``sparse_conv3d_reference`` runs the same layer as a dense ``conv3d`` on the densified grid and
reads the result at the output voxels: it is exact and slow, for tests.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

Triple = tuple[int, int, int]


def _triple(v) -> Triple:
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 3:
        raise ValueError(f"expected an int or three ints, got {v!r}")
    return t  # type: ignore[return-value]


def voxel_keys(coords: Tensor, shape: Triple) -> Tensor:
    """One int64 key per voxel, increasing with (b, iz, iy, ix).

    Shapes:
        coords: (M, 4) int (b, iz, iy, ix)   returns: (M,) int64
    """
    z, y, x = shape
    c = coords.long()
    return ((c[:, 0] * z + c[:, 1]) * y + c[:, 2]) * x + c[:, 3]


@dataclass
class SparseVoxels:
    """Features of the occupied voxels of a batch of 3D grids.

    ``coords`` are unique and sorted by :func:`voxel_keys`; ``shape`` is the grid's (Z, Y, X);
    ``pairs`` caches, per kernel size, the gather/scatter index pairs of the submanifold
    convolutions on these voxels, so that every such layer on the same voxel set shares them.

    Shapes:
        features: (M, C)   coords: (M, 4) int64 (b, iz, iy, ix)
    """

    features: Tensor
    coords: Tensor
    shape: Triple
    batch_size: int
    pairs: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_voxels(cls, features: Tensor, coords: Tensor, shape, batch_size: int) -> "SparseVoxels":
        """Sort and check user voxels: coordinates inside the grid and the batch, no duplicates."""
        shape = _triple(shape)
        if features.dim() != 2 or coords.shape != (features.shape[0], 4):
            raise ValueError(f"features must be (M, C) and coords (M, 4); got {tuple(features.shape)} and "
                             f"{tuple(coords.shape)}")
        coords = coords.long()
        if len(coords):
            lo = coords.min(0).values
            hi = coords.max(0).values
            limits = (batch_size, *shape)
            if (lo < 0).any() or any(int(h) >= n for h, n in zip(hi.tolist(), limits)):
                raise ValueError(f"voxel coords must lie in [0, {limits}) per (b, z, y, x); got min {lo.tolist()}, "
                                 f"max {hi.tolist()}")
        keys = voxel_keys(coords, shape)
        order = torch.argsort(keys)
        keys = keys[order]
        if len(keys) > 1 and bool((keys[1:] == keys[:-1]).any()):
            raise ValueError("duplicate voxel coordinates")
        return cls(features[order], coords[order], shape, int(batch_size))

    def replace(self, features: Tensor) -> "SparseVoxels":
        """The same voxels (and cached pairs) with other features."""
        return SparseVoxels(features, self.coords, self.shape, self.batch_size, self.pairs)

    def dense(self) -> Tensor:
        """The grid with zeros where no voxel is.

        Shapes:
            returns: (B, C, Z, Y, X)
        """
        z, y, x = self.shape
        c = self.features.shape[1]
        out = self.features.new_zeros(self.batch_size * z * y * x, c)
        out = out.index_copy(0, voxel_keys(self.coords, self.shape), self.features)
        return out.view(self.batch_size, z, y, x, c).permute(0, 4, 1, 2, 3)


def conv_output_shape(shape: Triple, kernel, stride, padding) -> Triple:
    """Grid shape after a convolution, as ``conv3d`` computes it."""
    k, s, p = _triple(kernel), _triple(stride), _triple(padding)
    out = tuple((n + 2 * pp - kk) // ss + 1 for n, kk, ss, pp in zip(shape, k, s, p))
    if min(out) < 1:
        raise ValueError(f"grid {shape} too small for kernel {k}, stride {s}, padding {p}")
    return out  # type: ignore[return-value]


def _offsets(kernel: Triple, device) -> Tensor:
    return torch.tensor(list(itertools.product(*(range(k) for k in kernel))), dtype=torch.long, device=device)


def strided_output_coords(coords: Tensor, shape: Triple, kernel, stride, padding) -> tuple[Tensor, Triple]:
    """The voxels a (non-submanifold) sparse convolution writes: every output position whose
    receptive field holds at least one input voxel, as spconv's ``SparseConv3d`` does.

    Shapes:
        coords: (M, 4) int64 (b, iz, iy, ix)   returns: (M', 4) sorted and unique, output grid (Z', Y', X')
    """
    k, s, p = _triple(kernel), _triple(stride), _triple(padding)
    out_shape = conv_output_shape(shape, k, s, p)
    offs = _offsets(k, coords.device)  # (K, 3)
    stride_t = torch.tensor(s, device=coords.device)
    limit = torch.tensor(out_shape, device=coords.device)
    # out * stride - padding + offset = in  =>  out = (in + padding - offset) / stride
    num = coords[None, :, 1:] + torch.tensor(p, device=coords.device) - offs[:, None, :]  # (K, M, 3)
    ok = (num % stride_t == 0).all(-1) & (num >= 0).all(-1)
    out = torch.div(num, stride_t, rounding_mode="floor")
    ok &= (out < limit).all(-1)
    b = coords[None, :, :1].expand(len(offs), -1, -1)
    cand = torch.cat([b, out], dim=-1)[ok]  # (P, 4)
    keys = torch.unique(voxel_keys(cand, out_shape))
    z, y, x = out_shape
    ix = keys % x
    iy = torch.div(keys, x, rounding_mode="floor") % y
    iz = torch.div(keys, x * y, rounding_mode="floor") % z
    bb = torch.div(keys, x * y * z, rounding_mode="floor")
    return torch.stack([bb, iz, iy, ix], dim=1), out_shape


def conv_pairs(in_coords: Tensor, in_shape: Triple, out_coords: Tensor, kernel, stride, padding) -> list:
    """For each kernel offset, the (input row, output row) pairs it connects.

    Input voxel ``out * stride - padding + offset`` feeds output voxel ``out`` through the weight
    of ``offset``; the input is looked up by binary search in the sorted input keys.

    Shapes:
        in_coords: (M, 4)   out_coords: (M', 4)   returns: K (in_rows (P_k,), out_rows (P_k,)) int64
    """
    k, s, p = _triple(kernel), _triple(stride), _triple(padding)
    in_keys = voxel_keys(in_coords, in_shape)
    device = in_coords.device
    base = out_coords[:, 1:] * torch.tensor(s, device=device) - torch.tensor(p, device=device)  # (M', 3)
    limit = torch.tensor(in_shape, device=device)
    out_rows_all = torch.arange(len(out_coords), device=device)
    pairs = []
    for off in _offsets(k, device):
        pos = base + off
        inside = ((pos >= 0) & (pos < limit)).all(-1)
        rows = out_rows_all[inside]
        cand = torch.cat([out_coords[inside, :1], pos[inside]], dim=1)
        if len(in_keys) == 0 or len(cand) == 0:
            empty = torch.empty(0, dtype=torch.long, device=device)
            pairs.append((empty, empty))
            continue
        ck = voxel_keys(cand, in_shape)
        at = torch.searchsorted(in_keys, ck).clamp(max=len(in_keys) - 1)
        hit = in_keys[at] == ck
        pairs.append((at[hit], rows[hit]))
    return pairs


def sparse_conv3d(x: SparseVoxels, weight: Tensor, bias: Tensor | None = None, stride=1, padding=None,
                  subm: bool = False) -> SparseVoxels:
    """A 3D convolution evaluated at occupied voxels only.

    ``subm=True``: submanifold convolution (stride 1, "same" padding; the output voxels are the
    input voxels, so sparsity does not grow). Otherwise the output voxels are every position whose
    receptive field holds an input voxel (spconv's ``SparseConv3d``). ``weight[kz, ky, kx]`` is the
    (C_in, C_out) matrix applied to the input at offset (kz, ky, kx) of the window, so the result
    at the output voxels equals ``conv3d`` on the dense grid with weight ``permute(4, 3, 0, 1, 2)``.
    A submanifold layer keeps its index pairs in ``x.pairs``, for the next layer on the same voxels.

    Shapes:
        x.features: (M, C_in)   weight: (kz, ky, kx, C_in, C_out)   bias: (C_out,)
        returns: SparseVoxels with features (M', C_out)
    """
    if weight.dim() != 5 or weight.shape[3] != x.features.shape[1]:
        raise ValueError(f"weight must be (kz, ky, kx, {x.features.shape[1]}, C_out); got {tuple(weight.shape)}")
    kernel = tuple(weight.shape[:3])
    if subm:
        if any(kk % 2 == 0 for kk in kernel) or _triple(stride) != (1, 1, 1):
            raise ValueError("a submanifold convolution needs an odd kernel and stride 1")
        padding = tuple(kk // 2 for kk in kernel)
        out_coords, out_shape = x.coords, x.shape
    else:
        padding = 0 if padding is None else padding
        out_coords, out_shape = strided_output_coords(x.coords, x.shape, kernel, stride, padding)
        stride_pad = (_triple(stride), _triple(padding))
    if subm and kernel in x.pairs:
        pairs = x.pairs[kernel]
    else:
        pairs = conv_pairs(x.coords, x.shape, out_coords, kernel, 1 if subm else stride_pad[0],
                           padding if subm else stride_pad[1])
        if subm:
            x.pairs[kernel] = pairs
    w = weight.reshape(-1, weight.shape[3], weight.shape[4])  # (K, C_in, C_out)
    out = x.features.new_zeros(len(out_coords), w.shape[2])
    for k, (rows_in, rows_out) in enumerate(pairs):
        if len(rows_in):
            # Under autocast the product may come out in bf16/fp16; the sum stays in the input dtype.
            out.index_add_(0, rows_out, (x.features.index_select(0, rows_in) @ w[k]).to(out.dtype))
    if bias is not None:
        out = out + bias
    if subm:
        return SparseVoxels(out, out_coords, out_shape, x.batch_size, x.pairs)
    return SparseVoxels(out, out_coords, out_shape, x.batch_size)


def sparse_conv3d_reference(x: SparseVoxels, weight: Tensor, bias: Tensor | None = None, stride=1, padding=None,
                            subm: bool = False) -> SparseVoxels:
    """``sparse_conv3d`` through a dense ``conv3d`` of the whole grid, read at the output voxels.

    Shapes: as :func:`sparse_conv3d`.
    """
    kernel = tuple(weight.shape[:3])
    if subm:
        padding = tuple(kk // 2 for kk in kernel)
        stride = 1
        out_coords, out_shape = x.coords, x.shape
    else:
        padding = 0 if padding is None else padding
        out_coords, out_shape = strided_output_coords(x.coords, x.shape, kernel, stride, padding)
    dense = F.conv3d(x.dense(), weight.permute(4, 3, 0, 1, 2), bias, _triple(stride), _triple(padding))
    b, iz, iy, ix = out_coords.unbind(1)
    return SparseVoxels(dense[b, :, iz, iy, ix], out_coords, out_shape, x.batch_size)


__all__ = ["SparseVoxels", "conv_output_shape", "conv_pairs", "sparse_conv3d", "sparse_conv3d_reference",
           "strided_output_coords", "voxel_keys"]
