"""Random-resized-crop as one batch operation on the device (torchvision's RandomResizedCrop
box rule, applied to a whole uint8 batch with one grid_sample): the training images are
stored somewhat larger than the model's input, each gets a box of random area and aspect
ratio inside it, and the box is resampled (bilinear) to the model's size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TRIES = 10  # candidate boxes per image before the fallback (torchvision's count)


def rrc_boxes(b: int, h: int, w: int, *, scale, ratio, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """int64 (b, 4) boxes (top, left, height, width) inside an h x w image: area a uniform
    fraction in `scale` of h*w, width/height log-uniform in `ratio`; the first of TRIES draws
    that fits, else the largest centred box of the ratio clamped into `ratio`."""
    area = h * w * torch.empty((b, TRIES), device=device).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty((b, TRIES), device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                            generator=generator)
    r = torch.exp(log_r)
    bw = torch.round(torch.sqrt(area * r)).long()
    bh = torch.round(torch.sqrt(area / r)).long()
    ok = (bw >= 1) & (bw <= w) & (bh >= 1) & (bh <= h)
    first = torch.where(ok.any(1), ok.int().argmax(1), torch.full((b,), -1, device=device))
    u = torch.rand((b, 2), device=device, generator=generator)  # drawn for every image: one stream
    pick = first.clamp(min=0)[:, None]
    bw, bh = bw.gather(1, pick)[:, 0], bh.gather(1, pick)[:, 0]
    # Fallback (no draw fitted): the whole image, cut to the nearest allowed aspect ratio.
    in_r = w / h
    if in_r < ratio[0]:
        fw, fh = w, int(round(w / ratio[0]))
    elif in_r > ratio[1]:
        fw, fh = int(round(h * ratio[1])), h
    else:
        fw, fh = w, h
    fits = first >= 0
    bw = torch.where(fits, bw, torch.full_like(bw, fw))
    bh = torch.where(fits, bh, torch.full_like(bh, fh))
    top = torch.where(fits, (u[:, 0] * (h - bh + 1)).long().clamp(max=h - 1), (h - bh) // 2)
    left = torch.where(fits, (u[:, 1] * (w - bw + 1)).long().clamp(max=w - 1), (w - bw) // 2)
    top = torch.minimum(top, h - bh)
    left = torch.minimum(left, w - bw)
    return torch.stack([top, left, bh, bw], dim=1)


def random_resized_crop(x: torch.Tensor, size, *, scale, ratio, generator: torch.Generator) -> torch.Tensor:
    """uint8 (B, C, H, W) -> uint8 (B, C, size[0], size[1]): each image's random box (rrc_boxes)
    resampled bilinearly (flips stay with cnnx.train.loop.augment_batch)."""
    b, c, h, w = x.shape
    oh, ow = int(size[0]), int(size[1])
    boxes = rrc_boxes(b, h, w, scale=scale, ratio=ratio, generator=generator, device=x.device).float()
    top, left, bh, bw = boxes.unbind(1)
    # affine_grid maps output [-1, 1] (pixel edges, align_corners=False) onto the input: the box's
    # edges are at -1 + 2 * left / w and -1 + 2 * (left + bw) / w.
    sx, sy = bw / w, bh / h
    theta = torch.zeros((b, 2, 3), device=x.device)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = -1 + (2 * left + bw) / w
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = -1 + (2 * top + bh) / h
    grid = F.affine_grid(theta, [b, c, oh, ow], align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)
