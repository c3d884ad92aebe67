"""Camera features to the BEV grid: lift-splat (BEVDet / BEVDepth) and bilinear lifting (Simple-BEV).

Each view transform owns its geometry and recomputes it from the batch's matrices every step
(image and BEV augmentation change it). Pixels follow ``bevkit.geometry.camera``: pixel centres at
integer coordinates, ``pixels = img_aug @ intrinsics @ xyz_cam / z``. A feature cell ``(i, j)`` of
a stride-``s`` map covers pixels ``[j s, (j + 1) s)``, so its centre is at pixel
``((j + 0.5) s - 0.5, (i + 0.5) s - 0.5)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevkit.models.bev_encoders import BasicBlock
from bevkit.models.config import GridConfig
from bevkit.ops import bev_cell_index, bev_pool, bev_pool_exportable, bev_pool_plan, deform_conv2d, exporting
from bevkit.ops.precision import at_least_float32, full_precision


def rigid_inverse(m: Tensor) -> Tensor:
    """Inverse of 4x4 similarity transforms in closed form (``src_from_dst`` from ``dst_from_src``): a
    rotation, possibly with a reflection and a uniform scale (a camera pose composed with ``bev_aug``).

    Shapes:
        m: (..., 4, 4)   returns: (..., 4, 4)
    """
    a = m[..., :3, :3]
    scale2 = (a[..., :, 0] ** 2).sum(-1)[..., None, None]  # s**2, 1 for a rigid transform
    rot_t = a.transpose(-1, -2) / scale2
    out = torch.zeros_like(m)
    out[..., :3, :3] = rot_t
    out[..., :3, 3] = -(rot_t @ m[..., :3, 3:4]).squeeze(-1)
    out[..., 3, 3] = 1.0
    return out


def inverse_3x3(m: Tensor) -> Tensor:
    """Inverse of 3x3 matrices in closed form (adjugate over determinant): element-wise ops only, so it
    exports to ONNX, which has no matrix inverse; ``img_aug @ intrinsics`` is well conditioned.

    Shapes:
        m: (..., 3, 3)   returns: (..., 3, 3)
    """
    a, b, c = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    d, e, f = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    g, h, i = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    adj = torch.stack([e * i - f * h, c * h - b * i, b * f - c * e,
                       f * g - d * i, a * i - c * g, c * d - a * f,
                       d * h - e * g, b * g - a * h, a * e - b * d], dim=-1).unflatten(-1, (3, 3))
    det = a * adj[..., 0, 0] + b * adj[..., 1, 0] + c * adj[..., 2, 0]
    return adj / det[..., None, None]


def feature_pixel_centres(h: int, w: int, stride: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel coordinates (u along W, v along H) of the centres of a stride-``stride`` feature map.

    Shapes:
        returns: u (W,), v (H,)
    """
    u = (torch.arange(w, dtype=like.dtype, device=like.device) + 0.5) * stride - 0.5
    v = (torch.arange(h, dtype=like.dtype, device=like.device) + 0.5) * stride - 0.5
    return u, v


def depth_bin_centres(dbound: tuple[float, float, float], like: Tensor) -> Tensor:
    """Depth (z in the camera frame) at the centre of each bin ``[dmin + i step, dmin + (i + 1) step)``.

    Shapes:
        returns: (D,)
    """
    dmin, dmax, step = dbound
    d = int(round((dmax - dmin) / step))
    return dmin + (torch.arange(d, dtype=like.dtype, device=like.device) + 0.5) * step


