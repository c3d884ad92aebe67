"""BEVFormer's detection head: a Deformable-DETR decoder of object queries over the BEV, with
iterative box refinement, Hungarian matching and set losses, decoded without NMS.

Boxes are ego-frame ``(x, y, z, l, w, h, yaw, vx, vy)`` as in the data contract. A query's
reference point is its centre normalised to the grid's x, y range and z range (``[0, 1]``, what
``ops.deform_attn`` samples); each decoder layer refines it, and each layer's predictions are
supervised (auxiliary losses), as BEVFormer does. The regression code per query is
``(x, y, z, log l, log w, log h, sin yaw, cos yaw, vx, vy)`` with the centre in metres.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevkit.models.bevformer import deform_attn_fp32
from bevkit.models.config import CLASS_ATTRIBUTE_PREFIX, DETRHeadConfig, GridConfig
from bevkit.models.matching import linear_sum_assignment

LOG_SIZE_LIMIT = 6.0  # exp(6) = 403 m: decoded sizes stay finite for any output


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class DecoderCrossAttention(nn.Module):
    """Deformable attention of each query into the BEV around its reference point (one level,
    ``points`` samples per head), as BEVFormer's decoder (``CustomMSDeformableAttention``)."""

    def __init__(self, dim: int, heads: int, points: int):
        super().__init__()
        self.heads, self.points = heads, points
        self.offsets = nn.Linear(dim, heads * points * 2)
        self.weights = nn.Linear(dim, heads * points)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        # Deformable DETR's initialisation: head h's points start on a ring in direction 2 pi h / heads.
        nn.init.zeros_(self.offsets.weight)
        angle = torch.arange(heads, dtype=torch.float32) * (2 * torch.pi / heads)
        ring = torch.stack([angle.cos(), angle.sin()], -1)
        ring = ring / ring.abs().max(-1, keepdim=True).values
        ring = ring.view(heads, 1, 2) * torch.arange(1, points + 1, dtype=torch.float32).view(1, points, 1)
        with torch.no_grad():
            self.offsets.bias.copy_(ring.flatten())
        nn.init.zeros_(self.weights.weight)
        nn.init.zeros_(self.weights.bias)

    def forward(self, query: Tensor, bev: Tensor, ref: Tensor, shape: tuple[int, int]) -> Tensor:
        """Shapes:
            query: (B, Q, C)   bev: (B, Y*X, C)   ref: (B, Q, 2) normalised (x, y)   returns: (B, Q, C)
        """
        b, q, c = query.shape
        ny, nx = shape
        h, p = self.heads, self.points
        value = self.value(bev).view(b, ny * nx, h, c // h)
        off = self.offsets(query).view(b, q, h, 1, p, 2) / query.new_tensor([nx, ny])  # cells -> normalised
        loc = ref.view(b, q, 1, 1, 1, 2) + off
        attn = self.weights(query).view(b, q, h, p).softmax(-1).view(b, q, h, 1, p)
        return self.out(deform_attn_fp32(value, [(ny, nx)], loc, attn))


class DecoderLayer(nn.Module):
    """Self-attention among the queries, deformable cross-attention into the BEV, FFN; post-norm."""

    def __init__(self, dim: int, heads: int, points: int, ffn: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = DecoderCrossAttention(dim, heads, points)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, q: Tensor, pos: Tensor, bev: Tensor, ref: Tensor, shape: tuple[int, int]) -> Tensor:
        k = q + pos
        q = self.norms[0](q + self.drop(self.self_attn(k, k, q, need_weights=False)[0]))
        q = self.norms[1](q + self.drop(self.cross_attn(q + pos, bev, ref, shape)))
        return self.norms[2](q + self.drop(self.ffn(q)))


def _mlp_cls(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, dim), nn.LayerNorm(dim), nn.ReLU(inplace=True), nn.Linear(dim, out))


def _mlp_reg(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, out))


