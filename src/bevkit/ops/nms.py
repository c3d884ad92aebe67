"""Batched BEV non-maximum suppression: rotated-box IoU NMS and CenterPoint-style circle NMS."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "bev_corners",
    "rotated_iou_bev",
    "rotated_iou_bev_aligned",
    "nms_rotated",
    "nms_rotated_reference",
    "circle_nms",
    "circle_nms_reference",
]


def bev_corners(boxes: Tensor) -> Tensor:
    """Counter-clockwise BEV corners of rotated boxes.

    Frames: ego (x forward, y left); yaw counter-clockwise about +z from +x, ``l`` along the heading.

    Shapes:
        boxes: (M, 5) ``(x, y, l, w, yaw)``   returns: (M, 4, 2)
    """
    x, y, l, w, yaw = boxes.unbind(-1)
    sx = boxes.new_tensor([0.5, -0.5, -0.5, 0.5])
    sy = boxes.new_tensor([0.5, 0.5, -0.5, -0.5])
    lx = l[:, None] * sx  # (M, 4) box-frame corners, counter-clockwise
    wy = w[:, None] * sy
    cos, sin = torch.cos(yaw)[:, None], torch.sin(yaw)[:, None]
    return torch.stack((x[:, None] + cos * lx - sin * wy, y[:, None] + sin * lx + cos * wy), dim=-1)


def _cross(a: Tensor, b: Tensor) -> Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def rotated_iou_bev(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Pairwise BEV IoU of rotated boxes, vectorised (convex-polygon intersection).

    The intersection polygon's vertices are among: corners of one box inside the
    other, and edge-edge crossings; they are ordered by angle about their mean
    and the area follows from the shoelace formula.

    Shapes:
        boxes_a: (M, 5)   boxes_b: (K, 5) ``(x, y, l, w, yaw)``   returns: (M, K)
    """
    return _iou(boxes_a[:, None], boxes_b[None])