def frustum_points_ego(intrinsics: Tensor, img_aug: Tensor, ego_from_cam: Tensor, depths: Tensor,
                       h: int, w: int, stride: int) -> Tensor:
    """Ego-frame points of the frustum: every feature-cell centre at every bin depth.

    ``xyz_cam = inv(img_aug @ intrinsics) @ (u z, v z, z)`` (``img_aug`` is affine, so this is the
    exact inverse of the projection), then ``xyz_ego = ego_from_cam @ xyz_cam``.

    Shapes:
        intrinsics, img_aug: (B, N, 3, 3)   ego_from_cam: (B, N, 4, 4)   depths: (D,)
        returns: (B, N, D, H, W, 3) in ego
    """
    with full_precision(depths):  # float32 at least, whatever autocast is on
        dtype = torch.promote_types(depths.dtype, torch.float32)
        depths, intrinsics, img_aug, ego_from_cam = (t.to(dtype) for t in (depths, intrinsics, img_aug, ego_from_cam))
        u, v = feature_pixel_centres(h, w, stride, depths)
        d = depths.numel()
        pix = torch.stack([u.view(1, 1, w).expand(d, h, w), v.view(1, h, 1).expand(d, h, w),
                           torch.ones(d, h, w, dtype=depths.dtype, device=depths.device)], dim=-1)
        pix = pix * depths.view(d, 1, 1, 1)  # (D, H, W, 3): (u z, v z, z)
        cam_from_img = inverse_3x3(img_aug @ intrinsics)  # (B, N, 3, 3)
        ego_from_img = ego_from_cam[..., :3, :3] @ cam_from_img  # (B, N, 3, 3)
        xyz = torch.einsum("bnij,dhwj->bndhwi", ego_from_img, pix)  # (B, N, D, H, W, 3)
        return xyz + ego_from_cam[..., None, None, None, :3, 3]


class LiftSplat(nn.Module):
    """BEVDet's view transform: a per-pixel depth distribution over D bins lifts each feature
    into a frustum, pooled into BEV cells with ``bevkit.ops.bev_pool``.

    The pooling plan is rebuilt from the batch's geometry every call; under ``torch.export`` (ONNX
    export) the frustum's cells are computed in the graph and pooled with ``bev_pool_exportable``.
    With ``downsample`` f > 1 (BEVFusion's camera branch), the frustum is pooled on a grid f times
    finer than ``grid`` and brought back to it by three 3x3 convs (BN, ReLU), the second of stride f.
    """

    def __init__(self, in_channels: int, channels: int, grid: GridConfig, dbound: tuple[float, float, float],
                 stride: int, downsample: int | None = None):
        super().__init__()
        self.grid = grid
        f = downsample or 1
        if f < 1:
            raise ValueError(f"view_transform.downsample must be >= 1, got {downsample}")
        self.pool_grid = grid if f == 1 else grid.model_copy(update={
            "xbound": (grid.xbound[0], grid.xbound[1], grid.xbound[2] / f),
            "ybound": (grid.ybound[0], grid.ybound[1], grid.ybound[2] / f)})
        self.downsample = None if f == 1 else nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, stride=f, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.dbound = tuple(dbound)
        self.num_bins = int(round((dbound[1] - dbound[0]) / dbound[2]))
        self.channels = channels
        self.stride = stride
        self.depthnet = nn.Conv2d(in_channels, self.num_bins + channels, 1)

    def forward(self, feats: Tensor, intrinsics: Tensor, img_aug: Tensor,
                ego_from_cam: Tensor) -> tuple[Tensor, Tensor]:
        """Lift per-camera features onto the BEV grid.

        Frames: ``feats`` on augmented image pixels; the result on the ego-frame grid.

        Shapes:
            feats: (B, N, C_in, H, W)   intrinsics, img_aug: (B, N, 3, 3)   ego_from_cam: (B, N, 4, 4)
            returns: bev (B, C, Y, X), depth probabilities (B, N, D, H, W)
        """
        b, n, _, h, w = feats.shape
        logits, ctx = self.depth_and_context(feats, intrinsics, img_aug, ego_from_cam)
        depth = logits.softmax(dim=1).view(b, n, self.num_bins, h, w)
        return self.pool(depth, ctx.reshape(b, n, self.channels, h, w), intrinsics, img_aug, ego_from_cam), depth

    def pool(self, depth: Tensor, ctx: Tensor, intrinsics: Tensor, img_aug: Tensor, ego_from_cam: Tensor) -> Tensor:
        """Splat context weighted by depth onto the grid (through the finer grid and the
        downsampling convs when ``downsample`` is set).

        Shapes:
            depth: (B, N, D, H, W)   ctx: (B, N, C, H, W)   returns: (B, C, Y, X)
        """
        h, w = depth.shape[-2:]
        with torch.no_grad():
            depths = depth_bin_centres(self.dbound, intrinsics)
            points = frustum_points_ego(intrinsics, img_aug, ego_from_cam, depths, h, w, self.stride)
            if exporting():  # the cell of every frustum point, in the graph (the plan's sizes depend on data)
                cells = bev_cell_index(points.float(), self.pool_grid.spec())
            else:
                plan = bev_pool_plan(points.float(), self.pool_grid.spec())
        # The compressed-row backward product has no bf16/fp16 kernel on CPU: pool in float32 even under autocast.
        with torch.autocast(device_type=depth.device.type, enabled=False):
            if exporting():
                bev = bev_pool_exportable(depth.float(), ctx.float(), cells, self.pool_grid.spec()).contiguous()
            else:
                bev = bev_pool(depth.float(), ctx.float(), plan).contiguous()  # (B, C, fY, fX)
        if self.downsample is not None:
            bev = self.downsample(bev)  # (B, C, Y, X)
        return bev

    def depth_and_context(self, feats: Tensor, intrinsics: Tensor, img_aug: Tensor,
                          ego_from_cam: Tensor) -> tuple[Tensor, Tensor]:
        """BEVDet's depth net: one 1x1 conv (the camera matrices are not used).

        Shapes:
            feats: (B, N, C_in, H, W)   returns: depth logits (B*N, D, H, W), context (B*N, C, H, W)
        """
        x = self.depthnet(feats.flatten(0, 1))  # (B*N, D + C, H, W)
        return x[:, : self.num_bins], x[:, self.num_bins:]


