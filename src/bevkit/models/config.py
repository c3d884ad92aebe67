"""Typed, frozen model configuration (pydantic; unknown keys are rejected).

Defaults are the full-size BEVDet-R50 setting; a YAML preset in ``configs/`` holds only what
differs. Variant names (``view_transform``, ``neck.type``, ...) are looked up in the literal dicts
of :mod:`bevkit.models.build`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bevkit.data.maps import MAP_CLASSES
from bevkit.data.nuscenes import DETECTION_CLASSES
from bevkit.geometry.grid import BEVGrid
from bevkit.ops import BEVGridSpec

Bound = tuple[float, float, float]


# Whole-number settings that may be 0; every other one (channels, heads, layers, points, sizes) is at least 1.
_ZERO_ALLOWED = {"free_class", "min_radius"}


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _sizes_positive(self):
        for name, value in self:
            if isinstance(value, bool):
                continue
            if isinstance(value, int) and value < (0 if name in _ZERO_ALLOWED else 1):
                raise ValueError(f"{name} must be at least {0 if name in _ZERO_ALLOWED else 1}, got {value}")
            if isinstance(value, float) and name.endswith(("_weight", "_threshold", "threshold")) and value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
            if isinstance(value, tuple) and name in ("out_indices",) and any(v < 0 for v in value):
                raise ValueError(f"{name} must not hold negative indices, got {value}")
        return self


class GridConfig(Frozen):
    """The BEV grid in the ego frame: ``(min, max, step)`` in metres per axis; z is collapsed."""

    xbound: Bound = (-51.2, 51.2, 0.8)
    ybound: Bound = (-51.2, 51.2, 0.8)
    zbound: Bound = (-5.0, 3.0, 8.0)

    @model_validator(mode="after")
    def _whole_cells(self):
        self.bev_grid()  # BEVGrid validates ranges and whole numbers of cells
        return self

    def bev_grid(self) -> BEVGrid:
        (x0, x1, dx), (y0, y1, dy), (z0, z1, dz) = self.xbound, self.ybound, self.zbound
        return BEVGrid(xmin=x0, xmax=x1, ymin=y0, ymax=y1, zmin=z0, zmax=z1, dx=dx, dy=dy, dz=dz)

    def spec(self) -> BEVGridSpec:
        """The same grid in the form ``bevkit.ops`` takes."""
        return BEVGridSpec(tuple(self.xbound), tuple(self.ybound), tuple(self.zbound))

    @property
    def shape(self) -> tuple[int, int]:
        """(Y, X)."""
        return self.bev_grid().shape


class BackboneConfig(Frozen):
    """A timm backbone (``features_only``, never downloaded); ``checkpoint``: a local state dict.
    ``img_size`` (H, W): the input size, for backbones built for one (Swin: its attention masks);
    None for convolutional ones."""

    name: str = "resnet50"
    out_indices: tuple[int, ...] = (3, 4)
    checkpoint: str | None = None
    img_size: tuple[int, int] | None = None


class NeckConfig(Frozen):
    """Image neck: ``fpn`` (top-down FPN), ``lss_fpn`` (BEVDet's concat-and-conv) or
    ``generalized_lss`` (BEVFusion's top-down concat-and-conv over every level); one output map at
    the stride of the first selected backbone level."""

    type: str = "fpn"
    channels: int = 256


class ViewTransformConfig(Frozen):
    """Camera-to-BEV. ``lss``: depth bins ``dbound`` (min, max, step) in metres along the optical
    axis; ``depth_loss_weight`` > 0 adds BEVDepth's loss from LiDAR points. ``bilinear``: voxel
    centres at ``num_z`` heights in ``zbound`` of the grid are sampled in every camera.
    ``lss_camera_aware``: lift-splat with BEVDepth's camera-aware depth net of
    ``depth_net_channels`` channels; ``depth_net``: None (one 3x3 conv before the depth classifier) or
    ``bevdepth`` (BEVDepth's residual blocks, ASPP and deformable conv, with squeeze-and-excitation
    camera gates). ``deform``: BEVFormer's encoder, ``layers`` x (temporal self-attention with ``tsa_points``
    samples per head and map, spatial cross-attention at ``num_z`` pillar heights with
    ``points_per_z`` samples each, FFN of width ``ffn``), ``heads`` attention heads; ``deform_attn``
    names its deformable attention (``models.build.DEFORM_ATTN``: ``fast``, the sparse-product path;
    ``reference``, one ``grid_sample`` per level; ``exportable``, gathers): same results, different
    memory and speed; ``num_cameras`` is the number of its learned camera embeddings, one per camera in
    ``data.cameras`` order (None: as many as ``data.cameras`` lists; ``build_model`` alone: 6).
    ``lss_depth``: BEVFusion's ``DepthLSSTransform``, lift-splat whose depth net also reads the
    LiDAR points projected into each image (needs a LiDAR input in the batch).
    ``downsample`` f (``lss``, ``lss_depth``): pool on a grid f times finer and reduce it with
    strided convs, as BEVFusion's camera branch does."""

    type: str = "lss"
    channels: int = 64
    dbound: Bound = (1.0, 60.0, 1.0)
    downsample: int | None = None
    depth_loss_weight: float = 0.0
    depth_net_channels: int = 256
    depth_net: Literal["bevdepth"] | None = None
    num_z: int = 8
    layers: int = 3
    heads: int = 8
    points_per_z: int = 2
    tsa_points: int = 4
    ffn: int = 512
    deform_attn: str = "fast"
    num_cameras: int | None = Field(default=None, ge=1)


class LidarConfig(Frozen):
    """The LiDAR branch; ``point_features`` input channels per point (x, y, z, intensity, dt),
    ``channels`` the BEV channels it produces. ``pillars``: PointPillars, pillars are the BEV grid's
    cells. ``sparse_voxels``: BEVFusion's / CenterPoint's sparse 3D encoder on voxels of
    ``voxel_size`` (x and y 1/8 of the BEV cell) over ``zbound`` (min, max; None: the grid's),
    stage widths ``base_channels`` x (1, 2, 4, 8) (None: 16)."""

    type: str = "pillars"
    channels: int = 64
    point_features: int = 5
    max_points: int = 20
    max_voxels: int = 30000
    voxel_size: tuple[float, float, float] | None = None
    base_channels: int | None = None
    zbound: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _sparse_needs_voxels(self):
        if self.type == "sparse_voxels" and self.voxel_size is None:
            raise ValueError("lidar: type sparse_voxels needs voxel_size (x, y, z) in metres")
        return self


class FuserConfig(Frozen):
    type: str = "conv"
    channels: int = 80


class TemporalConfig(Frozen):
    """BEVDet4D: ``frames`` BEV maps (current + history) warped into the current frame and
    concatenated."""

    type: str = "bevdet4d"
    frames: int = 2


class MapPriorConfig(Frozen):
    """Neural Map Prior: a global map memory of the BEV features (before the BEV encoder), fused with
    the current BEV by current-to-prior window attention (``heads``, ``window`` cells square, FFN of
    width ``ffn``) and a ConvGRU (``kernel``). The memory is a raster at the BEV grid's cell size in
    tiles of ``tile`` cells, stored in ``memory_dtype``."""

    type: str = "nmp"
    heads: int = 8
    window: int = 10
    ffn: int = 512
    kernel: int = 3
    tile: int = 64
    memory_dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class BEVEncoderConfig(Frozen):
    """``resnet``: a ResNet-style BEV backbone (stride-2 stages) and an LSS-FPN neck back to the grid;
    ``none``: the heads read the fused BEV directly (``channels``, ``blocks``, ``out_channels`` unused)."""

    type: str = "resnet"
    channels: tuple[int, ...] = (128, 256, 512)
    blocks: tuple[int, ...] = (2, 2, 2)
    out_channels: int = 256


# CenterPoint's six nuScenes class groups and circle-NMS `min_radius` per group. As in CenterPoint
# (det3d circle_nms: `dist = dx**2 + dy**2; if dist <= thresh`), the values are thresholds on the
# *squared* centre distance (m^2): a car suppresses another within 2 m, a pedestrian within 0.42 m.
CENTERPOINT_TASKS = (("car",), ("truck", "construction_vehicle"), ("bus", "trailer"), ("barrier",),
                     ("motorcycle", "bicycle"), ("pedestrian", "traffic_cone"))
CENTERPOINT_NMS_RADII = (4.0, 12.0, 10.0, 1.0, 0.85, 0.175)
# The nuScenes attribute vocabulary, and which attributes each detection class may take (by prefix).
NUSCENES_ATTRIBUTES = ("vehicle.moving", "vehicle.parked", "vehicle.stopped", "cycle.with_rider",
                       "cycle.without_rider", "pedestrian.moving", "pedestrian.standing",
                       "pedestrian.sitting_lying_down")
CLASS_ATTRIBUTE_PREFIX = {"car": "vehicle.", "truck": "vehicle.", "construction_vehicle": "vehicle.",
                          "bus": "vehicle.", "trailer": "vehicle.", "motorcycle": "cycle.", "bicycle": "cycle.",
                          "pedestrian": "pedestrian."}


class DetectionHeadConfig(Frozen):
    classes: tuple[str, ...] = DETECTION_CLASSES
    tasks: tuple[tuple[str, ...], ...] = CENTERPOINT_TASKS
    nms_radii: tuple[float, ...] = CENTERPOINT_NMS_RADII
    channels: int = 64
    min_radius: int = 2
    min_overlap: float = 0.1
    reg_weight: float = 0.25
    code_weights: tuple[float, ...] = (1.0,) * 8 + (0.2, 0.2)
    max_per_task: int = 500
    max_boxes: int = 500
    score_threshold: float = 0.1
    attributes: tuple[str, ...] = NUSCENES_ATTRIBUTES
    attr_weight: float = 1.0

    @model_validator(mode="after")
    def _tasks_match(self):
        flat = [c for t in self.tasks for c in t]
        unknown = [c for c in flat if c not in self.classes]
        if unknown or len(set(flat)) != len(flat):
            raise ValueError(f"detection tasks {self.tasks} must partition classes without repeats")
        if len(self.nms_radii) != len(self.tasks):
            raise ValueError("detection: one nms radius per task")
        if any(not r >= 0 for r in self.nms_radii):
            raise ValueError(f"detection: nms_radii (squared distances) must not be negative, got {self.nms_radii}")
        if len(self.code_weights) != 10:
            raise ValueError("detection: code_weights has 10 entries (dx dy z l w h sin cos vx vy)")
        return self


class DETRHeadConfig(Frozen):
    """BEVFormer's detection head: ``num_queries`` object queries through a ``layers``-deep
    Deformable-DETR decoder of width ``dim`` (``heads`` heads, ``points`` samples per head, FFN
    ``ffn``) with box refinement; sigmoid focal classification (``focal_alpha``, ``focal_gamma``,
    weight ``cls_weight``), L1 on the code (``reg_weight``, ``code_weights`` over x y z, log l w h,
    sin cos, vx vy), attribute cross-entropy (``attr_weight``); Hungarian matching on the same
    costs; the best ``max_boxes`` per sample without NMS."""

    classes: tuple[str, ...] = DETECTION_CLASSES
    num_queries: int = 900
    layers: int = 6
    dim: int = 256
    heads: int = 8
    points: int = 4
    ffn: int = 512
    cls_weight: float = 2.0
    reg_weight: float = 0.25
    attr_weight: float = 0.2
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    code_weights: tuple[float, ...] = (1.0,) * 8 + (0.2, 0.2)
    max_boxes: int = 300
    score_threshold: float = 0.0
    attributes: tuple[str, ...] = NUSCENES_ATTRIBUTES

    @model_validator(mode="after")
    def _check(self):
        if len(self.code_weights) != 10:
            raise ValueError("detr: code_weights has 10 entries (x y z l w h sin cos vx vy)")
        if self.dim % self.heads:
            raise ValueError(f"detr: dim {self.dim} must divide into {self.heads} heads")
        return self


class MapHeadConfig(Frozen):
    """HD-map segmentation on the BEV grid upsampled ``upsample`` times."""

    classes: tuple[str, ...] = MAP_CLASSES
    channels: int = 64
    upsample: int = 1
    dice_weight: float = 1.0
    threshold: float = 0.5


class OccupancyHeadConfig(Frozen):
    """Occ3D occupancy by channel-to-height on the BEV grid (which must be the occupancy grid's
    x, y extent; ``nz`` height slices)."""

    num_classes: int = 18
    nz: int = 16
    channels: int = 64
    free_class: int = 17


class HeadsConfig(Frozen):
    """``detection`` (CenterPoint) or ``detr`` (BEVFormer's head): the 3D box head, one of the two;
    ``map`` and ``occupancy`` besides."""

    detection: DetectionHeadConfig | None = None
    detr: DETRHeadConfig | None = None
    map: MapHeadConfig | None = None
    occupancy: OccupancyHeadConfig | None = None

    @model_validator(mode="after")
    def _one_box_head(self):
        if self.detection is not None and self.detr is not None:
            raise ValueError("heads: detection (CenterPoint) and detr (BEVFormer) are both box heads; keep one")
        return self

    def boxes(self) -> DetectionHeadConfig | DETRHeadConfig | None:
        """The 3D box head's config (CenterPoint's or DETR's), None without one."""
        return self.detection if self.detection is not None else self.detr


class ModelConfig(Frozen):
    """A whole model. ``view_transform`` None: no camera branch; ``lidar`` None: no LiDAR branch;
    both: fused by ``fuser``."""

    name: str = "bevdet-r50"
    grid: GridConfig = GridConfig(xbound=(-51.2, 51.2, 0.8), ybound=(-51.2, 51.2, 0.8), zbound=(-10.0, 10.0, 20.0))
    backbone: BackboneConfig = BackboneConfig()
    neck: NeckConfig = NeckConfig()
    view_transform: ViewTransformConfig | None = ViewTransformConfig()
    lidar: LidarConfig | None = None
    fuser: FuserConfig | None = None
    temporal: TemporalConfig | None = None
    map_prior: MapPriorConfig | None = None
    bev_encoder: BEVEncoderConfig = BEVEncoderConfig()
    heads: HeadsConfig = HeadsConfig(detection=DetectionHeadConfig())

    @model_validator(mode="after")
    def _consistent(self):
        if self.view_transform is None and self.lidar is None:
            raise ValueError("model: needs a camera branch (view_transform) or a lidar branch")
        if self.view_transform is not None and self.lidar is not None and self.fuser is None:
            raise ValueError("model: camera and lidar branches need a fuser")
        if self.fuser is not None and (self.view_transform is None or self.lidar is None):
            raise ValueError("model: a fuser needs both a camera and a lidar branch")
        if self.view_transform is not None and self.view_transform.type == "deform" and self.temporal is not None:
            raise ValueError("model: the deform (BEVFormer) view transform does its own temporal fusion; "
                             "temporal must be null")
        if self.map_prior is not None:
            (_, _, dx), (_, _, dy) = self.grid.xbound, self.grid.ybound
            if abs(dx - dy) > 1e-9:
                raise ValueError("model: a map prior needs square BEV cells (grid dx == dy)")
        if not any(h is not None for h in (self.heads.boxes(), self.heads.map, self.heads.occupancy)):
            raise ValueError("model: at least one head")
        return self
