"""The model zoo. Every model takes normalised float images (N, 3, H, W) and returns
logits (N, num_classes); normalisation lives in the training loop and the exported graph.
No I/O here except torchvision's weight cache for --pretrained.

A checkpoint stores (arch, arch_kwargs, num_classes); `create_model` rebuilds the module
from exactly those, so every constructor argument must be a plain JSON value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnknownArch(ValueError):
    pass


class Uint8Input(nn.Module):
    """uint8 RGB (N, 3, H, W) -> model(normalised float). The one place mean/std are applied:
    the training loop, train-time evaluation and every exported graph wrap the model in it."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        std_t = torch.tensor([float(s) for s in std]).view(1, 3, 1, 1)
        mean_t = torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1)
        # x / 255 is folded into the scale so the graph is one multiply and one subtract.
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", mean_t / std_t, persistent=False)

    def forward(self, images):
        return self.model(images.float() * self.scale - self.shift)


class SeedCNN(nn.Module):
    """The first tutorial's net: two 3x3 convs with ReLU and 2x2 max-pool, fc 512."""

    def __init__(self, num_classes: int, image_size: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class SeedVGG(nn.Module):
    """The second tutorial's VGG-style net: 13 3x3 convs, a 1024->512->512 classifier."""

    CFG = (32, 32, "M", 64, 64, "M", 128, 128, 128, "M", 256, 256, 256, "M", 256, 256, 256)

    def __init__(self, num_classes: int, image_size: int = 32, batch_norm: bool = True, dropout: float = 0.5):
        super().__init__()
        layers, c = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers.append(nn.Conv2d(c, v, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            c = v
        self.features = nn.Sequential(*layers)
        side = image_size // 16
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(256 * side * side, 512), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(512, 512), nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def _conv_bn(cin, cout, bn):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), bn(cout), nn.GELU()]


# AirNet's test-time views (eval mode): the mean of the logits of these views of each image.
# 1: the image; 2: + its mirror; 6: {image, mirror} x {unshifted, content moved 1 px down-right, moved
# 1 px up-left} (the row/column a shift uncovers is the reflected border, as airbench94's tta_level 2,
# whose weights differ: here each view counts the same).
TTA_VIEWS = (1, 2, 6)


def tta_view_batches(x: torch.Tensor, views: int) -> list:
    """The `views` views of the batch x (N, C, H, W), each (N, C, H, W), in TTA_VIEWS's order."""
    if views not in TTA_VIEWS:
        raise ValueError(f"test-time views must be one of {', '.join(map(str, TTA_VIEWS))}, got {views!r}")
    bases = [x]
    if views == 6:
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        bases += [padded[..., 0:h, 0:w], padded[..., 2:h + 2, 2:w + 2]]
    if views == 1:
        return bases
    return [v for b in bases for v in (b, torch.flip(b, dims=[3]))]


class AirNet(nn.Module):
    """The fast default for CIFAR-scale images, after airbench94: a wide first stage,
    conv-pool-bn blocks with max-pool downsampling, a scaled linear head. In eval mode it
    returns the mean logits of `tta` views of each image (TTA_VIEWS: 1 none, 2 mirror,
    6 mirror x 1-px shifts), so evaluation, export and deployment all see the same function;
    `set_tta_views` changes the count of a built model (export's --tta).

    Default widths 32/128/128, not airbench94's 64/256/256: on a 2-core CPU the narrower net
    trains several times as many images/s, enough epochs to reach 88% within ten minutes (step
    throughput of both widths: benchmarks/recipe_airnet.py, the README's results). The GPU
    recipe (config.GPU_RECIPES) uses 64/256/256.

    The 2x2 stem has 2 x 3 x 2 x 2 = 24 channels: the shape of a whitening layer (cnnx.train.whiten).
    bn_eps / bn_momentum are torch's BatchNorm2d eps and momentum (the weight of the newest batch)."""

    def __init__(self, num_classes: int, widths=(32, 128, 128), stem: int = 24, tta: int | bool = 2,
                 scale: float = 1 / 9, bn_eps: float = 1e-5, bn_momentum: float = 0.1):
        super().__init__()
        w1, w2, w3 = (int(w) for w in widths)
        self.tta = 1  # replaced below; an attribute so set_tta_views can change a built model
        set_tta_views(self, (2 if tta else 1) if isinstance(tta, bool) else tta)  # bool: checkpoints before 6 views
        self.scale = float(scale)

        def bn(c):
            return nn.BatchNorm2d(c, eps=float(bn_eps), momentum=float(bn_momentum))

        layers = [nn.Conv2d(3, stem, 2, padding=0, bias=True), nn.GELU()]
        c = stem
        for w in (w1, w2, w3):
            layers += [
                nn.Conv2d(c, w, 3, padding=1, bias=False), nn.MaxPool2d(2), bn(w), nn.GELU(),
                *(_conv_bn(w, w, bn)),
            ]
            c = w
        self.features = nn.Sequential(*layers, GlobalMaxPool(), nn.Flatten())
        self.head = nn.Linear(c, num_classes, bias=False)

    def _logits(self, x):
        return self.head(self.features(x)) * self.scale

    def forward(self, x):
        if self.training or self.tta == 1:
            return self._logits(x)
        views = tta_view_batches(x, self.tta)
        total = self._logits(views[0])
        for v in views[1:]:
            total = total + self._logits(v)
        return total / len(views)


class GlobalMaxPool(nn.Module):
    """The largest value of each channel, (N, C, H, W) -> (N, C, 1, 1): nn.AdaptiveMaxPool2d(1)'s
    function as an amax, which every torch ONNX exporter translates (torch 2.11's dynamo exporter
    has no translation for adaptive_max_pool2d). No parameters: checkpoints are unchanged."""

    def forward(self, x):
        return torch.amax(x, dim=(2, 3), keepdim=True)


def set_tta_views(model: nn.Module, views: int) -> None:
    """Make `model` (an arch with test-time views, e.g. AirNet) average `views` views in eval
    mode (TTA_VIEWS). ValueError for another count or a model without views (for which 1, the
    image alone, is what it already does)."""
    model = getattr(model, "model", model)  # Uint8Input
    if not hasattr(model, "tta"):
        if views == 1:
            return
        raise ValueError(f"{type(model).__name__} has no test-time views")
    if isinstance(views, bool) or views not in TTA_VIEWS:
        raise ValueError(f"test-time views must be one of {', '.join(map(str, TTA_VIEWS))}, got {views!r}")
    model.tta = int(views)


def tta_views(model: nn.Module) -> int:
    """How many views `model` runs per image in eval mode (1 for archs without TTA)."""
    return int(getattr(getattr(model, "model", model), "tta", 1))


def _cifar_resnet18(num_classes: int):
    from torchvision.models import resnet18

    m = resnet18(num_classes=num_classes)
    # 32x32 inputs: a 3x3 stride-1 stem and no max-pool keep the 4x4 final feature map.
    m.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


def _torchvision(name: str, head: Callable[[nn.Module, int], None]):
    def build(num_classes: int, pretrained: bool = False):
        import torchvision.models as tvm

        # Built bare and then loaded by cnnx, never through get_model(weights=...): torchvision
        # reads its cached file with torch.hub's default, which unpickles it (the same random
        # initialisation is drawn before the load either way).
        m = tvm.get_model(name, weights=None)
        if pretrained:
            m.load_state_dict(pretrained_state_dict(name))
        head(m, num_classes)
        return m

    return build


class WeightsFileError(ValueError):
    """The pretrained weights in torch's hub cache cannot be used: one line naming the file."""


def pretrained_state_dict(name: str) -> dict:
    """torchvision's ImageNet weights for `name`, read from torch's hub cache as tensors only
    (a file there is data, never code), downloaded there first when absent (its hash checked,
    as torchvision does), and checked against the bare model: WeightsFileError otherwise."""
    import os

    import torchvision.models as tvm

    from cnnx.runtime.files import first_line, os_error_line
    from cnnx.train.checkpoint import UnreadableTorchFile, load_tensors
    from cnnx.train.finetune import state_dict_mismatch

    weights = tvm.get_model_weights(name).DEFAULT
    path = _require_cached_weights(weights)
    again = "delete it to download it again"
    if not os.path.exists(path):  # as torch.hub does: a temp file moved into place, its hash checked
        match = torch.hub.HASH_REGEX.search(os.path.basename(path))
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(weights.url, path, match.group(1) if match else None, progress=True)
        except (OSError, RuntimeError) as e:  # RuntimeError: the download's hash is not the one its name gives
            why = os_error_line(e) if isinstance(e, OSError) else first_line(e, 200)
            raise WeightsFileError(f"cannot download {weights.url} to {path} ({why})") from None
    try:
        with open(path, "rb") as f:
            state = load_tensors(f)
    except (UnreadableTorchFile, OSError) as e:
        why = e if isinstance(e, UnreadableTorchFile) else (e.strerror or first_line(e))
        raise WeightsFileError(f"the pretrained weights {path} cannot be read ({why}): {again}") from None
    if not isinstance(state, dict):
        raise WeightsFileError(f"the pretrained weights {path} are not a state_dict: {again}")
    with torch.device("meta"):
        own = tvm.get_model(name, weights=None).state_dict()
    # torchvision's ImageNet files predate BatchNorm's num_batches_tracked: load_state_dict fills it in
    untracked = {k for k in own if k.endswith(".num_batches_tracked") and k not in state}
    wrong = state_dict_mismatch(own, state, skip=untracked)
    if wrong:
        raise WeightsFileError(f"the pretrained weights {path} are not torchvision's {name} ({wrong}): {again}")
    return state


def _require_cached_weights(weights) -> str:
    """The hub cache's path of `weights`. torchvision downloads weights on first use. Offline,
    that is a hang or a traceback; say instead where they are expected so the user can copy them in."""
    import os
    import socket

    from torch.hub import get_dir

    path = os.path.join(get_dir(), "checkpoints", os.path.basename(weights.url))
    if os.path.exists(path):
        return path
    try:
        socket.create_connection(("download.pytorch.org", 443), timeout=3).close()
    except OSError:
        raise UnknownArch(
            f"pretrained weights are not in the local cache ({path}) and download.pytorch.org is unreachable; "
            f"download {weights.url} to that path (or set TORCH_HOME) and run again"
        ) from None
    return path


def _forward_on_meta(name: str, arch_kwargs: dict, h: int, w: int, hook=None, batch: int = 2):
    """Build `name` for (h, w) images on the meta device (shapes only: no memory) and run a
    training-mode batch of two (or `batch`) through it (batch norm in training takes no batch of
    one 1x1 map), with `hook` on every leaf module. Raises what the build or the forward raises.
    The first call in a process costs seconds of imports (the meta kernels)."""
    import warnings

    kwargs = {**arch_kwargs, **({"image_size": h} if "image_size" in arch_kwargs else {})}
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a layer of no elements at a size too small says so
        net = create_model(name, 2, **kwargs).train()
        if hook is not None:
            for m in net.modules():
                if next(m.children(), None) is None:
                    m.register_forward_hook(hook)
        net(torch.empty(batch, 3, h, w))


def batch_of_one_fails(name: str, arch_kwargs: dict, size) -> bool:
    """Whether `name` cannot train on a batch of one (h, w) image: its batch norm over a 1x1
    map takes none (torch's ValueError, at the first step). On the meta device."""
    try:
        _forward_on_meta(name, arch_kwargs, *size, batch=1)
    except ValueError:
        return True
    except (NotImplementedError, RuntimeError):  # not this check's to say (smallest_side's, the build's)
        return False
    return False


def smallest_side(name: str, arch_kwargs: dict, size) -> int | None:
    """None where `name` takes (h, w) images; else the smallest square side it takes (0: none
    up to MAX_INPUT_SIDE): its layers shrink smaller ones to nothing. Forward passes on the meta
    device, so a --image-size too small stops before the data is read, not at the first step.
    An op without a meta kernel is not checked here."""
    from cnnx.runtime.contract import MAX_INPUT_SIDE

    def takes(h, w) -> bool:
        try:
            _forward_on_meta(name, arch_kwargs, h, w)
        except NotImplementedError:
            return True
        except RuntimeError:
            return False
        return True

    h, w = size
    # Each layer's output grows with its input, and every arch takes its own default side: only a
    # smaller one is tried (the first forward on the meta device costs seconds of imports).
    if min(h, w) >= get_arch(name).image_size or takes(h, w):
        return None
    lo, hi = max(h, w), MAX_INPUT_SIDE  # lo is refused; bisect (each layer's output grows with its input)
    if not takes(hi, hi):
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if takes(mid, mid) else (mid, hi)
    return hi


# No arch of the zoo holds more than this many times its float32 input's bytes in its layers'
# outputs (activation_bytes; tests/test_train_hardening.py checks every arch): a batch whose
# input times this fits in memory needs no count.
MAX_ACTIVATION_RATIO = 1024


def activation_bytes(name: str, arch_kwargs: dict, size) -> int:
    """float32 bytes of every layer's output for one (h, w) image in training mode: about what
    a training step holds for its backward pass (the real peak is of its order; bf16 lowers
    it, the optimizer's buffers add to it). Counted on the meta device (_forward_on_meta). 0
    where the model cannot be built or run there (not estimated: building it for real says why)."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * 4

    try:
        _forward_on_meta(name, arch_kwargs, *size, hook=count)
    except (NotImplementedError, RuntimeError, ValueError, MemoryError):
        return 0
    return total // 2


def _replace_fc(m, n):
    m.fc = nn.Linear(m.fc.in_features, n)


def _replace_vgg_head(m, n):
    m.classifier[-1] = nn.Linear(m.classifier[-1].in_features, n)


@dataclass(frozen=True)
class Arch:
    build: Callable[..., nn.Module]
    description: str
    image_size: int = 32  # default input side when the data does not fix one
    mean: tuple = CIFAR_MEAN
    std: tuple = CIFAR_STD


ARCHS: dict[str, Arch] = {
    "airnet": Arch(AirNet, "fast default for CIFAR-scale images (after airbench94), test-time views"),
    "seed-cnn": Arch(SeedCNN, "the tutorial's two-conv CNN"),
    "seed-vgg": Arch(SeedVGG, "the tutorial's 13-conv VGG-style net"),
    "resnet18-cifar": Arch(_cifar_resnet18, "ResNet-18 with a 3x3 stem for 32x32 inputs"),
    "resnet18": Arch(_torchvision("resnet18", _replace_fc), "torchvision ResNet-18 (ImageNet; --pretrained)",
                     224, IMAGENET_MEAN, IMAGENET_STD),
    "vgg16": Arch(_torchvision("vgg16", _replace_vgg_head), "torchvision VGG16 (ImageNet; --pretrained)",
                  224, IMAGENET_MEAN, IMAGENET_STD),
}

def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise UnknownArch(f"unknown arch {name!r}; valid: {', '.join(ARCHS)}") from None


def create_model(name: str, num_classes: int, **arch_kwargs) -> nn.Module:
    """Build `name` with its plain-JSON kwargs. Unknown names and unknown kwargs fail loudly."""
    arch = get_arch(name)
    try:
        return arch.build(num_classes=num_classes, **arch_kwargs)
    except TypeError as e:
        raise UnknownArch(f"bad arguments for arch {name!r}: {e}") from None