def nearest_point_depth(points: list[Tensor], intrinsics: Tensor, img_aug: Tensor, ego_from_cam: Tensor,
                        hw: tuple[int, int], stride: int, depth_ok) -> Tensor:
    """Per camera cell of a stride-``stride`` map, the depth (metres along the optical axis) of the
    nearest LiDAR point that projects into it, inf where none does; ``depth_ok(z)`` masks the
    depths a caller accepts.

    Frames: ``points`` (x, y, z first) in the ego frame; cells of the augmented images (pixel
    centres at integer coordinates, cell (i, j) covers pixels [j s, (j + 1) s)).

    Shapes:
        points: B tensors (P_b, F >= 3)   intrinsics, img_aug: (B, N, 3, 3)   ego_from_cam: (B, N, 4, 4)
        returns: (B, N, H * W)
    """
    h, w = hw
    b, n = intrinsics.shape[:2]
    with full_precision(intrinsics):
        return _nearest_point_depth(points, *(at_least_float32(t) for t in (intrinsics, img_aug, ego_from_cam)), h,
                                    w, stride, depth_ok, b, n)


def _nearest_point_depth(points, intrinsics, img_aug, ego_from_cam, h, w, stride, depth_ok, b, n):
    out = torch.full((b, n, h * w), float("inf"), dtype=intrinsics.dtype, device=intrinsics.device)
    cam_from_ego = rigid_inverse(ego_from_cam)  # (B, N, 4, 4)
    img_from_cam = img_aug @ intrinsics  # (B, N, 3, 3)
    for i, pts in enumerate(points):
        xyz = pts[:, :3].to(intrinsics.dtype)  # (P, 3)
        cam = xyz @ cam_from_ego[i, :, :3, :3].transpose(-1, -2) + cam_from_ego[i, :, None, :3, 3]  # (N, P, 3)
        z = cam[..., 2]
        uvw = cam @ img_from_cam[i].transpose(-1, -2)  # (N, P, 3)
        ok = depth_ok(z)
        z_safe = torch.where(ok, z, torch.ones_like(z))
        col = torch.floor((uvw[..., 0] / z_safe + 0.5) / stride)
        row = torch.floor((uvw[..., 1] / z_safe + 0.5) / stride)
        ok &= (col >= 0) & (col < w) & (row >= 0) & (row < h)
        cam_idx = torch.arange(n, device=z.device).view(n, 1).expand_as(z)
        flat = (cam_idx * h * w + row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).long()[ok]
        out[i].view(-1).scatter_reduce_(0, flat, z[ok], reduce="amin")
    return out


