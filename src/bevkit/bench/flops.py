"""FLOPs of the sparse products (CSR matrix products, weighted bag sums) that PyTorch's counter misses."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class SparseProductCounter(TorchDispatchMode):
    """FLOPs of the sparse products as what they are: 2 per stored entry of the sparse matrix and
    column of the dense one, for every ``aten.mm`` / ``aten.addmm`` whose matrix is sparse (the CSR
    products of ``ops.sparse_conv3d``, forward only here) and every ``embedding_bag`` (the forward
    products of ``ops.bev_pool`` and ``ops.deform_attn``: 2 per bag entry and column), and
    ``as_dense``, what ``FlopCounterMode`` counts for the same calls (2 x rows x inner x columns for a
    sparse ``mm``, as if the matrix were dense; nothing for a bag)."""

    SPARSE = (torch.sparse_csr, torch.sparse_coo, torch.sparse_csc, torch.sparse_bsr)

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.bag_flops = 0
        self.as_dense = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        pack = func._overloadpacket
        if pack in (torch.ops.aten._embedding_bag_forward_only, torch.ops.aten._embedding_bag):
            # A weighted bag sum is the same sparse product with its entries as indices; the
            # counter has no rule for it (counts 0), so nothing is added to as_dense.
            weight, indices = args[0], args[1]
            self.flops += 2 * indices.numel() * weight.shape[1]
            self.bag_flops += 2 * indices.numel() * weight.shape[1]
        elif pack in (torch.ops.aten.mm, torch.ops.aten.addmm):
            a, b = (args[0], args[1]) if pack is torch.ops.aten.mm else (args[1], args[2])
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (
                    a.layout in self.SPARSE or b.layout in self.SPARSE):
                self.as_dense += 2 * a.shape[0] * a.shape[1] * b.shape[-1]
                if a.layout in self.SPARSE:
                    self.flops += 2 * a._nnz() * b.shape[-1]
                else:
                    self.flops += 2 * b._nnz() * a.shape[0]
        return func(*args, **(kwargs or {}))
