"""How a run turns on the frontier techniques (cnnx.train.whiten, cnnx.train.optim) for its
model: the initialisation (dirac convs, head scale, frozen BatchNorm scale, whitening), the
optimizer over role-based groups, the weight average, and the torch.compile warm-up whose
seconds are reported apart from training. cnnx.train.run calls these; each is a no-op for a
config that does not ask for its technique.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnx.train import loop, optim, whiten
from cnnx.train.config import TrainConfig


def initialise(net: nn.Module, cfg: TrainConfig, train_images, mean, std) -> tuple:
    """Apply cfg's init and freezing to the fresh `net` (a resumed run loads its weights over the
    init afterwards; the freezing stays). Returns (the whitening conv or None, seconds spent
    estimating the whitening, which counts as training time as in airbench)."""
    with torch.no_grad():
        if cfg.dirac_init:
            for m in net.modules():
                if isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size[0] == m.kernel_size[1] > 1 \
                        and m.kernel_size[0] % 2 == 1:
                    w = m.weight
                    nn.init.dirac_(w[:min(w.shape[0], w.shape[1])])  # the first filters pass their input through
        if cfg.head_std is not None:
            head = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
            head.weight.mul_(cfg.head_std / head.weight.std())
    if cfg.bn_scale_frozen:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.requires_grad_(False)
    if not cfg.whiten:
        return None, 0.0
    conv = whiten.whitening_layer(net)
    device = conv.weight.device
    t0 = loop.timer_sync(device)
    # all of a smaller split (the GPU recipe's 5,000 failed every smaller photo folder; setup says so)
    idx = whiten.sample_images(len(train_images), min(cfg.whiten_images, len(train_images)), cfg.seed)
    x = train_images[idx].to(device).float()
    mean_t = torch.tensor([float(v) for v in mean], device=device).view(1, 3, 1, 1)
    std_t = torch.tensor([float(v) for v in std], device=device).view(1, 3, 1, 1)
    whiten.init_whitening(conv, (x / 255.0 - mean_t) / std_t)  # the input zoo.Uint8Input gives the net
    return conv, loop.timer_sync(device) - t0


def make_optimizer(net: nn.Module, cfg: TrainConfig, *, steps_per_epoch: int, whitening=None):
    return loop.make_optimizer(optim.param_groups(net, cfg, steps_per_epoch=steps_per_epoch, whitening=whitening), cfg)


def weight_average(net: nn.Module, cfg: TrainConfig):
    """The run's WeightAverage of `net`, or None without --ema."""
    return optim.WeightAverage(net, cfg.ema) if cfg.ema is not None else None


def compile_warmup(train_model, net: nn.Module, images, labels, *, batch: int, device, bf16: bool,
                   channels_last: bool) -> float:
    """Seconds torch.compile takes to build the training step's graphs: one forward and backward
    of a batch of the training shape, after which every tensor of `net` (BatchNorm statistics
    included) is put back and the gradients dropped, so training starts exactly as without it."""
    saved = {k: v.detach().clone() for k, v in net.state_dict().items()}
    t0 = loop.timer_sync(device)
    idx = torch.arange(min(batch, len(labels)))
    x = images[idx].to(device)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    train_model.train()
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(train_model(x).float(), labels[idx].to(device))
    loss.backward()
    net.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in net.state_dict().items():
            v.copy_(saved[k])
    return loop.timer_sync(device) - t0


def wants_role_groups(cfg: TrainConfig) -> bool:
    """Whether the optimizer needs optim.param_groups' role-based groups (otherwise one list of
    parameters, which keeps older runs' optimizer states resumable)."""
    return cfg.optimizer == "muon" or cfg.whiten or cfg.bn_bias_lr != 1.0 or cfg.bn_scale_frozen