def lidar_depth_image(points: list[Tensor], intrinsics: Tensor, img_aug: Tensor, ego_from_cam: Tensor,
                      hw: tuple[int, int]) -> Tensor:
    """Each image pixel's nearest LiDAR depth (metres along the optical axis), 0 where no point
    lands: the sparse depth input of BEVFusion's ``DepthLSSTransform``.

    Frames: ``points`` (x, y, z first) in the ego frame; pixels of the augmented images (centres at
    integer coordinates).

    Shapes:
        points: B tensors (P_b, F >= 3)   intrinsics, img_aug: (B, N, 3, 3)   ego_from_cam: (B, N, 4, 4)
        returns: (B, N, 1, H, W)
    """
    nearest = nearest_point_depth(points, intrinsics, img_aug, ego_from_cam, hw, 1, lambda z: z > 1e-3)
    nearest = torch.where(torch.isfinite(nearest), nearest, torch.zeros_like(nearest))
    return nearest.view(*nearest.shape[:2], 1, *hw)


class DepthLiftSplat(LiftSplat):
    """BEVFusion's ``DepthLSSTransform``: lift-splat whose depth net also sees the LiDAR. The
    points are projected into every image as a sparse depth map (:func:`lidar_depth_image`), which
    three convs (1x1 to 8; 5x5 stride 4 to 32; 5x5 to 64 at the feature stride) encode; it is
    concatenated with the image features, and two 3x3 convs (BN, ReLU) and a 1x1 conv give the D
    depth logits and C context channels. Pooling (and ``downsample``) as :class:`LiftSplat`.
    """

    def __init__(self, in_channels: int, channels: int, grid: GridConfig, dbound: tuple[float, float, float],
                 stride: int, downsample: int | None = None):
        super().__init__(in_channels, channels, grid, dbound, stride, downsample)
        if stride % 4 or stride < 4:
            raise ValueError(f"lss_depth needs a feature stride that is a multiple of 4, got {stride}")
        self.dtransform = nn.Sequential(
            nn.Conv2d(1, 8, 1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 32, 5, stride=4, padding=2), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 5, stride=stride // 4, padding=2), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        self.depthnet = nn.Sequential(
            nn.Conv2d(in_channels + 64, in_channels, 3, padding=1), nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, self.num_bins + channels, 1))

    def forward(self, feats: Tensor, intrinsics: Tensor, img_aug: Tensor, ego_from_cam: Tensor,
                points: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """As :meth:`LiftSplat.forward`, with the sample's LiDAR points (ego frame, B tensors (P_b, F)).

        Shapes:
            feats: (B, N, C_in, H, W)   returns: bev (B, C, Y, X), depth probabilities (B, N, D, H, W)
        """
        if points is None:
            raise ValueError("lss_depth reads the LiDAR points: the batch needs 'points'")
        b, n, _, h, w = feats.shape
        depth_img = lidar_depth_image(points, intrinsics, img_aug, ego_from_cam, (h * self.stride, w * self.stride))
        d = self.dtransform(depth_img.flatten(0, 1).to(feats.dtype))  # (B*N, 64, H, W)
        x = self.depthnet(torch.cat([feats.flatten(0, 1), d[..., :h, :w]], dim=1))  # (B*N, D + C, H, W)
        logits, ctx = x[:, : self.num_bins], x[:, self.num_bins:]
        depth = logits.softmax(dim=1).view(b, n, self.num_bins, h, w)
        return self.pool(depth, ctx.reshape(b, n, self.channels, h, w), intrinsics, img_aug, ego_from_cam), depth


def camera_parameters(intrinsics: Tensor, img_aug: Tensor, ego_from_cam: Tensor) -> Tensor:
    """BEVDepth's camera-aware input: fx, fy, cx, cy, the 2x3 image augmentation and the 3x4
    ``ego_from_cam``, one 22-vector per camera.

    Shapes:
        intrinsics, img_aug: (B, N, 3, 3)   ego_from_cam: (B, N, 4, 4)   returns: (B*N, 22)
    """
    k = torch.stack([intrinsics[..., 0, 0], intrinsics[..., 1, 1], intrinsics[..., 0, 2], intrinsics[..., 1, 2]], -1)
    return torch.cat([k, img_aug[..., :2, :].flatten(-2), ego_from_cam[..., :3, :].flatten(-2)], -1).flatten(0, 1)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLab v3) as BEVDepth's depth branch uses it: a 1x1 conv,
    3x3 convs at dilations 6, 12 and 18, and global average pooling, each to ``channels`` with BN +
    ReLU, concatenated and fused by a 1x1 conv (BN, ReLU, dropout 0.5)."""

    def __init__(self, channels: int, dilations: tuple[int, ...] = (1, 6, 12, 18)):
        super().__init__()

        def branch(k: int, d: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(channels, channels, k, padding=0 if k == 1 else d, dilation=d, bias=False),
                                 nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

        self.branches = nn.ModuleList([branch(1 if d == 1 else 3, d) for d in dilations])
        self.pool = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(inplace=True))
        self.fuse = nn.Sequential(nn.Conv2d(channels * (len(dilations) + 1), channels, 1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Dropout(0.5))

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
        return self.fuse(torch.cat([b(x) for b in self.branches] + [pooled], 1))


class DeformConv2d(nn.Module):
    """A 3x3 deformable convolution (DCN v1, mmcv's ``DCN`` as BEVDepth configures it: no bias,
    ``groups`` weight groups, one offset group) whose offsets come from a 3x3 conv initialised to zero,
    so it starts as an ordinary convolution. Pure PyTorch (``ops.deform_conv2d``)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1, kernel: int = 3):
        super().__init__()
        self.padding, self.groups = kernel // 2, groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel, kernel))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.offset = nn.Conv2d(in_channels, 2 * kernel * kernel, kernel, padding=kernel // 2)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        return deform_conv2d(x, self.offset(x), self.weight, padding=self.padding, groups=self.groups)