class DETRHead(nn.Module):
    """BEVFormer's head: ``num_queries`` learned queries (content and position embeddings), a
    ``layers``-deep decoder over the BEV with a box refinement after every layer, per-layer class
    (sigmoid focal), box (L1) and attribute branches, Hungarian matching, top-``max_boxes`` decoding."""

    def __init__(self, in_channels: int, grid: GridConfig, cfg: DETRHeadConfig):
        super().__init__()
        self.cfg, self.grid = cfg, grid
        d = cfg.dim
        self.proj = nn.Identity() if in_channels == d else nn.Conv2d(in_channels, d, 1)
        self.query = nn.Embedding(cfg.num_queries, 2 * d)  # position and content, as BEVFormer
        self.ref = nn.Linear(d, 3)
        self.layers = nn.ModuleList(DecoderLayer(d, cfg.heads, cfg.points, cfg.ffn) for _ in range(cfg.layers))
        k, a = len(cfg.classes), len(cfg.attributes)
        self.cls = nn.ModuleList(_mlp_cls(d, k) for _ in range(cfg.layers))
        self.reg = nn.ModuleList(_mlp_reg(d, 10) for _ in range(cfg.layers))
        self.attr = nn.ModuleList(nn.Linear(d, a) for _ in range(cfg.layers)) if a else None
        prior = 0.01  # focal-loss bias initialisation
        for m in self.cls:
            nn.init.constant_(m[-1].bias, -math.log((1 - prior) / prior))
        allowed = [[c in CLASS_ATTRIBUTE_PREFIX and at.startswith(CLASS_ATTRIBUTE_PREFIX[c]) for at in cfg.attributes]
                   for c in cfg.classes]
        self.register_buffer("allowed", torch.tensor(allowed, dtype=torch.bool).view(k, a), persistent=False)
        (x0, x1, _), (y0, y1, _), (z0, z1, _) = grid.xbound, grid.ybound, grid.zbound
        self.register_buffer("lo", torch.tensor([x0, y0, z0]), persistent=False)
        self.register_buffer("span", torch.tensor([x1 - x0, y1 - y0, z1 - z0]), persistent=False)

    def forward(self, bev: Tensor) -> dict[str, Tensor]:
        """Frames: the BEV on the ego grid; box centres in the ego frame.

        Shapes:
            bev: (B, C, Y, X)
            returns: {cls (L, B, Q, K) logits, code (L, B, Q, 10) (x, y, z in metres, log l, log w,
                     log h, sin, cos, vx, vy), attr (L, B, Q, A) logits} for the L decoder layers
        """
        x = self.proj(bev)
        b, d, ny, nx = x.shape
        flat = x.flatten(2).transpose(1, 2)  # (B, Y*X, D)
        emb = self.query(torch.arange(self.cfg.num_queries, device=x.device))  # a lookup, not a view of the weight
        pos, q = emb.unsqueeze(0).expand(b, -1, -1).split(d, dim=-1)
        ref = self.ref(pos).sigmoid()  # (B, Q, 3) normalised centre
        cls, codes, attrs = [], [], []
        for i, layer in enumerate(self.layers):
            q = layer(q, pos, flat, ref[..., :2], (ny, nx))
            delta = self.reg[i](q)  # (B, Q, 10): centre as a logit offset, then the rest of the code
            centre = torch.sigmoid(inverse_sigmoid(ref) + delta[..., :3])
            codes.append(torch.cat([self.lo + centre * self.span, delta[..., 3:]], -1))
            cls.append(self.cls[i](q))
            if self.attr is not None:
                attrs.append(self.attr[i](q))
            ref = centre.detach()  # refined reference for the next layer, without gradient (as BEVFormer)
        out = {"cls": torch.stack(cls), "code": torch.stack(codes)}
        if attrs:
            out["attr"] = torch.stack(attrs)
        return out

    # ---- matching and loss ----------------------------------------------------------------

    def _target_code(self, boxes: Tensor) -> Tensor:
        """(M, 9) ego boxes -> (M, 10) codes; unknown velocities stay NaN."""
        return torch.cat([boxes[:, :3], torch.log(boxes[:, 3:6].clamp(min=1e-3)), torch.sin(boxes[:, 6:7]),
                          torch.cos(boxes[:, 6:7]), boxes[:, 7:9]], dim=1)

    @torch.no_grad()
    def match(self, cls: Tensor, code: Tensor, labels: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Hungarian matching of one sample's queries to its objects: focal classification cost
        (``cls_weight``) plus the L1 distance of the first eight code entries (centres in metres,
        ``reg_weight``), as BEVFormer's assigner.

        Shapes:
            cls: (Q, K) logits   code: (Q, 10)   labels: (M,)   target: (M, 10)
            returns: query indices (M',), object indices (M',), M' = min(Q, M)
        """
        a, g = self.cfg.focal_alpha, self.cfg.focal_gamma
        p = cls.float().sigmoid()[:, labels]  # (Q, M)
        pos = -(p + 1e-8).log() * a * (1 - p) ** g
        neg = -(1 - p + 1e-8).log() * (1 - a) * p ** g
        dist = (code[:, None, :8].float() - target[None, :, :8].float()).abs().sum(-1)
        cost = self.cfg.cls_weight * (pos - neg) + self.cfg.reg_weight * dist
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        dev = cls.device
        return torch.as_tensor(rows, device=dev), torch.as_tensor(cols, device=dev)

    def loss(self, outputs: dict[str, Tensor], boxes: list[Tensor], labels: list[Tensor],
             attributes: list[list[str]] | None = None) -> dict[str, Tensor]:
        """Per decoder layer: sigmoid focal loss over every query and class (matched queries are
        positives), weighted L1 on the matched codes (centres in metres as BEVFormer, ``code_weights``,
        unknown velocities unsupervised), cross-entropy on the attributes of matched
        objects that have one; each normalised by the number of objects and summed over layers.

        Shapes:
            outputs: as :meth:`forward`   boxes: B tensors (M_b, 9)   labels: B tensors (M_b,)
            returns: {"det_cls": (), "det_reg": (), "det_attr": ()}
        """
        cfg = self.cfg
        cls_all, code_all = outputs["cls"], outputs["code"]
        num_layers, b, q, k = cls_all.shape
        weights = code_all.new_tensor(cfg.code_weights)
        total = max(sum(len(t) for t in labels), 1)
        names = list(cfg.attributes)
        cls_loss = reg_loss = attr_loss = code_all.sum() * 0.0
        targets = [self._target_code(bx.to(code_all)) for bx in boxes]
        for layer in range(num_layers):
            onehot = torch.zeros_like(cls_all[layer], dtype=torch.float32)
            for i in range(b):
                m = len(labels[i])
                if m == 0:
                    continue
                lab = labels[i].to(cls_all.device)
                rows, cols = self.match(cls_all[layer, i], code_all[layer, i], lab, targets[i])
                onehot[i, rows, lab[cols]] = 1.0
                err = code_all[layer, i, rows] - torch.nan_to_num(targets[i][cols])
                valid = torch.ones_like(err)
                valid[:, 8:] = torch.isfinite(targets[i][cols, 8:]).float()
                reg_loss = reg_loss + (err.abs() * valid * weights).sum() / total
                if self.attr is not None and attributes is not None:
                    want = [names.index(attributes[i][c]) if attributes[i][c] in names else -1 for c in cols.tolist()]
                    want_t = torch.tensor(want, device=cls_all.device)
                    keep = want_t >= 0
                    if keep.any():
                        logits = outputs["attr"][layer, i, rows[keep]]
                        attr_loss = attr_loss + F.cross_entropy(logits.float(), want_t[keep], reduction="sum") / total
            cls_loss = cls_loss + sigmoid_focal_loss(cls_all[layer], onehot, cfg.focal_alpha, cfg.focal_gamma) / total
        return {"det_cls": cfg.cls_weight * cls_loss, "det_reg": cfg.reg_weight * reg_loss,
                "det_attr": cfg.attr_weight * attr_loss}

    # ---- decoding ------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, outputs: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """The last layer's best ``max_boxes`` (query, class) pairs by sigmoid score above
        ``score_threshold``, without NMS (one query, one object), as BEVFormer's NMS-free coder.

        Shapes:
            returns: per sample {boxes (M, 9) ego, scores (M,), labels (M,) int64,
                     attributes (M,) int64 index into ``cfg.attributes``, -1 for classes without}
        """
        cls, code = outputs["cls"][-1].float(), outputs["code"][-1].float()
        b, q, k = cls.shape
        scores, flat = cls.sigmoid().flatten(1).topk(min(self.cfg.max_boxes, q * k))  # (B, T)
        query, labels = flat // k, flat % k
        c = code.gather(1, query.unsqueeze(-1).expand(-1, -1, 10))  # (B, T, 10)
        size = c[..., 3:6].clamp(-LOG_SIZE_LIMIT, LOG_SIZE_LIMIT).exp()
        boxes = torch.cat([c[..., :3], size, torch.atan2(c[..., 6:7], c[..., 7:8]), c[..., 8:10]], -1)
        if "attr" in outputs:
            attr = outputs["attr"][-1].float().gather(1, query.unsqueeze(-1).expand(-1, -1, self.allowed.shape[1]))
            allowed = self.allowed[labels]
            attr_idx = attr.masked_fill(~allowed, float("-inf")).argmax(-1)
            attr_idx = torch.where(allowed.any(-1), attr_idx, torch.full_like(attr_idx, -1))
        else:
            attr_idx = torch.full_like(labels, -1)
        results = []
        for i in range(b):
            keep = scores[i] > self.cfg.score_threshold
            results.append({"boxes": boxes[i][keep], "scores": scores[i][keep], "labels": labels[i][keep],
                            "attributes": attr_idx[i][keep]})
        return results


def sigmoid_focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """The focal loss of RetinaNet on independent sigmoids, summed, computed in float32.

    Shapes:
        logits, target: (..., K)   returns: ()
    """
    x, t = logits.float(), target.float()
    p = x.sigmoid()
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    pt = p * t + (1 - p) * (1 - t)
    w = alpha * t + (1 - alpha) * (1 - t)
    return (w * (1 - pt) ** gamma * ce).sum()
