"""Image warps that shrink are low-pass filtered first, and stay exact to the matrix."""

import numpy as np
import torch

from bevkit.data.augment import ImageAugConfig, image_aug_matrix, warp_image


def _matrix(flip: bool):
    cfg = ImageAugConfig(final_size=(256, 704), rotate=(5.0, 5.0), flip=flip, resize=(0.44, 0.44))
    return cfg, image_aug_matrix((900, 1600), cfg, np.random.default_rng(0))


def test_a_shrinking_warp_follows_its_matrix():
    # A ramp along u and one along v: any symmetric low-pass filter keeps a linear image as it is, so the
    # output must equal the ramp at the original pixel the matrix names, whatever the filtering.
    v, u = torch.meshgrid(torch.arange(900.0), torch.arange(1600.0), indexing="ij")
    img = torch.stack([u * 0.15, v * 0.25, torch.full_like(u, 7.0)]).round().to(torch.uint8)
    for flip in (False, True):
        cfg, aug = _matrix(flip)
        out = warp_image(img, aug, cfg.final_size).float()
        ys, xs = np.mgrid[20:236, 20:684]
        src = np.stack([xs, ys, np.ones_like(xs)], -1) @ np.linalg.inv(aug).T  # original (u, v) of each pixel
        inside = (src[..., 0] > 5) & (src[..., 0] < 1594) & (src[..., 1] > 5) & (src[..., 1] < 894)
        want_u, want_v = src[..., 0] * 0.15, src[..., 1] * 0.25
        assert inside.sum() > 50_000
        assert np.abs(out[0, 20:236, 20:684].numpy() - want_u)[inside].max() <= 1.0
        assert np.abs(out[1, 20:236, 20:684].numpy() - want_v)[inside].max() <= 1.0


def test_fine_texture_is_filtered_not_aliased():
    stripes = (torch.arange(1600) // 2 % 2 * 255).to(torch.uint8)  # a 4-pixel period: finer than 0.44 can hold
    img = stripes.view(1, 1, -1).expand(3, 900, 1600).contiguous()
    cfg, aug = _matrix(False)
    out = warp_image(img, aug, cfg.final_size).float()
    row = out[0, 128, 50:650]
    # At this 0.63 shrink, point sampling gives a stripe pattern of full contrast (std 104); filtered as
    # PIL's resize filters, about 48.
    assert row.std() < 60 and abs(row.mean() - 127.5) < 20