class SEGate(nn.Module):
    """BEVDepth's squeeze-and-excitation by camera parameters: ``x * sigmoid(expand(relu(reduce(g))))``
    with 1x1 convs, ``g`` the MLP embedding of the camera."""

    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels, 1)
        self.expand = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(g))))


class CameraAwareLiftSplat(LiftSplat):
    """BEVDepth's depth net on lift-splat: a 3x3 reduction, then context and depth branches each
    gated by an MLP of the camera parameters (intrinsics, image augmentation, extrinsics;
    batch-normalised), so the depth distribution can depend on the camera and its augmentation.
    Lifting and pooling are LiftSplat's.

    ``depth_net``: ``simple`` gates each branch by the sigmoid of the MLP and predicts depth with one
    3x3 conv; ``bevdepth`` is BEVDepth's: squeeze-and-excitation gates (1x1 reduce / expand), and a
    depth branch of three residual blocks, ASPP and a deformable convolution (4 groups) before the
    1x1 depth classifier."""

    def __init__(self, in_channels: int, channels: int, grid: GridConfig, dbound: tuple[float, float, float],
                 stride: int, mid_channels: int = 256, depth_net: str = "simple"):
        super().__init__(in_channels, channels, grid, dbound, stride)
        del self.depthnet
        if depth_net not in ("simple", "bevdepth"):
            raise ValueError(f"unknown depth_net {depth_net!r}; choose 'simple' or 'bevdepth'")
        mid = mid_channels
        self.depth_net = depth_net
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid),
                                    nn.ReLU(inplace=True))
        self.param_norm = nn.BatchNorm1d(22)
        self.depth_mlp = nn.Sequential(nn.Linear(22, mid), nn.ReLU(inplace=True), nn.Linear(mid, mid))
        self.context_mlp = nn.Sequential(nn.Linear(22, mid), nn.ReLU(inplace=True), nn.Linear(mid, mid))
        self.context_out = nn.Conv2d(mid, channels, 1)
        if depth_net == "simple":
            self.depth_out = nn.Sequential(nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid),
                                           nn.ReLU(inplace=True), nn.Conv2d(mid, self.num_bins, 1))
        else:
            if mid % 4:
                raise ValueError(f"depth_net 'bevdepth': depth_net_channels {mid} must divide into 4 groups")
            self.depth_gate, self.context_gate = SEGate(mid), SEGate(mid)
            self.depth_out = nn.Sequential(BasicBlock(mid, mid), BasicBlock(mid, mid), BasicBlock(mid, mid), ASPP(mid),
                                           DeformConv2d(mid, mid, groups=4), nn.Conv2d(mid, self.num_bins, 1))

    def depth_and_context(self, feats: Tensor, intrinsics: Tensor, img_aug: Tensor,
                          ego_from_cam: Tensor) -> tuple[Tensor, Tensor]:
        """Shapes:
            feats: (B, N, C_in, H, W)   intrinsics, img_aug: (B, N, 3, 3)   ego_from_cam: (B, N, 4, 4)
            returns: depth logits (B*N, D, H, W), context (B*N, C, H, W)
        """
        x = self.reduce(feats.flatten(0, 1))  # (B*N, mid, H, W)
        params = self.param_norm(camera_parameters(intrinsics, img_aug, ego_from_cam).to(x.dtype))  # (B*N, 22)
        ctx_embed = self.context_mlp(params)[..., None, None]  # (B*N, mid, 1, 1)
        depth_embed = self.depth_mlp(params)[..., None, None]
        if self.depth_net == "simple":
            return self.depth_out(x * torch.sigmoid(depth_embed)), self.context_out(x * torch.sigmoid(ctx_embed))
        return self.depth_out(self.depth_gate(x, depth_embed)), self.context_out(self.context_gate(x, ctx_embed))