def rotated_iou_bev_aligned(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """IoU of box i of ``boxes_a`` with box i of ``boxes_b``.

    Shapes:
        boxes_a, boxes_b: (M, 5) ``(x, y, l, w, yaw)``   returns: (M,)
    """
    return _iou(boxes_a, boxes_b)


def _iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """IoU over broadcast leading dims: boxes (..., 5) -> (...)."""
    shape = torch.broadcast_shapes(boxes_a.shape[:-1], boxes_b.shape[:-1])
    ca = bev_corners(boxes_a.reshape(-1, 5)).view(*boxes_a.shape[:-1], 4, 2).expand(*shape, 4, 2)
    cb = bev_corners(boxes_b.reshape(-1, 5)).view(*boxes_b.shape[:-1], 4, 2).expand(*shape, 4, 2)
    ea = ca.roll(-1, dims=-2) - ca  # counter-clockwise edges (..., 4, 2)
    eb = cb.roll(-1, dims=-2) - cb
    eps = 1e-6
    # A corner of a is inside b when it is left of (or on) every edge of b.
    a_in_b = (_cross(eb.unsqueeze(-3), ca.unsqueeze(-2) - cb.unsqueeze(-3)) >= -eps).all(-1)  # (..., 4)
    b_in_a = (_cross(ea.unsqueeze(-3), cb.unsqueeze(-2) - ca.unsqueeze(-3)) >= -eps).all(-1)
    # Edge i of a against edge j of b: p + t r = q + u s.
    p, r = ca.unsqueeze(-2), ea.unsqueeze(-2)  # (..., 4, 1, 2)
    q, s = cb.unsqueeze(-3), eb.unsqueeze(-3)  # (..., 1, 4, 2)
    denom = _cross(r, s)  # (..., 4, 4)
    ok = denom.abs() > 1e-12
    safe = torch.where(ok, denom, torch.ones_like(denom))
    t = _cross(q - p, s) / safe
    u = _cross(q - p, r) / safe
    hit = ok & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
    cross_pts = (p + t.unsqueeze(-1) * r).flatten(-3, -2)  # (..., 16, 2)
    pts = torch.cat((ca, cb, cross_pts), dim=-2)  # (..., 24, 2)
    valid = torch.cat((a_in_b, b_in_a, hit.flatten(-2)), dim=-1)  # (..., 24)
    count = valid.sum(-1, keepdim=True)
    centre = (pts * valid.unsqueeze(-1)).sum(-2, keepdim=True) / count.clamp(min=1).unsqueeze(-1)
    rel = pts - centre
    angle = torch.atan2(rel[..., 1], rel[..., 0])
    angle = torch.where(valid, angle, torch.full_like(angle, 10.0))  # invalid points last
    order = angle.argsort(dim=-1)
    rel = torch.gather(rel, -2, order.unsqueeze(-1).expand_as(rel))
    valid = torch.gather(valid, -1, order)
    rel = torch.where(valid.unsqueeze(-1), rel, rel[..., :1, :])  # pad with the first vertex
    area2 = _cross(rel, rel.roll(-1, dims=-2)).sum(-1)  # twice the signed area
    inter = torch.where(count.squeeze(-1) >= 3, area2.abs() * 0.5, torch.zeros_like(area2))
    area_a = boxes_a[..., 2] * boxes_a[..., 3]
    area_b = boxes_b[..., 2] * boxes_b[..., 3]
    return inter / (area_a + area_b - inter).clamp(min=1e-12)


def _greedy(suppress: Tensor) -> Tensor:
    """Greedy pass over score-sorted boxes; ``suppress[i, j]`` says box i removes box j (j > i)."""
    n = suppress.shape[0]
    alive = torch.ones(n, dtype=torch.bool)
    rows = suppress.cpu().numpy()
    keep = alive.numpy()
    for i in range(n):
        if keep[i]:
            keep[i + 1:] &= ~rows[i, i + 1:]
    return torch.from_numpy(keep).nonzero().squeeze(1)


def _batched_suppress(boxes: Tensor, scores: Tensor, groups: Tensor | None, overlap, reach: Tensor | None,
                      chunk: int):
    """Suppression matrix by chunks of rows, then the greedy pass; returns kept input indices.

    ``overlap(a, b)`` decides suppression for aligned pairs. When ``reach`` (M,) is given,
    only pairs with centre distance below ``reach_i + reach_j`` are evaluated.
    """
    order = scores.argsort(descending=True, stable=True)
    boxes = boxes[order]
    if groups is not None:
        groups = groups[order]
    if reach is not None:
        reach = reach[order]
    n = boxes.shape[0]
    suppress = torch.zeros(n, n, dtype=torch.bool, device=boxes.device)
    for r0 in range(0, n, chunk):
        rows = torch.arange(r0, min(r0 + chunk, n), device=boxes.device)
        cand = rows[:, None] < torch.arange(n, device=boxes.device)[None]  # only later boxes
        if groups is not None:
            cand &= groups[rows, None] == groups[None]
        if reach is not None:
            dist = (boxes[rows, None, :2] - boxes[None, :, :2]).norm(dim=-1)
            cand &= dist < reach[rows, None] + reach[None]
        i, j = cand.nonzero(as_tuple=True)
        if i.numel():
            hit = overlap(boxes[rows[i]], boxes[j])
            suppress[rows[i[hit]], j[hit]] = True
    return order[_greedy(suppress).to(order.device)]


def nms_rotated(boxes: Tensor, scores: Tensor, iou_threshold: float, groups: Tensor | None = None,
                chunk: int = 512) -> Tensor:
    """Batched rotated-box NMS in BEV: vectorised IoU on candidate pairs, then one greedy pass.

    Boxes with different ``groups`` values (e.g. ``batch * num_classes + label``)
    never suppress each other. A box is removed when its IoU with a kept,
    higher-scoring box exceeds ``iou_threshold``. Ties in score keep input order.
    Only pairs in the same group whose circumscribed circles meet get an exact IoU.

    Frames: boxes in ego BEV ``(x, y, l, w, yaw)``.

    Shapes:
        boxes: (M, 5)   scores: (M,)   groups: (M,) int or None
        returns: (K,) int64 indices of kept boxes, by descending score
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    reach = 0.5 * torch.hypot(boxes[:, 2], boxes[:, 3])  # circumscribed circle radius
    return _batched_suppress(boxes, scores, groups,
                             lambda a, b: rotated_iou_bev_aligned(a, b) > iou_threshold, reach, chunk)


def nms_rotated_reference(boxes: Tensor, scores: Tensor, iou_threshold: float,
                          groups: Tensor | None = None) -> Tensor:
    """Reference rotated NMS: a Python greedy loop with shapely polygon IoU.

    Shapes:
        boxes: (M, 5)   scores: (M,)   groups: (M,) or None   returns: (K,) int64
    """
    from shapely.geometry import Polygon

    polys = [Polygon(c.tolist()) for c in bev_corners(boxes.double())]
    order = sorted(range(len(polys)), key=lambda i: (-float(scores[i]), i))
    kept: list[int] = []
    for i in order:
        ok = True
        for j in kept:
            if groups is not None and int(groups[i]) != int(groups[j]):
                continue
            inter = polys[i].intersection(polys[j]).area
            iou = inter / (polys[i].area + polys[j].area - inter)
            if iou > iou_threshold:
                ok = False
                break
        if ok:
            kept.append(i)
    return torch.tensor(kept, dtype=torch.long, device=boxes.device)


def circle_nms(centres: Tensor, scores: Tensor, radius: float, groups: Tensor | None = None,
               chunk: int = 2048) -> Tensor:
    """Batched circle NMS (CenterPoint): drop a centre within ``radius`` of a kept, better one.

    ``radius`` is a distance in metres; CenterPoint's ``min_radius`` values are thresholds on the squared
    distance, so pass their square roots.

    Frames: centres in ego BEV ``(x, y)`` metres.

    Shapes:
        centres: (M, 2)   scores: (M,)   groups: (M,) int or None
        returns: (K,) int64 indices of kept centres, by descending score
    """
    if centres.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=centres.device)
    r2 = radius * radius
    return _batched_suppress(centres, scores, groups,
                             lambda a, b: ((a - b) ** 2).sum(-1) <= r2, None, chunk)


def circle_nms_reference(centres: Tensor, scores: Tensor, radius: float,
                         groups: Tensor | None = None) -> Tensor:
    """Reference circle NMS: a Python greedy loop.

    Shapes:
        centres: (M, 2)   scores: (M,)   groups: (M,) or None   returns: (K,) int64
    """
    pts = centres.tolist()
    order = sorted(range(len(pts)), key=lambda i: (-float(scores[i]), i))
    kept: list[int] = []
    for i in order:
        if all(
            (groups is not None and int(groups[i]) != int(groups[j]))
            or math.dist(pts[i], pts[j]) > radius
            for j in kept
        ):
            kept.append(i)
    return torch.tensor(kept, dtype=torch.long, device=centres.device)
