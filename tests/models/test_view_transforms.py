"""Lift-splat geometry and BEVDepth's depth labels against hand-computed points."""

import math

import torch
from tiny_batch import rig

from bevkit.models.config import GridConfig
from bevkit.models.view_transforms import (
    BilinearLift,
    LiftSplat,
    depth_bin_centres,
    depth_loss,
    depth_targets,
    feature_pixel_centres,
    frustum_points_ego,
    rigid_inverse,
)


def _augmented_rig():
    intr, ego_from_cam = rig(2)
    c, s = math.cos(0.1), math.sin(0.1)
    # flip, rotate, resize
    flip_rot = torch.tensor([[-0.8 * c, 0.8 * s, 150.0], [0.8 * s, 0.8 * c, -4.0], [0.0, 0.0, 1.0]])
    img_aug = torch.stack([torch.eye(3), flip_rot]).unsqueeze(0)  # (1, 2, 3, 3)
    return intr.unsqueeze(0), img_aug, ego_from_cam.unsqueeze(0)


def test_frustum_point_projects_back_to_its_pixel_through_img_aug_and_intrinsics():
    intr, img_aug, ego_from_cam = _augmented_rig()
    depths = depth_bin_centres((1.0, 13.0, 1.0), intr)
    pts = frustum_points_ego(intr, img_aug, ego_from_cam, depths, 4, 11, 16)  # (1, 2, D, 4, 11, 3)
    u, v = feature_pixel_centres(4, 11, 16, intr)
    cam_from_ego = rigid_inverse(ego_from_cam)
    for n in range(2):
        xyz_cam = pts[0, n] @ cam_from_ego[0, n, :3, :3].T + cam_from_ego[0, n, :3, 3]  # (D, H, W, 3)
        uvw = xyz_cam @ (img_aug[0, n] @ intr[0, n]).T
        pix = uvw[..., :2] / uvw[..., 2:3]
        torch.testing.assert_close(pix[..., 0], u.expand(12, 4, 11), atol=1e-3, rtol=0)
        torch.testing.assert_close(pix[..., 1], v.view(4, 1).expand(12, 4, 11), atol=1e-3, rtol=0)
        torch.testing.assert_close(xyz_cam[..., 2], depths.view(12, 1, 1).expand(12, 4, 11), atol=1e-4, rtol=0)


def test_frustum_of_the_front_camera_by_hand():
    # Front camera at (1.5, 0, 1.5) looking along ego +x, f = 80 px, principal point at the centre pixel.
    intr, img_aug, ego_from_cam = _augmented_rig()
    pts = frustum_points_ego(intr[:, :1], img_aug[:, :1], ego_from_cam[:, :1], torch.tensor([10.0]), 4, 11, 16)
    # Feature column 5 is centred on pixel u = 87.5 = cx (the optical axis); row 2 on v = 39.5 = cy + 8.
    torch.testing.assert_close(pts[0, 0, 0, 2, 5], torch.tensor([11.5, 0.0, 1.5 - 8 / 80 * 10]))
    # Column 0 (u = 7.5) is 80 px left of the axis: y = +80 / 80 * 10 (ego y points left).
    torch.testing.assert_close(pts[0, 0, 0, 2, 0], torch.tensor([11.5, 10.0, 0.5]))


def test_depth_labels_take_the_nearest_point_of_each_cell():
    intr, img_aug, ego_from_cam = _augmented_rig()
    points = torch.tensor([
        [11.5, 0.0, 0.5, 0.0, 0.0],  # depth 10, pixel (87.5, 39.5): cell (2, 5), bin 9
        [13.0, 0.0, 0.35, 0.0, 0.0],  # same ray, depth 11.5: farther, ignored for that cell
        [20.0, 0.0, 1.5, 0.0, 0.0],  # depth 18.5: beyond dbound
        [-5.0, 0.0, 1.5, 0.0, 0.0],  # behind the front camera; 4 m in front of the back one (x = -1)
    ])
    labels = depth_targets([points], intr[:, :1], img_aug[:, :1], ego_from_cam[:, :1], (4, 11), 16, (1.0, 13.0, 1.0))
    assert labels.shape == (1, 1, 4, 11)
    expected = torch.full((4, 11), -1)
    expected[2, 5] = 9
    torch.testing.assert_close(labels[0, 0], expected)
    both = depth_targets([points], intr[:, :], torch.eye(3).expand(1, 2, 3, 3), ego_from_cam, (4, 11), 16,
                         (1.0, 13.0, 1.0))
    # The back camera sees (-5, 0, 1.5) on its optical axis at depth 4 (bin 3), in row 1 (v = 23.5) or 2?
    # v = cy = 31.5 lies on the border of rows 1 ([15.5, 31.5)) and 2 ([31.5, 47.5)): row 2.
    assert both[0, 1, 2, 5] == 3 and (both[0, 1] >= 0).sum() == 1
    # A point nearer than dbound's 1 m in front of the labelled one masks the cell (BEVDepth takes the
    # nearest point first, then drops it if out of range), and earlier sweeps (time lag > 0) are ignored.
    occluder = torch.tensor([[1.5 + 0.9, 0.0, 1.5 - 0.09, 0.0, 0.0]])  # depth 0.9 on the same ray
    masked = depth_targets([torch.cat([points, occluder])], intr[:, :1], img_aug[:, :1], ego_from_cam[:, :1],
                           (4, 11), 16, (1.0, 13.0, 1.0))
    assert (masked[0, 0] >= 0).sum() == 0
    swept = points.clone()
    swept[:, 4] = 0.05
    assert (depth_targets([swept], intr[:, :1], img_aug[:, :1], ego_from_cam[:, :1], (4, 11), 16,
                          (1.0, 13.0, 1.0)) >= 0).sum() == 0