def depth_targets(points: list[Tensor], intrinsics: Tensor, img_aug: Tensor, ego_from_cam: Tensor,
                  hw: tuple[int, int], stride: int, dbound: tuple[float, float, float]) -> Tensor:
    """BEVDepth's depth labels: the keyframe's LiDAR points projected into each camera; each feature
    cell takes the nearest point's depth bin, or -1 where no point lands or the nearest point is
    outside ``dbound`` (a nearer occluder masks the cell, as in BEVDepth).

    Frames: ``points`` (x, y, z first; a fifth column is the time lag, 0 for the keyframe's points,
    and earlier sweeps are left out) in the ego frame of the sample.

    Shapes:
        points: B tensors (P_b, F >= 3)   intrinsics, img_aug: (B, N, 3, 3)
        ego_from_cam: (B, N, 4, 4)   returns: (B, N, H, W) int64 bin index or -1
    """
    h, w = hw
    dmin, dmax, step = dbound
    b, n = intrinsics.shape[:2]
    keyframe = [p[p[:, 4] == 0] if p.shape[1] > 4 else p for p in points]  # moving objects smear in sweeps
    nearest = nearest_point_depth(keyframe, intrinsics, img_aug, ego_from_cam, hw, stride,
                                  lambda z: z > 1e-3)  # (B, N, H * W), inf where no point
    bins = torch.floor((nearest - dmin) / step).clamp(max=round((dmax - dmin) / step) - 1)
    labelled = torch.isfinite(nearest) & (nearest >= dmin) & (nearest < dmax)
    out = torch.where(labelled, bins, torch.full_like(bins, -1)).long()
    return out.view(b, n, h, w)


def depth_loss(depth: Tensor, targets: Tensor) -> Tensor:
    """BEVDepth's depth loss: binary cross-entropy between the predicted distribution and the
    one-hot label, summed over bins and averaged over cells that have a label.

    Shapes:
        depth: (B, N, D, H, W) probabilities   targets: (B, N, H, W) bin or -1   returns: ()
    """
    d = depth.shape[2]
    valid = targets >= 0  # (B, N, H, W)
    with full_precision(depth):  # in float32: half rounds 1 - 1e-6 to 1, and CUDA autocast refuses the BCE
        probs = at_least_float32(depth.permute(0, 1, 3, 4, 2)[valid]).clamp(1e-6, 1 - 1e-6)  # (V, D)
        onehot = F.one_hot(targets[valid], d).to(probs.dtype)
        loss = F.binary_cross_entropy(probs, onehot, reduction="sum")
        return loss / valid.sum().clamp(min=1)


