"""A whitening first layer (after airbench94): the first conv's filters are the principal
components of the training set's k x k patches, each scaled by 1/sqrt(its variance), once
with each sign. Its output channels are then decorrelated with unit variance (the GELU after
it sees each direction in both signs, so nothing is lost to the rectification), which lets
the net train at a large learning rate from the first step. The filters stay frozen; only
the bias trains, for the first epochs (cnnx.train.optim.param_groups).

It is a plain Conv2d with a bias, so export and the parity gate see nothing new.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnx.train.config import ConfigError


class WhiteningError(ConfigError):
    """A whitening init that cannot be done (a layer of the wrong shape, too few images): a usage
    error of the config, exit 2 like the other ConfigErrors."""


def patch_matrix(images: torch.Tensor, k: int) -> torch.Tensor:
    """Every k x k patch (stride 1, no padding) of float (N, C, H, W) images as a row of a
    float32 (N * (H-k+1) * (W-k+1), C*k*k) matrix; a row's order is the conv weight's (C, kh, kw)."""
    n, c = images.shape[:2]
    p = images.float().unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H', W', k, k)
    return p.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)


def whitening_filters(patches: torch.Tensor, channels: int, k: int, eps: float) -> torch.Tensor:
    """(2*C*k*k, C, k, k) filters: the eigenvectors of the patches' second-moment matrix,
    largest variance first, divided by sqrt(eigenvalue + eps), then the same negated."""
    cov = patches.T @ patches / len(patches)
    values, vectors = torch.linalg.eigh(cov.double())  # ascending; double: tiny eigenvalues stay exact
    order = values.flip(0)
    basis = vectors.T.flip(0) / torch.sqrt(order.clamp(min=0) + eps)[:, None]
    basis = basis.to(patches.dtype).reshape(-1, channels, k, k)
    return torch.cat((basis, -basis))


def whitening_layer(model: nn.Module) -> nn.Conv2d:
    """The model's first conv, which must have 2 x (its patch size) output channels and a bias."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise WhiteningError("--whiten needs a model whose first layer is a convolution")
    c, (kh, kw) = conv.in_channels, conv.kernel_size
    if kh != kw or conv.out_channels != 2 * c * kh * kw or conv.bias is None or conv.groups != 1:
        raise WhiteningError(f"--whiten needs a first conv with a square kernel, a bias and 2 x {c} x k x k output "
                             f"channels (airnet's stem: 24 for k=2); this model's has {conv.out_channels} channels, "
                             f"kernel {kh}x{kw}")
    return conv


@torch.no_grad()
def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set `conv`'s filters from normalised float images (N, C, H, W), zero its bias and freeze
    its filters. eps (in units of the normalised input's variance) bounds the gain of the
    directions with almost no variance, which would otherwise amplify JPEG noise."""
    k = conv.kernel_size[0]
    filters = whitening_filters(patch_matrix(images, k), conv.in_channels, k, eps)
    conv.weight.copy_(filters.to(conv.weight.device, conv.weight.dtype))
    conv.bias.zero_()
    conv.weight.requires_grad_(False)


def sample_images(n_train: int, want: int, seed: int) -> torch.Tensor:
    """Indices of `want` training images for the patch covariance, a seeded sample (the
    training split may be stored class by class). Fewer images than asked is an error (the
    run asks for at most the split, frontier.initialise, and says so where it asked for more)."""
    if want > n_train:
        raise WhiteningError(f"--whiten-images: the whitening init samples {want} images but the training split has "
                             f"only {n_train}; pass --whiten-images {n_train} or fewer")
    g = torch.Generator().manual_seed(seed * 7_919 + 17)
    return torch.randperm(n_train, generator=g)[:want]
