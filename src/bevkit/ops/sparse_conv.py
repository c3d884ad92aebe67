"""Sparse 3D convolution on voxel sets (submanifold and strided), pure PyTorch: gather, matmul, scatter.

A :class:`SparseVoxels` holds the features of the occupied voxels only. A convolution visits each
kernel offset once: it finds, for every output voxel, the input voxel at that offset (a binary
search in the input's sorted voxel keys), gathers those inputs, multiplies them by the offset's
weight matrix, and a compressed-row sparse product adds the products into the outputs. No
feature tensor of the grid's size and nothing of size (voxels x kernel volume x channels) is
formed (a strided layer marks its output voxels in a one-byte-per-cell bitmap when the output grid
has at most 2^27 cells), so the cost follows the occupied voxels, as spconv's gather-GEMM-scatter
does, without a compiled extension; a custom autograd function runs the same layouts backwards.

``sparse_conv3d_reference`` runs the same layer as a dense ``conv3d`` on the densified grid and
reads the result at the output voxels: it is exact and slow, for tests.
"""

from __future__ import annotations

import itertools
import warnings
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


def _argsort(values: Tensor, bound: int, stable: bool = False) -> Tensor:
    """argsort of non-negative integers below ``bound``, in int32 when they fit (several times
    faster on CPU than int64)."""
    if bound < 2**31:
        values = values.int()
    return torch.argsort(values, stable=stable)


def _unique_keys(keys: Tensor, bound: int) -> Tensor:
    """Sorted unique keys in [0, bound): a mark-and-scan over the key range when it is small
    enough (no sort), else ``torch.unique``."""
    if bound <= 2**27:
        mark = torch.zeros(bound, dtype=torch.bool, device=keys.device)
        mark[keys] = True
        return mark.nonzero().squeeze(1)
    return torch.unique(keys.int() if bound < 2**31 else keys)


