"""CenterPoint-style 3D detection on the BEV grid: class-group heatmaps and box regression.

Targets and decoding use the grid's cell convention: cell (iy, ix) spans
``[xmin + ix dx, xmin + (ix + 1) dx)``; a box centre ``x`` has continuous cell coordinate
``fx = (x - xmin) / dx``, lands in cell ``floor(fx)`` and regresses the offset ``fx - floor(fx)``.
Boxes are ego-frame ``(x, y, z, l, w, h, yaw, vx, vy)`` as in the data contract. Attributes
(``cfg.attributes``, nuScenes' eight by default) are classified at object centres; a class takes only
the attributes whose name starts with its prefix (``CLASS_ATTRIBUTE_PREFIX``: vehicles ``vehicle.``,
bicycles and motorcycles ``cycle.``, pedestrians ``pedestrian.``), barriers and cones none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevkit.models.config import CLASS_ATTRIBUTE_PREFIX, DetectionHeadConfig, GridConfig
from bevkit.models.necks import conv_bn_relu
from bevkit.ops import circle_nms

# Regression channels per task and their layout in the 10-long code:
# dx dy | z | log l, log w, log h | sin yaw, cos yaw | vx vy
BRANCHES = {"offset": 2, "height": 1, "size": 3, "rot": 2, "vel": 2}


def gaussian_radius(length: Tensor, width: Tensor, min_overlap: float) -> Tensor:
    """CenterNet / CenterPoint's radius (in cells) so that a box shifted by it keeps IoU
    ``min_overlap`` with the truth: the smallest root of the three quadratic cases.

    Shapes:
        length, width: (M,) in cells   returns: (M,)
    """
    h, w = length, width
    b1 = h + w
    c1 = w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2 = 2 * (h + w)
    c2 = (1 - min_overlap) * w * h
    r2 = (b2 + torch.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (h + w)
    c3 = (min_overlap - 1) * w * h
    r3 = (b3 + torch.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


LOG_SIZE_LIMIT = 5.0  # decoded box sizes stay within [exp(-5), exp(5)] = [7 mm, 148 m]


class SeparateHead(nn.Module):
    """One task's branches: heatmap (one channel per class) and the regression maps."""

    def __init__(self, cin: int, channels: int, num_classes: int, num_attributes: int):
        super().__init__()
        outs = {"heatmap": num_classes, **BRANCHES}
        if num_attributes:  # groups whose classes take no attribute (barrier, cone) have no branch
            outs["attr"] = num_attributes
        self.branches = nn.ModuleDict({k: nn.Sequential(conv_bn_relu(cin, channels), nn.Conv2d(channels, c, 1))
                                       for k, c in outs.items()})
        nn.init.constant_(self.branches["heatmap"][-1].bias, -2.19)  # prior 0.1, as CenterPoint

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Shapes:
            x: (B, C, Y, X)   returns: {heatmap (B, K_t, Y, X), offset (B, 2, Y, X), height (B, 1, Y, X),
                                      size (B, 3, Y, X), rot (B, 2, Y, X), vel (B, 2, Y, X),
                                      attr (B, A, Y, X) when the group takes attributes}
        """
        return {k: b(x) for k, b in self.branches.items()}


class CenterHead(nn.Module):
    """CenterPoint's head: a shared 3x3 conv, then one :class:`SeparateHead` per class group."""

    def __init__(self, in_channels: int, grid: GridConfig, cfg: DetectionHeadConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = grid
        self.shared = conv_bn_relu(in_channels, cfg.channels)
        # Global class index of each task's channels.
        self.task_classes = [[cfg.classes.index(c) for c in t] for t in cfg.tasks]
        # allowed[k, a]: class k may take attribute a.
        allowed = [[c in CLASS_ATTRIBUTE_PREFIX and a.startswith(CLASS_ATTRIBUTE_PREFIX[c]) for a in cfg.attributes]
                   for c in cfg.classes]
        self.register_buffer("allowed", torch.tensor(allowed, dtype=torch.bool).view(len(cfg.classes), -1),
                             persistent=False)
        self.tasks = nn.ModuleList(
            SeparateHead(cfg.channels, cfg.channels, len(t),
                         len(cfg.attributes) if any(any(allowed[k]) for k in ks) else 0)
            for t, ks in zip(cfg.tasks, self.task_classes))

    def forward(self, bev: Tensor) -> list[dict[str, Tensor]]:
        """Shapes:
            bev: (B, C, Y, X)
            returns: per task {heatmap (B, K_t, Y, X) logits, offset (B, 2, Y, X), height (B, 1, Y, X),
                     size (B, 3, Y, X) log metres, rot (B, 2, Y, X) sin/cos, vel (B, 2, Y, X) m/s,
                     attr (B, A, Y, X) logits, when a class of the group takes attributes}
        """
        x = self.shared(bev)
        return [t(x) for t in self.tasks]

    # ---- targets and loss ----------------------------------------------------------------

    def targets(self, boxes: list[Tensor], labels: list[Tensor],
                attributes: list[list[str]] | None = None) -> list[dict[str, Tensor]]:
        """Gaussian heatmaps and regression targets per task.

        Frames: boxes in the ego frame; heatmaps on the grid.

        Shapes:
            boxes: B tensors (M_b, 9)   labels: B tensors (M_b,)   attributes: B lists of M_b names or None
            returns: per task {heatmap (B, K_t, Y, X), index (B, M_max) flat cell, code (B, M_max, 10),
                     mask (B, M_max, 10) 1 where the entry is supervised,
                     attr (B, M_max) attribute index, -1 where none or not one the class may take}
        """
        g = self.grid.bev_grid()
        ny, nx = g.ny, g.nx
        device = boxes[0].device if boxes else torch.device("cpu")
        m_max = max([1] + [len(b) for b in boxes])
        out = []
        for classes in self.task_classes:
            heat = torch.zeros(len(boxes), len(classes), ny, nx, device=device)
            index = torch.zeros(len(boxes), m_max, dtype=torch.long, device=device)
            code = torch.zeros(len(boxes), m_max, 10, device=device)
            mask = torch.zeros(len(boxes), m_max, 10, device=device)
            attr = torch.full((len(boxes), m_max), -1, dtype=torch.long, device=device)
            for i, (bx, lb) in enumerate(zip(boxes, labels)):
                bx = bx.to(device).float()
                lb = lb.to(device)
                names = attributes[i] if attributes is not None else [""] * len(lb)
                at = torch.tensor([self.cfg.attributes.index(a) if a in self.cfg.attributes else -1 for a in names],
                                  dtype=torch.long, device=device)
                ok = at >= 0
                at = torch.where(ok, at, torch.zeros_like(at))
                at = torch.where(ok & self.allowed[lb.clamp(min=0), at], at, torch.full_like(at, -1))
                cls_of = torch.full_like(lb, -1)
                for k, c in enumerate(classes):
                    cls_of[lb == c] = k
                fx = (bx[:, 0] - g.xmin) / g.dx
                fy = (bx[:, 1] - g.ymin) / g.dy
                ix, iy = torch.floor(fx), torch.floor(fy)
                keep = (cls_of >= 0) & (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny) & (bx[:, 3] > 0) & (bx[:, 4] > 0)
                bx, cls_of, fx, fy, ix, iy, at = (t[keep] for t in (bx, cls_of, fx, fy, ix, iy, at))
                if len(bx) == 0:
                    continue
                radius = gaussian_radius(bx[:, 3] / g.dx, bx[:, 4] / g.dy, self.cfg.min_overlap)
                radius = torch.clamp(torch.floor(radius), min=self.cfg.min_radius)  # (M,)
                sigma = (2 * radius + 1) / 6
                gx = torch.arange(nx, device=device, dtype=torch.float32).view(1, 1, nx)
                gy = torch.arange(ny, device=device, dtype=torch.float32).view(1, ny, 1)
                ddx, ddy = gx - ix.view(-1, 1, 1), gy - iy.view(-1, 1, 1)
                gauss = torch.exp(-(ddx ** 2 + ddy ** 2) / (2 * sigma.view(-1, 1, 1) ** 2))  # (M, Y, X)
                gauss = gauss * ((ddx.abs() <= radius.view(-1, 1, 1)) & (ddy.abs() <= radius.view(-1, 1, 1)))
                for k in range(len(classes)):
                    sel = cls_of == k
                    if sel.any():
                        heat[i, k] = torch.maximum(heat[i, k], gauss[sel].amax(0))
                m = len(bx)
                index[i, :m] = (iy * nx + ix).long()
                code[i, :m] = torch.cat([
                    (fx - ix).unsqueeze(1), (fy - iy).unsqueeze(1), bx[:, 2:3], torch.log(bx[:, 3:6]),
                    torch.sin(bx[:, 6:7]), torch.cos(bx[:, 6:7]), torch.nan_to_num(bx[:, 7:9])], dim=1)
                mask[i, :m] = 1.0
                mask[i, :m, 8:] = torch.isfinite(bx[:, 7:9]).float()  # unknown velocity: unsupervised
                attr[i, :m] = at
            out.append({"heatmap": heat, "index": index, "code": code, "mask": mask, "attr": attr})
        return out

    def loss(self, outputs: list[dict[str, Tensor]], boxes: list[Tensor], labels: list[Tensor],
             attributes: list[list[str]] | None = None) -> dict[str, Tensor]:
        """Gaussian focal loss on the heatmaps, weighted L1 on the code at object centres and
        cross-entropy on the attribute at centres of objects that have one.

        Shapes:
            outputs: as :meth:`forward`   boxes: B tensors (M_b, 9)   labels: B tensors (M_b,)
            attributes: B lists of M_b names ("" for none) or None
            returns: {"det_heatmap": (), "det_reg": (), "det_attr": ()}
        """
        targets = self.targets(boxes, labels, attributes)
        weights = outputs[0]["heatmap"].new_tensor(self.cfg.code_weights)
        hm_loss = reg_loss = 0.0
        attr_logits, attr_target = [], []
        for out, tgt in zip(outputs, targets):
            hm_loss = hm_loss + gaussian_focal_loss(out["heatmap"], tgt["heatmap"])
            pred = torch.cat([out[k] for k in BRANCHES], dim=1).flatten(2)  # (B, 10, Y*X)
            pred = pred.gather(2, tgt["index"].unsqueeze(1).expand(-1, 10, -1)).transpose(1, 2)  # (B, M, 10)
            err = (pred - tgt["code"]).abs() * tgt["mask"] * weights
            reg_loss = reg_loss + err.sum() / tgt["mask"][..., 0].sum().clamp(min=1)
            if "attr" in out:
                a = out["attr"].flatten(2)  # (B, A, Y*X)
                a = a.gather(2, tgt["index"].unsqueeze(1).expand(-1, a.shape[1], -1)).transpose(1, 2)  # (B, M, A)
                attr_logits.append(a.reshape(-1, a.shape[-1]))
                attr_target.append(tgt["attr"].reshape(-1))
        attr_loss = hm_loss * 0.0
        if attr_logits:
            logits, target = torch.cat(attr_logits), torch.cat(attr_target)
            has = target >= 0  # objects without an attribute contribute nothing
            if has.any():
                attr_loss = F.cross_entropy(logits[has], target[has], reduction="sum") / has.sum()
        return {"det_heatmap": hm_loss, "det_reg": self.cfg.reg_weight * reg_loss,
                "det_attr": self.cfg.attr_weight * attr_loss}

    # ---- decoding ------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, outputs: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Peaks of each task's heatmap (3x3 local maxima, top ``max_per_task``, above
        ``score_threshold``) to ego-frame boxes; circle NMS per class with the task's radius; the
        best ``max_boxes`` per sample.

        Shapes:
            returns: per sample {boxes (M, 9) ego, scores (M,), labels (M,) int64,
                     attributes (M,) int64 index into ``cfg.attributes``, -1 for classes without}
        """
        g = self.grid.bev_grid()
        b = outputs[0]["heatmap"].shape[0]
        outputs = [{k: v.float() for k, v in out.items()} for out in outputs]  # box centres in float32
        per_sample = [[] for _ in range(b)]
        for out, classes, radius in zip(outputs, self.task_classes, self.cfg.nms_radii):
            heat = out["heatmap"].sigmoid()  # (B, K, Y, X)
            _, k, ny, nx = heat.shape
            peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat)
            scores, flat = peaks.flatten(1).topk(min(self.cfg.max_per_task, k * ny * nx))  # (B, T)
            cls = flat // (ny * nx)
            cell = flat % (ny * nx)
            iy, ix = cell // nx, cell % nx
            code = torch.cat([out[kk] for kk in BRANCHES], dim=1).flatten(2)  # (B, 10, Y*X)
            code = code.gather(2, cell.unsqueeze(1).expand(-1, 10, -1)).transpose(1, 2)  # (B, T, 10)
            x = g.xmin + (ix + code[..., 0]) * g.dx
            y = g.ymin + (iy + code[..., 1]) * g.dy
            yaw = torch.atan2(code[..., 6], code[..., 7])
            size = code[..., 3:6].clamp(-LOG_SIZE_LIMIT, LOG_SIZE_LIMIT).exp()  # finite for any logit
            boxes = torch.stack([x, y, code[..., 2], *size.unbind(-1), yaw,
                                 code[..., 8], code[..., 9]], dim=-1)  # (B, T, 9)
            labels = scores.new_tensor(classes, dtype=torch.long)[cls]
            if "attr" in out:
                attr = out["attr"].flatten(2)
                attr = attr.gather(2, cell.unsqueeze(1).expand(-1, attr.shape[1], -1)).transpose(1, 2)  # (B, T, A)
                allowed = self.allowed[labels]  # (B, T, A)
                attr = attr.masked_fill(~allowed, float("-inf")).argmax(-1)
                attr = torch.where(allowed.any(-1), attr, torch.full_like(attr, -1))
            else:
                attr = torch.full_like(labels, -1)
            for i in range(b):
                keep = scores[i] > self.cfg.score_threshold
                bi, si, li, ai = boxes[i][keep], scores[i][keep], labels[i][keep], attr[i][keep]
                kept = circle_nms(bi[:, :2], si, radius ** 0.5, groups=li)  # nms_radii: squared distances
                per_sample[i].append((bi[kept], si[kept], li[kept], ai[kept]))
        results = []
        for parts in per_sample:
            bx = torch.cat([p[0] for p in parts])
            sc = torch.cat([p[1] for p in parts])
            lb = torch.cat([p[2] for p in parts])
            at = torch.cat([p[3] for p in parts])
            order = sc.argsort(descending=True)[: self.cfg.max_boxes]
            results.append({"boxes": bx[order], "scores": sc[order], "labels": lb[order], "attributes": at[order]})
        return results


def gaussian_focal_loss(logits: Tensor, target: Tensor, alpha: float = 2.0, gamma: float = 4.0) -> Tensor:
    """CenterNet's focal loss on gaussian heatmaps, normalised by the number of centres (cells
    whose target is exactly 1). Computed in float32 whatever the input dtype: in bf16 or fp16, ``1 - 1e-4``
    rounds to 1 and ``log(1 - p)`` is -inf as soon as a logit passes ~6.

    Shapes:
        logits, target: (B, K, Y, X)   returns: () float32
    """
    logits, target = logits.float(), target.float()
    pred = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    neg_weight = (1 - target).pow(gamma)
    pos_loss = torch.log(pred) * (1 - pred).pow(alpha) * pos
    neg_loss = torch.log(1 - pred) * pred.pow(alpha) * neg_weight * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


__all__ = ["CenterHead", "gaussian_focal_loss", "gaussian_radius"]
