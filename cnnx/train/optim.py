"""Optimizer pieces beyond torch.optim (after airbench94 / airbench94_muon):

- `Muon`: one optimizer over two kinds of parameter group. Groups marked `orthogonal` (the
  4-D conv filters) take Nesterov momentum whose update is orthogonalised by a Newton-Schulz
  iteration (every direction of the filter matrix moves by about the same amount, so no
  single direction dominates a step) and keep each filter tensor at a fixed norm (the lr is
  then a relative step size). The other groups (biases, BatchNorm, the head) take exactly
  torch.optim.SGD's Nesterov step. One optimizer means one state_dict for an exact resume.
- `param_groups`: the groups every optimizer gets (filters, BN biases at their own lr,
  the whitening bias that trains for the first epochs only, the rest).
- `WeightAverage`: an exponential moving average of the weights (and BN statistics) that
  evaluation and best.pt use.

Group lr: each group carries `lr_mult` (its lr / the scheduled lr) and optionally
`decay_steps` (its lr falls linearly from lr_mult x the peak to 0 over that many steps,
independent of the schedule); `group_lr` is the one rule, a pure function of the step.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

# Quintic Newton-Schulz coefficients (Keller Jordan's Muon): chosen for the steepest slope at 0, so
# 3 steps take small singular values most of the way to ~1 (to within 0.5..1.5, which trains as well).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalise(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of the 2-D `g` = U S V^T by `steps` quintic Newton-Schulz
    iterations in bfloat16 (the iteration tolerates its rounding); returns g's dtype."""
    a, b, c = NS_COEFFS
    x = g.bfloat16()
    x = x / (x.norm() + eps)  # the largest singular value <= 1, where the iteration converges
    wide = x.shape[0] > x.shape[1]
    if wide:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    if wide:
        x = x.T
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon on groups with orthogonal=True, torch.optim.SGD (Nesterov when nesterov=True) on
    the others. Orthogonal groups ignore weight_decay: their filters are renormalised to norm
    sqrt(out channels) before each step, which is what weight decay would approximate."""

    def __init__(self, params, lr: float, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 0.0,
                 orthogonal: bool = False, ns_steps: int = 3):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("Muon: lr, momentum and weight_decay must be >= 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      orthogonal=orthogonal, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["orthogonal"] and group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:  # torch.optim.SGD's first step: the buffer is the gradient
                    buf = state["momentum_buffer"] = g.clone()
                else:
                    buf = state["momentum_buffer"].mul_(m).add_(g)
                u = g.add(buf, alpha=m) if group["nesterov"] else buf
                if group["orthogonal"]:
                    p.mul_(math.sqrt(p.shape[0]) / (p.norm() + 1e-12))
                    u = orthogonalise(u.reshape(len(u), -1), group["ns_steps"]).view(p.shape)
                p.add_(u, alpha=-lr)
        return loss


def group_lr(group: dict, scheduled: float, peak: float, step: int) -> float:
    """The lr of `group` at `step`: lr_mult x the scheduled lr, or, for a group with
    decay_steps, lr_mult x the peak falling linearly to 0 at decay_steps (then 0: frozen)."""
    scale = group.get("lr_mult", 1.0)
    if group.get("decay_steps") is not None:
        return scale * peak * max(0.0, 1.0 - step / max(1, group["decay_steps"]))
    return scale * scheduled


def param_groups(net: nn.Module, cfg, *, steps_per_epoch: int, whitening: nn.Conv2d | None = None) -> list[dict]:
    """The trainable parameters of `net` in named groups (empty groups dropped):

    - "whiten_bias": the whitening conv's bias (its filters are frozen); lr_mult bn_bias_lr,
      decaying to 0 over whiten_bias_epochs (then the layer is fixed);
    - "bn": BatchNorm weights (unless frozen) and biases; lr_mult bn_bias_lr; weight decay
      divided by it, so that the decay per step (lr x decay) is the other groups';
    - "filters": 4-D conv weights; with --optimizer muon an orthogonal group at muon_lr;
    - "other": the rest (the head, biases of convs and linears) at the scheduled lr.
    """
    muon = cfg.optimizer == "muon"
    bn_ids, filter_ids, whiten_ids = set(), set(), set()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            bn_ids.update(id(p) for p in m.parameters(recurse=False))
    if whitening is not None and whitening.bias is not None:
        whiten_ids.add(id(whitening.bias))
    groups = {"whiten_bias": [], "bn": [], "filters": [], "other": []}
    for p in net.parameters():
        if not p.requires_grad:
            continue
        if id(p) in whiten_ids:
            groups["whiten_bias"].append(p)
        elif id(p) in bn_ids:
            groups["bn"].append(p)
        elif p.ndim == 4:
            filter_ids.add(id(p))
            groups["filters"].append(p)
        else:
            groups["other"].append(p)
    wd = cfg.weight_decay
    out = [
        dict(name="whiten_bias", params=groups["whiten_bias"], lr_mult=cfg.bn_bias_lr,
             weight_decay=wd / cfg.bn_bias_lr, decay_steps=max(1, round(cfg.whiten_bias_epochs * steps_per_epoch))),
        dict(name="bn", params=groups["bn"], lr_mult=cfg.bn_bias_lr, weight_decay=wd / cfg.bn_bias_lr),
        dict(name="filters", params=groups["filters"], weight_decay=wd,
             **(dict(lr_mult=cfg.muon_lr / cfg.lr, orthogonal=True, momentum=cfg.muon_momentum) if muon else {})),
        dict(name="other", params=groups["other"], weight_decay=wd),
    ]
    return [g for g in out if g["params"]]


class WeightAverage:
    """An exponential moving average of a module's state: float tensors (weights and BN
    running statistics) as ema <- ema + (1 - d) (live - ema); integer buffers copied.
    d = min(decay, (1 + step) / (10 + step)) at optimizer step `step` (1-based count of
    steps taken), so the first steps do not drag the average towards the random init."""

    def __init__(self, net: nn.Module, decay: float):
        self.decay = float(decay)
        self.source = net  # the trained module; `update` reads its current state
        self.module = copy.deepcopy(net).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = self.decay_at(step)
        live = self.source.state_dict()
        avg, avg_ints = [], []
        src, src_ints = [], []
        for k, v in self.module.state_dict().items():
            if v.is_floating_point():
                avg.append(v)
                src.append(live[k])
            else:
                avg_ints.append(v)
                src_ints.append(live[k])
        if avg:
            torch._foreach_lerp_(avg, src, 1.0 - d)
        for a, s in zip(avg_ints, src_ints):
            a.copy_(s)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd)
