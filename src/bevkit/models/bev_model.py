"""The composition: cameras and/or LiDAR -> one BEV grid -> BEV encoder -> heads.

Tensors in, tensors out. A batch is the collated sample dict of ``bevkit.data.dataset``; the model
reads only the keys its branches need:

- camera branch: ``images`` (B, N, 3, H, W) uint8 (or float, already normalised), ``intrinsics``,
  ``img_aug`` (B, N, 3, 3), ``ego_from_cam`` (B, N, 4, 4), and the BEV augmentation ``bev_aug``
  (B, 4, 4) if any: the cameras are placed in the augmented ego frame (``bev_aug @ ego_from_cam``),
  where the points, boxes, map and occupancy targets already are (as BEVDet applies its BDA matrix
  to the frustum);
- LiDAR branch (and the depth loss): ``points``, B tensors (P_b, 5) in ego; or, for PointPillars,
  ``pillars``: ``(features (V, M, F), coords (V, 4), counts (V,), B)`` from ``PointPillars.pillars``
  (what an exported graph takes, voxelisation having data-dependent sizes);
- temporal (BEVDet4D, or BEVFormer's temporal self-attention with T = 2): optional ``prev_bev``
  (B, T-1, C, Y, X) and ``curr_from_prev`` (B, T-1, 4, 4); for BEVFormer an optional ``prev_valid`` (B,)
  bool, False where ``prev_bev`` holds nothing (the queries stand in, as without ``prev_bev``).
  The caller keeps the returned ``bev`` of each frame and passes it back with the next one; the
  model stores nothing between calls.
- map prior (Neural Map Prior): optional ``map_prior`` (B, C, Y, X), the global map memory read on
  this batch's grid (``models.map_prior.MapPriorMemory.read``); the model returns the fused map as
  ``map_prior_update`` for the caller to write back. Without it the prior is zero (nothing observed).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bevkit.data.dataset import normalise
from bevkit.models.bevformer import BEVFormerEncoder
from bevkit.models.config import ModelConfig
from bevkit.models.map_prior import MapPriorFusion
from bevkit.models.view_transforms import DepthLiftSplat, depth_loss, depth_targets
from bevkit.ops.precision import full_precision


def camera_geometry(batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """``intrinsics``, ``img_aug`` and the cameras' poses in the (augmented) ego frame of the batch:
    ``bev_aug @ ego_from_cam``, the frame of the points and targets.

    Shapes:
        returns: (B, N, 3, 3), (B, N, 3, 3), (B, N, 4, 4)
    """
    ego_from_cam = batch["ego_from_cam"]
    aug = batch.get("bev_aug")
    if aug is not None:
        with full_precision(ego_from_cam):  # poses stay float32 under autocast
            ego_from_cam = aug.to(ego_from_cam).unsqueeze(1) @ ego_from_cam
    return batch["intrinsics"], batch["img_aug"], ego_from_cam

class BEVModel(nn.Module):
    """Backbone + neck + view transform (camera), pillars (LiDAR), fuser, temporal, map prior, BEV
    encoder, heads."""

    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None, neck: nn.Module | None,
                 view_transform: nn.Module | None, lidar: nn.Module | None, fuser: nn.Module | None,
                 temporal: nn.Module | None, bev_encoder: nn.Module, heads: dict[str, nn.Module],
                 map_prior: MapPriorFusion | None = None):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.neck = neck
        self.view_transform = view_transform
        self.lidar = lidar
        self.fuser = fuser
        self.temporal = temporal
        self.map_prior = map_prior
        self.bev_encoder = bev_encoder
        self.heads = nn.ModuleDict(heads)

    def image_features(self, images: Tensor) -> Tensor:
        """Shapes:
            images: (B, N, 3, H, W) uint8 or normalised float   returns: (B, N, C, H / s, W / s)
        """
        b, n = images.shape[:2]
        x = normalise(images) if images.dtype == torch.uint8 else images
        feats = self.neck(self.backbone(x.flatten(0, 1)))  # (B*N, C, H/s, W/s)
        return feats.view(b, n, *feats.shape[1:])

    def encode(self, batch: dict) -> tuple[Tensor, Tensor | None]:
        """The fused camera / LiDAR BEV of one frame, before temporal fusion (the state a temporal model
        passes to the next frame), and the depth distribution of ``lss`` view transforms.

        Shapes:
            returns: bev (B, C_bev, Y, X) on ``cfg.grid`` (ego frame), depth (B, N, D, H', W') or None
        """
        bevs, depth = [], None
        if self.view_transform is not None:
            feats = self.image_features(batch["images"])
            geometry = camera_geometry(batch)
            if isinstance(self.view_transform, BEVFormerEncoder):  # reads its own history
                cam_bev, depth = self.view_transform(feats, *geometry, batch.get("prev_bev"),
                                                     batch.get("curr_from_prev"), batch.get("prev_valid"))
            elif isinstance(self.view_transform, DepthLiftSplat):  # BEVFusion: LiDAR depth into the depth net
                cam_bev, depth = self.view_transform(feats, *geometry, batch.get("points"))
            else:
                cam_bev, depth = self.view_transform(feats, *geometry)
            bevs.append(cam_bev)
        if self.lidar is not None:
            if "pillars" in batch:  # voxelised outside (an exported graph): (features, coords, counts, batch size)
                bevs.append(self.lidar.encode_pillars(*batch["pillars"]))
            else:
                bevs.append(self.lidar(batch["points"]))
        bev = self.fuser(bevs) if self.fuser is not None else bevs[0]  # (B, C, Y, X)
        return bev, depth

    def fuse(self, bev: Tensor, batch: dict) -> tuple[Tensor, Tensor | None]:
        """Temporal fusion (with ``batch["prev_bev"]`` / ``curr_from_prev`` when present), then the map
        prior (with ``batch["map_prior"]`` when present): the map the BEV encoder reads, and the map
        prior's update for the global memory (None without a map prior).

        Shapes:
            bev: (B, C_bev, Y, X)   returns: (B, C, Y, X), (B, C, Y, X) or None
        """
        if self.temporal is not None:
            bev = self.temporal(bev, batch.get("prev_bev"), batch.get("curr_from_prev"))
        if self.map_prior is None:
            return bev, None
        return self.map_prior(bev, batch.get("map_prior"))

    def features(self, bev: Tensor, batch: dict) -> Tensor:
        """Temporal fusion, the map prior and the BEV encoder: the map every head reads (what
        ``bevkit cache`` stores).

        Shapes:
            bev: (B, C_bev, Y, X)   returns: (B, C_enc, Y, X)
        """
        return self.bev_encoder(self.fuse(bev, batch)[0])

    def forward(self, batch: dict) -> dict:
        """Run every branch and head.

        Frames: the BEV maps and head outputs are on the ego-frame grid ``cfg.grid``.

        Shapes:
            returns: {"bev": (B, C_bev, Y, X) the fused BEV before temporal fusion (next frame's
                      state), "features": (B, C_enc, Y, X) the BEV encoder's output,
                      "depth": (B, N, D, H', W') with ``lss`` / ``lss_camera_aware``,
                      "map_prior_update": (B, C, Y, X) with a map prior (write it back to the memory),
                      and one entry per head:
                      "detection" (see ``CenterHead.forward`` or ``DETRHead.forward``), "map" (B, K, Y', X'),
                      "occupancy" (B, 18, Z, Y, X)}
        """
        bev, depth = self.encode(batch)
        out: dict = {"bev": bev}
        if depth is not None:
            out["depth"] = depth
        fused, update = self.fuse(bev, batch)
        if update is not None:
            out["map_prior_update"] = update
        x = self.bev_encoder(fused)
        out["features"] = x
        for name, head in self.heads.items():
            out[name] = head(x)
        return out

    def loss(self, outputs: dict, targets: dict) -> dict[str, Tensor]:
        """Every head's loss terms and, when configured, BEVDepth's depth loss; ``loss`` is their sum.

        ``targets`` is the batch: ``boxes``/``labels``/``attributes`` (detection), ``map`` (map), ``occupancy`` and
        ``mask_camera`` (occupancy), ``points`` and the camera matrices (depth).
        """
        terms: dict[str, Tensor] = {}
        if "detection" in self.heads:
            terms.update(self.heads["detection"].loss(outputs["detection"], targets["boxes"], targets["labels"],
                                                      targets.get("attributes")))
        if "map" in self.heads:
            terms.update(self.heads["map"].loss(outputs["map"], targets["map"]))
        if "occupancy" in self.heads:
            terms.update(self.heads["occupancy"].loss(outputs["occupancy"], targets["occupancy"],
                                                      targets.get("mask_camera")))
        vt = self.cfg.view_transform
        if vt is not None and vt.depth_loss_weight > 0 and "depth" in outputs:
            depth = outputs["depth"]
            labels = depth_targets(targets["points"], *camera_geometry(targets), depth.shape[-2:],
                                   self.view_transform.stride, self.view_transform.dbound)
            terms["depth"] = vt.depth_loss_weight * depth_loss(depth, labels)
        terms["loss"] = sum(terms.values())
        return terms

    @torch.no_grad()
    def decode(self, outputs: dict) -> dict:
        """Each head's predictions: "detection" per-sample {boxes (M, 9) ego, scores, labels, attributes},
        "map" (B, K, Y, X) bool, "occupancy" (B, X, Y, Z) uint8 (Occ3D layout)."""
        return {name: head.decode(outputs[name]) for name, head in self.heads.items()}