def test_depth_loss_prefers_the_labelled_bin():
    labels = torch.full((1, 1, 2, 2), -1)
    labels[0, 0, 1, 1] = 2
    right = torch.full((1, 1, 4, 2, 2), 0.01)
    right[0, 0, 2] = 0.97
    wrong = right.roll(1, dims=2)
    assert depth_loss(right, labels) < 0.2 < depth_loss(wrong, labels)


def test_lift_splat_puts_a_feature_in_the_cell_its_ray_and_depth_hit():
    # One camera, one depth bin [9.5, 10.5): every feature pixel lands at depth 10 along its ray.
    intr, img_aug, ego_from_cam = _augmented_rig()
    grid = GridConfig(xbound=(-12.8, 12.8, 0.8), ybound=(-12.8, 12.8, 0.8), zbound=(-5.0, 3.0, 8.0))
    lss = LiftSplat(in_channels=11, channels=1, grid=grid, dbound=(9.5, 10.5, 1.0), stride=16)
    with torch.no_grad():  # context channel = one-hot of the feature column
        lss.depthnet.weight.zero_()
        lss.depthnet.bias.zero_()
        lss.depthnet.weight[1, 5, 0, 0] = 1.0
    feats = torch.zeros(1, 1, 11, 4, 11)
    feats[0, 0, 5, :, 5] = 1.0  # the optical-axis column carries 1 on channel 5
    bev, depth = lss(feats, intr[:, :1], img_aug[:, :1], ego_from_cam[:, :1])
    assert bev.shape == (1, 1, 32, 32) and depth.shape == (1, 1, 1, 4, 11)
    # x = 1.5 + 10 = 11.5 -> ix = floor((11.5 + 12.8) / 0.8) = 30; y = 0 -> iy = 16; the 4 rows share the cell.
    hot = (bev[0, 0] > 0).nonzero().tolist()
    assert hot == [[16, 30]]
    # Rows 0..3 (v = 7.5, 23.5, 39.5, 55.5) reach z = 1.5 - (v - 31.5) / 80 * 10 = 4.5, 2.5, 0.5, -1.5:
    # row 0 is above the grid's z range [-5, 3), the other three pool into the cell.
    assert float(bev[0, 0, 16, 30].detach()) == 3.0


def test_bilinear_lift_reads_the_camera_that_sees_a_voxel():
    intr, _, ego_from_cam = _augmented_rig()
    grid = GridConfig(xbound=(-12.8, 12.8, 0.8), ybound=(-12.8, 12.8, 0.8), zbound=(-1.0, 3.0, 4.0))
    lift = BilinearLift(in_channels=1, channels=1, grid=grid, num_z=1, stride=16)
    feats = torch.zeros(1, 2, 1, 4, 11)
    feats[0, 0] = 1.0  # the front camera's features are 1, the back camera's 0
    centres = lift.voxel_centres(feats)  # (1, 32, 32, 3) at z = 1
    assert torch.allclose(centres[0, 16, 30], torch.tensor([11.6, 0.4, 1.0]))
    # Inspect the sampled volume through the module's own pieces: with the reduction an identity.
    with torch.no_grad():
        lift.reduce[0].weight.zero_()
        lift.reduce[0].weight[0, 0, 1, 1] = 1.0
    lift.reduce[1].eval()  # BN with running stats (0, 1): identity up to eps
    out, _ = lift(feats, intr[:, :1].expand(1, 2, 3, 3), torch.eye(3).expand(1, 2, 3, 3), ego_from_cam)
    assert out[0, 0, 16, 30] > 0.99  # straight ahead of the front camera
    assert out[0, 0, 16, 1] == 0  # straight behind: only the back camera (zeros) sees it


def test_camera_aware_depth_depends_on_the_camera_and_its_augmentation():
    from bevkit.models.view_transforms import CameraAwareLiftSplat

    intr, img_aug, ego_from_cam = _augmented_rig()
    grid = GridConfig(xbound=(-12.8, 12.8, 0.8), ybound=(-12.8, 12.8, 0.8), zbound=(-5.0, 3.0, 8.0))
    torch.manual_seed(0)
    lss = CameraAwareLiftSplat(8, 4, grid, (1.0, 13.0, 1.0), 16, mid_channels=16).eval()
    feats = torch.randn(1, 1, 8, 4, 11).expand(1, 2, 8, 4, 11)  # the same features in both cameras
    with torch.no_grad():
        one_pose = ego_from_cam[:, :1].expand(1, 2, 4, 4)
        same = lss.depth_and_context(feats, intr, torch.eye(3).expand(1, 2, 3, 3), one_pose)[0]
        aug = lss.depth_and_context(feats, intr, img_aug, one_pose)[0]
    torch.testing.assert_close(same[0], same[1])  # identical cameras, identical depth
    assert not torch.allclose(aug[0], aug[1])  # camera 1 was flipped, rotated and resized
    bev, depth = lss(feats, intr, img_aug, ego_from_cam)
    assert bev.shape == (1, 4, 32, 32) and depth.shape == (1, 2, 12, 4, 11)
