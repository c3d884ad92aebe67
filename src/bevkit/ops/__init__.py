"""Custom BEV operators: each a plain reference beside a fast path."""

from .bev_pool import (
    BEVGridSpec,
    BEVPoolPlan,
    bev_cell_index,
    bev_pool,
    bev_pool_cumsum,
    bev_pool_exportable,
    bev_pool_plan,
    bev_pool_reference,
)
from .bev_warp import bev_warp, bev_warp_reference
from .deform_attn import deform_attn, deform_attn_exportable, deform_attn_reference
from .deform_conv import deform_conv2d, deform_conv2d_reference
from .nms import (
    bev_corners,
    circle_nms,
    circle_nms_reference,
    nms_rotated,
    nms_rotated_reference,
    rotated_iou_bev,
    rotated_iou_bev_aligned,
)
from .sparse_conv import (
    SparseVoxels,
    conv_output_shape,
    sparse_conv3d,
    sparse_conv3d_reference,
    strided_output_coords,
)
from .tracing import exporting
from .voxelize import (
    Voxels,
    pillar_scatter,
    pillar_scatter_reference,
    voxelize,
    voxelize_batch,
    voxelize_reference,
)

__all__ = [
    "BEVGridSpec", "BEVPoolPlan", "bev_cell_index", "bev_pool", "bev_pool_cumsum",
    "bev_pool_exportable", "bev_pool_plan", "bev_pool_reference",
    "bev_warp", "bev_warp_reference",
    "deform_attn", "deform_attn_exportable", "deform_attn_reference",
    "deform_conv2d", "deform_conv2d_reference",
    "bev_corners", "circle_nms", "circle_nms_reference", "nms_rotated", "nms_rotated_reference",
    "rotated_iou_bev", "rotated_iou_bev_aligned", "exporting",
    "SparseVoxels", "conv_output_shape", "sparse_conv3d", "sparse_conv3d_reference", "strided_output_coords",
    "Voxels", "pillar_scatter", "pillar_scatter_reference", "voxelize", "voxelize_batch",
    "voxelize_reference",
]