class BilinearLift(nn.Module):
    """Simple-BEV's parameter-free lifting: each voxel centre of the grid (``num_z`` heights) is
    projected into every camera and the feature map is read bilinearly there; cameras that see the
    voxel are averaged, heights are stacked into channels and reduced by a 3x3 conv."""

    def __init__(self, in_channels: int, channels: int, grid: GridConfig, num_z: int, stride: int):
        super().__init__()
        self.grid = grid
        self.num_z = num_z
        self.stride = stride
        self.channels = channels
        self.reduce = nn.Sequential(nn.Conv2d(in_channels * num_z, channels, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

    def voxel_centres(self, like: Tensor) -> Tensor:
        """Ego-frame voxel centres.

        Shapes:
            returns: (Z, Y, X, 3)
        """
        g = self.grid.bev_grid()
        dz = (g.zmax - g.zmin) / self.num_z
        x = g.xmin + (torch.arange(g.nx, dtype=like.dtype, device=like.device) + 0.5) * g.dx
        y = g.ymin + (torch.arange(g.ny, dtype=like.dtype, device=like.device) + 0.5) * g.dy
        z = g.zmin + (torch.arange(self.num_z, dtype=like.dtype, device=like.device) + 0.5) * dz
        zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
        return torch.stack([xx, yy, zz], dim=-1)

    def forward(self, feats: Tensor, intrinsics: Tensor, img_aug: Tensor, ego_from_cam: Tensor) -> tuple[Tensor, None]:
        """Shapes:
            feats: (B, N, C_in, H, W)   intrinsics, img_aug: (B, N, 3, 3)   ego_from_cam: (B, N, 4, 4)
            returns: bev (B, C, Y, X), None (no depth distribution)
        """
        b, n, c, h, w = feats.shape
        with full_precision(feats):  # the projection and sampling positions in float32
            xyz = at_least_float32(self.voxel_centres(feats))  # (Z, Y, X, 3)
            nz, ny, nx = xyz.shape[:3]
            cam_from_ego = rigid_inverse(ego_from_cam.to(xyz.dtype))  # (B, N, 4, 4)
            cam = torch.einsum("bnij,zyxj->bnzyxi", cam_from_ego[..., :3, :3], xyz) \
                + cam_from_ego[..., None, None, None, :3, 3]  # (B, N, Z, Y, X, 3)
            uvw = torch.einsum("bnij,bnzyxj->bnzyxi", img_aug.to(xyz.dtype) @ intrinsics.to(xyz.dtype), cam)
            z = uvw[..., 2]
            in_front = z > 0.1
            uv = uvw[..., :2] / torch.where(in_front, z, torch.ones_like(z)).unsqueeze(-1)
            # Normalised grid_sample coordinates (align_corners=False): pixel u -> 2 (u + 0.5) / (s W) - 1.
            size = uv.new_tensor([self.stride * w, self.stride * h])
            norm = 2 * (uv + 0.5) / size - 1  # (B, N, Z, Y, X, 2)
            seen = in_front & (norm.abs() <= 1).all(dim=-1)  # (B, N, Z, Y, X)
            sampled = F.grid_sample(feats.flatten(0, 1).to(xyz.dtype), norm.view(b * n, nz * ny, nx, 2),
                                    mode="bilinear", padding_mode="zeros",
                                    align_corners=False).to(feats.dtype)  # (B*N, C, Z*Y, X)
        sampled = sampled.view(b, n, c, nz, ny, nx) * seen.unsqueeze(2)
        vox = sampled.sum(1) / seen.sum(1).clamp(min=1).unsqueeze(1)  # (B, C, Z, Y, X)
        return self.reduce(vox.reshape(b, c * nz, ny, nx)), None
