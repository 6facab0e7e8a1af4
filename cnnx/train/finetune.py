"""Transfer learning: which tensors are the head, starting a model from another run's
checkpoint (`--weights`), the backbone's learning-rate multiplier and the frozen first epochs.

The head is found, not named: the tensors whose shape changes with num_classes (the model is
built a second time, on the meta device, with one class more and the two state_dicts are
compared). That holds for every zoo entry (fc, classifier[-1], AirNet's head) and for any
arch added later, without a list of layer names to keep in step.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnx.train.checkpoint import CheckpointError, load_checkpoint


def head_names(arch: str, num_classes: int, arch_kwargs: dict) -> frozenset:
    """Names (state_dict keys of the bare model) of the tensors whose shape depends on num_classes."""
    from cnnx.train.zoo import create_model

    with torch.device("meta"):
        a = create_model(arch, num_classes, **arch_kwargs).state_dict()
        b = create_model(arch, num_classes + 1, **arch_kwargs).state_dict()
    return frozenset(k for k in a if a[k].shape != b[k].shape)


def _shape(t) -> str:
    shape = getattr(t, "shape", None)
    return "not a tensor" if shape is None else "[" + ", ".join(str(s) for s in shape) + "]"


def load_backbone(net: nn.Module, path, arch: str, num_classes: int, arch_kwargs: dict) -> int:
    """Copy every non-head tensor of the cnnx checkpoint at `path` into `net` by name (the head
    keeps its fresh initialisation for the new classes). Returns the number of tensors loaded.
    CheckpointError (one line) naming the first tensor that is missing, extra or of another shape."""
    ckpt = load_checkpoint(path)
    head = head_names(arch, num_classes, arch_kwargs)
    own = net.state_dict()
    _check_fit(ckpt, path, arch, own, head)
    with torch.no_grad():
        for name, t in own.items():
            if name not in head:
                t.copy_(ckpt["state_dict"][name])
    return len(own) - len(head)


def check_backbone(path, arch: str, arch_kwargs: dict) -> None:
    """load_backbone's CheckpointError, before the data is read (the head's size is not known
    yet, and is not compared): the model is built on the meta device with the checkpoint's
    number of classes, so a --weights that does not fit stops before minutes of decoding."""
    from cnnx.train.zoo import create_model

    ckpt = load_checkpoint(path)
    n = ckpt["num_classes"]
    with torch.device("meta"):
        own = create_model(arch, n, **arch_kwargs).state_dict()
    _check_fit(ckpt, path, arch, own, head_names(arch, n, arch_kwargs))


def _check_fit(ckpt: dict, path, arch: str, own: dict, head: frozenset) -> None:
    wrong = state_dict_mismatch(own, ckpt["state_dict"], skip=head)
    if wrong:
        raise CheckpointError(f"--weights {path} ({ckpt['arch']}, {ckpt['num_classes']} classes) does not fit "
                              f"{arch}: {wrong}")


def state_dict_mismatch(own: dict, src: dict, skip=frozenset()) -> str | None:
    """What keeps `src` from loading into a model whose state_dict is `own` (names in `skip`
    aside), naming the first tensor missing, extra or of another shape; None when it fits."""
    for name, t in own.items():
        if name in skip:
            continue
        if name not in src:
            return f"tensor {name} {_shape(t)} of the model is not in the checkpoint"
        if getattr(src[name], "shape", None) != t.shape:
            return f"tensor {name} is {_shape(src[name])} in the checkpoint and {_shape(t)} in the model"
    extra = [k for k in src if k not in own]
    if extra:
        return f"tensor {extra[0]} {_shape(src[extra[0]])} of the checkpoint is not in the model"
    return None


def split_parameters(net: nn.Module, head: frozenset):
    """(backbone parameters, head parameters) of the bare model, in named_parameters order."""
    backbone, top = [], []
    for name, p in net.named_parameters():
        (top if name in head else backbone).append(p)
    return backbone, top


def param_groups(net: nn.Module, head: frozenset, backbone_lr_mult: float):
    """Optimizer groups: the backbone at `lr_mult` times the scheduled lr, the head at 1x
    (cnnx.train.loop.train_one_epoch multiplies each group's lr by its lr_mult)."""
    backbone, top = split_parameters(net, head)
    return [{"params": backbone, "lr_mult": float(backbone_lr_mult)}, {"params": top, "lr_mult": 1.0}]


def backbone_norm_layers(net: nn.Module, head: frozenset) -> list:
    """The batch-norm layers outside the head: held in eval mode (running statistics fixed)
    while the backbone is frozen, so a frozen epoch changes no backbone tensor at all."""
    heads = {n.rsplit(".", 1)[0] for n in head}
    return [m for name, m in net.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and name not in heads]


def set_backbone_frozen(net: nn.Module, head: frozenset, frozen: bool) -> bool:
    """requires_grad of the backbone's parameters = not frozen; True when that changed anything
    (DDP is then rebuilt: it registers its hooks for the parameters that need grads)."""
    changed = False
    for name, p in net.named_parameters():
        if name not in head and p.requires_grad == frozen:
            p.requires_grad_(not frozen)
            changed = True
    return changed
