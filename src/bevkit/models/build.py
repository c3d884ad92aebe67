"""Name -> constructor: one literal dict per kind of component, and ``build_model``.

A variant is a string in the typed config (``ModelConfig``) looked up here; a YAML preset in
``configs/`` holds only what differs from the defaults (``load_config``).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from bevkit.data.nuscenes import CAMERAS
from bevkit.models.backbones import TimmBackbone
from bevkit.models.bev_encoders import NoBEVEncoder, ResNetBEV
from bevkit.models.bev_model import BEVModel
from bevkit.models.bevformer import BEVFormerEncoder
from bevkit.models.config import ModelConfig
from bevkit.models.fusion import ConvFuser
from bevkit.models.heads import CenterHead, DETRHead, MapSegHead, OccupancyHead
from bevkit.models.lidar import PointPillars, SparseVoxelEncoder
from bevkit.models.map_prior import MapPriorFusion
from bevkit.models.necks import FPN, LSSFPN, GeneralizedLSSFPN
from bevkit.models.temporal import BEVDet4D
from bevkit.models.view_transforms import (
    BilinearLift,
    CameraAwareLiftSplat,
    DepthLiftSplat,
    LiftSplat,
)
from bevkit.ops import deform_attn, deform_attn_exportable, deform_attn_reference

NECKS = {"fpn": FPN, "lss_fpn": LSSFPN, "generalized_lss": GeneralizedLSSFPN}
VIEW_TRANSFORMS = {"lss": LiftSplat, "lss_camera_aware": CameraAwareLiftSplat, "lss_depth": DepthLiftSplat,
                   "bilinear": BilinearLift, "deform": BEVFormerEncoder}
LIDAR_ENCODERS = {"pillars": PointPillars, "sparse_voxels": SparseVoxelEncoder}
FUSERS = {"conv": ConvFuser}
TEMPORAL = {"bevdet4d": BEVDet4D}
MAP_PRIORS = {"nmp": MapPriorFusion}
BEV_ENCODERS = {"resnet": ResNetBEV, "none": NoBEVEncoder}
HEADS = {"detection": CenterHead, "detr": DETRHead, "map": MapSegHead, "occupancy": OccupancyHead}
# The deformable attention of the BEVFormer encoder (``view_transform.deform_attn``): same results,
# different memory and speed (docs/benchmarks.md).
DEFORM_ATTN = {"fast": deform_attn, "reference": deform_attn_reference, "exportable": deform_attn_exportable}


def _lookup(table: dict, name: str, kind: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(table)}")
    return table[name]


def build_model(cfg: ModelConfig, load_checkpoint: bool = True, num_cameras: int | None = None) -> BEVModel:
    """Build the model a config describes; with ``load_checkpoint``, the backbone's local
    checkpoint (``cfg.backbone.checkpoint``) is loaded (``weights_only=True``). ``num_cameras``: the
    cameras of its inputs (an experiment's ``data.cameras``), for a BEVFormer encoder's per-camera
    embeddings when ``view_transform.num_cameras`` is unset (both None: 6)."""
    grid = cfg.grid
    backbone = neck = view_transform = lidar = fuser = temporal = map_prior = None
    bev_channels = []
    if cfg.view_transform is not None:
        vt = cfg.view_transform
        backbone = TimmBackbone(cfg.backbone.name, cfg.backbone.out_indices, cfg.backbone.img_size)
        if load_checkpoint and cfg.backbone.checkpoint:
            backbone.load_checkpoint(cfg.backbone.checkpoint)
        neck = _lookup(NECKS, cfg.neck.type, "neck")(backbone.channels, backbone.strides, cfg.neck.channels)
        cls = _lookup(VIEW_TRANSFORMS, vt.type, "view transform")
        if vt.downsample not in (None, 1) and cls not in (LiftSplat, DepthLiftSplat):
            raise ValueError(f"view_transform.downsample is for types lss and lss_depth, not {vt.type!r}")
        if cls in (LiftSplat, DepthLiftSplat):
            view_transform = cls(neck.channels, vt.channels, grid, vt.dbound, neck.stride, vt.downsample)
        elif cls is CameraAwareLiftSplat:
            view_transform = CameraAwareLiftSplat(neck.channels, vt.channels, grid, vt.dbound, neck.stride,
                                                  vt.depth_net_channels, vt.depth_net or "simple")
        elif cls is BEVFormerEncoder:
            view_transform = BEVFormerEncoder(neck.channels, vt.channels, grid, neck.stride, vt.layers, vt.heads,
                                              vt.num_z, vt.points_per_z, vt.tsa_points, vt.ffn,
                                              _lookup(DEFORM_ATTN, vt.deform_attn, "deform_attn"),
                                              vt.num_cameras or num_cameras or len(CAMERAS))
        else:
            view_transform = cls(neck.channels, vt.channels, grid, vt.num_z, neck.stride)
        bev_channels.append(vt.channels)
    if cfg.lidar is not None:
        ld = cfg.lidar
        cls = _lookup(LIDAR_ENCODERS, ld.type, "lidar encoder")
        if cls is SparseVoxelEncoder:
            lidar = SparseVoxelEncoder(grid, ld.channels, ld.point_features, ld.max_points, ld.max_voxels,
                                       ld.voxel_size, ld.base_channels or 16, ld.zbound)
        else:
            lidar = cls(grid, ld.channels, ld.point_features, ld.max_points, ld.max_voxels)
        bev_channels.append(ld.channels)
    if len(bev_channels) > 1:
        fuser = _lookup(FUSERS, cfg.fuser.type, "fuser")(bev_channels, cfg.fuser.channels)
        channels = cfg.fuser.channels
    else:
        channels = bev_channels[0]
    if cfg.temporal is not None:
        temporal = _lookup(TEMPORAL, cfg.temporal.type, "temporal fusion")(grid, channels, cfg.temporal.frames)
        channels = temporal.out_channels
    if cfg.map_prior is not None:
        mp = cfg.map_prior
        map_prior = _lookup(MAP_PRIORS, mp.type, "map prior")(channels, grid.shape, mp.heads, mp.window, mp.ffn,
                                                               mp.kernel)
    be = cfg.bev_encoder
    bev_encoder = _lookup(BEV_ENCODERS, be.type, "BEV encoder")(channels, be.channels, be.blocks, be.out_channels)
    heads = {}
    enc = bev_encoder.out_channels
    if cfg.heads.detection is not None:
        heads["detection"] = HEADS["detection"](enc, grid, cfg.heads.detection)
    if cfg.heads.detr is not None:  # the box head, under the same name: loss, decode and evaluation alike
        heads["detection"] = HEADS["detr"](enc, grid, cfg.heads.detr)
    if cfg.heads.map is not None:
        heads["map"] = HEADS["map"](enc, cfg.heads.map)
    if cfg.heads.occupancy is not None:
        heads["occupancy"] = HEADS["occupancy"](enc, cfg.heads.occupancy)
    return BEVModel(cfg, backbone, neck, view_transform, lidar, fuser, temporal, bev_encoder, heads, map_prior)


def load_config(path: str | Path) -> ModelConfig:
    """The ``model`` section of a YAML preset as a validated ``ModelConfig`` (unknown keys are errors)."""
    path = Path(path)
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    try:
        return ModelConfig(**doc.get("model", {}))
    except ValidationError as e:  # pydantic's message names the field
        raise ValueError(f"{path}: {e}") from None