@dataclass
class SparseVoxels:
    """Features of the occupied voxels of a batch of 3D grids.

    ``coords`` are unique and sorted by :func:`voxel_keys`; ``shape`` is the grid's (Z, Y, X);
    ``pairs`` caches, per kernel size, the gather/scatter index pairs (:func:`conv_pairs`) of the submanifold
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
        order = _argsort(keys, batch_size * shape[0] * shape[1] * shape[2])
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
    z, y, x = out_shape
    bsz = int(coords[:, 0].max()) + 1 if len(coords) else 1
    keys = _unique_keys(voxel_keys(cand, out_shape), bsz * z * y * x).long()
    ix = keys % x
    iy = torch.div(keys, x, rounding_mode="floor") % y
    iz = torch.div(keys, x * y, rounding_mode="floor") % z
    bb = torch.div(keys, x * y * z, rounding_mode="floor")
    return torch.stack([bb, iz, iy, ix], dim=1), out_shape


def conv_pairs(in_coords: Tensor, in_shape: Triple, out_coords: Tensor, kernel, stride,
               padding) -> tuple[Tensor, Tensor, list[int]]:
    """The (input row, output row) pairs a convolution connects, grouped by kernel offset.

    Input voxel ``out * stride - padding + offset`` feeds output voxel ``out`` through the weight
    of ``offset``; the input is looked up by binary search in the sorted input keys.

    Shapes:
        in_coords: (M, 4)   out_coords: (M', 4)
        returns: in_rows (P,), out_rows (P,) int64, offset after offset (in ``itertools.product``
        order of the kernel window), and the K pair counts per offset
    """
    k, s, p = _triple(kernel), _triple(stride), _triple(padding)
    device = in_coords.device
    offs = _offsets(k, device)  # (K, 3)
    n_out = len(out_coords)
    empty = torch.empty(0, dtype=torch.long, device=device)
    if len(in_coords) == 0 or n_out == 0:
        return empty, empty, [0] * len(offs)
    in_keys = voxel_keys(in_coords, in_shape)
    base = out_coords[:, 1:] * torch.tensor(s, device=device) - torch.tensor(p, device=device)  # (M', 3)
    pos = base[None] + offs[:, None]  # (K, M', 3): every offset at once, a few large kernels
    inside = ((pos >= 0) & (pos < torch.tensor(in_shape, device=device))).all(-1)  # (K, M')
    z, y, x = in_shape
    keys = ((out_coords[None, :, 0] * z + pos[..., 0]) * y + pos[..., 1]) * x + pos[..., 2]  # (K, M')
    keys = keys.reshape(-1)
    at = torch.searchsorted(in_keys, keys).clamp_(max=len(in_keys) - 1)
    hit = (in_keys[at] == keys) & inside.reshape(-1)
    flat = hit.nonzero().squeeze(1)  # ordered by offset, then output row
    counts = torch.bincount(torch.div(flat, n_out, rounding_mode="floor"), minlength=len(offs)).tolist()
    return at[flat], flat % n_out, counts


@dataclass
class ConvPairs:
    """The pairs of one convolution and the two compressed-row layouts its products use: the
    scatter of the P pair products into the M' outputs (rows: outputs, columns: pairs) and the
    scatter of the pair gradients into the M inputs (rows: inputs, columns: pairs)."""

    rows_in: Tensor  # (P,)
    rows_out: Tensor  # (P,)
    counts: list  # K pair counts, offset after offset
    num_in: int
    num_out: int
    out_crow: Tensor  # (M' + 1,)
    out_col: Tensor  # (P,) pair indices ordered by output row
    in_crow: Tensor  # (M + 1,)
    in_col: Tensor  # (P,) pair indices ordered by input row

    @classmethod
    def build(cls, rows_in: Tensor, rows_out: Tensor, counts: list, num_in: int, num_out: int) -> "ConvPairs":
        def layout(rows: Tensor, n: int) -> tuple[Tensor, Tensor]:
            crow = torch.zeros(n + 1, dtype=torch.long, device=rows.device)
            crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
            return crow, _argsort(rows, n, stable=True)

        out_crow, out_col = layout(rows_out, num_out)
        in_crow, in_col = layout(rows_in, num_in)
        return cls(rows_in, rows_out, counts, num_in, num_out, out_crow, out_col, in_crow, in_col)


def _csr(crow: Tensor, col: Tensor, size: tuple[int, int], dtype) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, torch.ones(len(col), dtype=dtype, device=col.device), size,
                                       check_invariants=False)


def _blocks(counts: list):
    start = 0
    for k, c in enumerate(counts):
        if c:
            yield k, start, start + c
        start += c


class _SparseConv(torch.autograd.Function):
    """out = S_out @ [gather(features)_k @ W_k]_k; the gradients run the same layouts backwards:
    the pair gradients are a gather of the output gradient, the input gradient a compressed-row
    product with S_in, and each weight's gradient one product over its block of pairs."""

    @staticmethod
    def forward(ctx, features, weight, pairs: ConvPairs):
        gathered = features.index_select(0, pairs.rows_in)  # (P, C_in)
        prods = features.new_empty(len(pairs.rows_in), weight.shape[2])
        for k, a, b in _blocks(pairs.counts):
            torch.mm(gathered[a:b], weight[k], out=prods[a:b])
        scatter = _csr(pairs.out_crow, pairs.out_col, (pairs.num_out, len(pairs.rows_in)), features.dtype)
        ctx.save_for_backward(gathered, weight)
        ctx.pairs = pairs
        return scatter @ prods  # (M', C_out)

    @staticmethod
    def backward(ctx, grad_out):
        gathered, weight = ctx.saved_tensors
        pairs = ctx.pairs
        grad_prods = grad_out.contiguous().index_select(0, pairs.rows_out)  # (P, C_out)
        grad_features = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)
            for k, a, b in _blocks(pairs.counts):
                torch.mm(gathered[a:b].t(), grad_prods[a:b], out=grad_weight[k])
        if ctx.needs_input_grad[0]:
            grad_gathered = grad_prods.new_empty(len(pairs.rows_in), weight.shape[1])
            for k, a, b in _blocks(pairs.counts):
                torch.mm(grad_prods[a:b], weight[k].t(), out=grad_gathered[a:b])
            gather_t = _csr(pairs.in_crow, pairs.in_col, (pairs.num_in, len(pairs.rows_in)), grad_out.dtype)
            grad_features = gather_t @ grad_gathered  # (M, C_in)
        return grad_features, grad_weight, None


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
        rows_in, rows_out, counts = conv_pairs(x.coords, x.shape, out_coords, kernel, 1 if subm else stride_pad[0],
                                               padding if subm else stride_pad[1])
        pairs = ConvPairs.build(rows_in, rows_out, counts, len(x.coords), len(out_coords))
        if subm:
            x.pairs[kernel] = pairs
    w = weight.reshape(-1, weight.shape[3], weight.shape[4])  # (K, C_in, C_out)
    if len(pairs.rows_in) == 0:
        out = x.features.new_zeros(len(out_coords), w.shape[2]) + 0 * w.sum()  # keeps the graph to the weight
    else:
        # The compressed-row products have no bf16/fp16 kernel on CPU: the layer runs in the
        # features' dtype (float32 under autocast), as ops.bev_pool does.
        with torch.autocast(device_type=x.features.device.type, enabled=False):
            out = _SparseConv.apply(x.features, w.to(x.features.dtype).contiguous(), pairs)
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
