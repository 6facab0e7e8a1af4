"""Transfer learning (issue 10): --weights loads a backbone by name with a fresh head, a frozen
backbone stays bit-identical for its epochs and trains after them, resume is exact across the
switch, a checkpoint that does not fit is one line naming the first mismatching tensor, and
random-resized-crop boxes lie inside the stored image. Real JPEGs, real `cnnx train` runs."""

from __future__ import annotations

import math

import pytest
import torch

from cnnx.runtime.preprocess import load_image, make_spec
from cnnx.train.checkpoint import load_checkpoint
from cnnx.train.config import resolve_config
from cnnx.train.data import load_splits
from cnnx.train.finetune import head_names, load_backbone
from cnnx.train.resized_crop import random_resized_crop, rrc_boxes
from cnnx.train.run import train_spec
from cnnx.train.zoo import CIFAR_MEAN, CIFAR_STD, create_model

from tests._train_util import run_cli

VEHICLES = ["airplane", "automobile", "ship", "truck"]


def _train(data, out, name, cache, *extra):
    return run_cli(["train", "--data", data, "--out", out, "--name", name, "--cache-dir", cache, "--quiet",
                    "--workers", "1", "--threads", "1", *extra])


@pytest.fixture(scope="module")
def ten_class_ckpt(cifar_subset, tmp_path_factory):
    """A seed-vgg (batch norm in its backbone) checkpoint of 10 classes, one short epoch."""
    base = tmp_path_factory.mktemp("pre")
    r = _train(cifar_subset(8), base / "runs", "pre", base / "cache", "--arch", "seed-vgg", "--epochs", "1",
               "--batch-size", "32")
    assert r.exit_code == 0, r.stderr
    return base / "runs" / "pre" / "best.pt"


def _backbone(sd, head):
    return {k: v for k, v in sd.items() if k not in head}


def test_weights_load_every_backbone_tensor_and_a_fresh_head(ten_class_ckpt):
    ckpt = load_checkpoint(ten_class_ckpt)
    head = head_names("seed-vgg", 4, {})
    assert head == {"classifier.7.weight", "classifier.7.bias"}
    torch.manual_seed(3)
    net = create_model("seed-vgg", 4)
    torch.manual_seed(3)
    fresh = create_model("seed-vgg", 4).state_dict()
    n = load_backbone(net, ten_class_ckpt, "seed-vgg", 4, {})
    sd = net.state_dict()
    assert n == len(sd) - 2
    for k, v in _backbone(sd, head).items():  # every backbone tensor, BN buffers included, by value
        assert torch.equal(v, ckpt["state_dict"][k]), k
    for k in head:  # the head is the new model's own initialisation, shaped for 4 classes
        assert sd[k].shape[0] == 4 and torch.equal(sd[k], fresh[k]), k
    assert not torch.equal(sd["features.0.weight"], fresh["features.0.weight"])


@pytest.fixture(scope="module")
def vehicles(cifar_subset):
    return cifar_subset(10, offset=100, classes=VEHICLES)


def test_frozen_backbone_unchanged_then_trains_and_resume_is_exact(ten_class_ckpt, vehicles, tmp_path):
    common = ["--weights", ten_class_ckpt, "--epochs", "2", "--freeze-backbone-epochs", "1", "--batch-size", "8",
              "--lr", "0.05"]
    r = _train(vehicles, tmp_path / "runs", "ft", tmp_path / "cache", *common, "--stop-after", "1")
    assert r.exit_code == 0, r.stderr
    assert "seed-vgg" in r.stderr and "backbone frozen" in r.stderr  # --arch came from the checkpoint
    pre = load_checkpoint(ten_class_ckpt)["state_dict"]
    head = head_names("seed-vgg", 4, {})
    after1 = load_checkpoint(tmp_path / "runs" / "ft" / "last.pt")
    assert after1["num_classes"] == 4 and after1["config"]["backbone_lr_mult"] == 1.0  # the --weights default
    for k, v in _backbone(after1["state_dict"], head).items():
        assert torch.equal(v, pre[k]), f"{k} changed while frozen"
    r = run_cli(["train", "--resume", tmp_path / "runs" / "ft", "--quiet", "--workers", "1", "--threads", "1"])
    assert r.exit_code == 0, r.stderr
    resumed = load_checkpoint(tmp_path / "runs" / "ft" / "last.pt")["state_dict"]
    changed = [k for k, v in _backbone(resumed, head).items() if v.is_floating_point() and not torch.equal(v, pre[k])]
    assert "features.0.weight" in changed and "features.1.running_mean" in changed  # unfrozen: it trains
    r = _train(vehicles, tmp_path / "runs", "straight", tmp_path / "cache", *common)
    assert r.exit_code == 0, r.stderr
    straight = load_checkpoint(tmp_path / "runs" / "straight" / "last.pt")["state_dict"]
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), f"{k}: resume across the unfreeze is not exact"


@pytest.mark.parametrize("extra, tensor", [
    (["--arch", "airnet"], "features.0.weight"),  # another arch
    (["--image-size", "48"], "classifier.2.weight"),  # same arch, a backbone tensor of another shape
])
def test_weights_that_do_not_fit_are_one_line_naming_the_tensor(ten_class_ckpt, vehicles, tmp_path, extra, tensor):
    r = _train(vehicles, tmp_path / "runs", "bad", tmp_path / "cache", "--weights", ten_class_ckpt, "--epochs", "1",
               *extra)
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and tensor in lines[-1] and "Traceback" not in r.stderr
    assert lines[-1].count("[") == 2  # both shapes (or the shape and where it is missing)
    cache = tmp_path / "cache"  # found before any image was decoded, and no run folder is left
    assert not (cache.exists() and any(cache.iterdir())) and not (tmp_path / "runs" / "bad").exists()


def test_weights_with_pretrained_is_a_usage_error(ten_class_ckpt, vehicles, tmp_path):
    r = _train(vehicles, tmp_path / "runs", "x", tmp_path / "cache", "--weights", ten_class_ckpt, "--pretrained")
    assert r.exit_code == 2 and "--weights" in r.stderr


def test_random_resized_crop_boxes_inside_the_image_for_many_seeds():
    for seed in range(300):
        g = torch.Generator().manual_seed(seed)
        h, w = torch.randint(8, 80, (2,), generator=g).tolist()
        lo = float(torch.empty(()).uniform_(0.01, 1.0, generator=g))
        scale = (lo, float(torch.empty(()).uniform_(lo, 1.0, generator=g)))
        rlo = float(torch.empty(()).uniform_(0.2, 2.0, generator=g))
        ratio = (rlo, rlo * float(torch.empty(()).uniform_(1.0, 3.0, generator=g)))
        boxes = rrc_boxes(16, h, w, scale=scale, ratio=ratio, generator=g)
        top, left, bh, bw = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (bh >= 1).all() and (bw >= 1).all(), seed
        assert (top + bh <= h).all() and (left + bw <= w).all(), (seed, h, w, boxes)
        x = torch.randint(0, 256, (16, 3, h, w), dtype=torch.uint8, generator=g)
        out = random_resized_crop(x, (12, 10), scale=scale, ratio=ratio, generator=g)
        assert out.shape == (16, 3, 12, 10) and out.dtype == torch.uint8


def test_random_resized_crop_of_the_whole_image_at_its_size_is_the_image():
    x = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    out = random_resized_crop(x, (20, 20), scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator())
    assert torch.equal(out, x)


def test_rrc_trains_on_larger_stored_images_and_evaluates_through_the_spec_exactly(cifar_subset, tmp_path):
    data = cifar_subset(6, classes=VEHICLES)
    cfg = resolve_config("seed-cnn", data=str(data), image_size=40, aug=("rrc", "flip"))
    spec = make_spec(40, CIFAR_MEAN, CIFAR_STD)
    tspec = train_spec(cfg, spec)
    assert tspec["size"] == [math.ceil(40 * 1.14)] * 2
    base = {"data": str(data), "data_root": None, "cache_dir": str(tmp_path), "preprocess": spec,
            "val_fraction": 0.25, "split_seed": 0}
    s = load_splits(base, progress=False, workers=1, train_spec=tspec)
    assert s.train[0].shape[-2:] == (46, 46) and s.val[0].shape[-2:] == (40, 40)
    for i, p in enumerate(s.val_paths):  # what evaluation sees is what export / classify see
        arr, _ = load_image(p, spec)
        assert torch.equal(s.val[0][i], torch.from_numpy(arr)), p
    r = _train(data, tmp_path / "runs", "rrc", tmp_path, "--arch", "seed-cnn", "--image-size", "40", "--aug",
               "rrc,flip", "--epochs", "1", "--batch-size", "8")
    assert r.exit_code == 0, r.stderr


class _RunsCode:
    """A pickle that would create a file when unpickled by anything but weights_only loading."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pretrained_weights_are_read_as_tensors_checked_before_decoding_and_not_needed_to_resume(
        vehicles, tmp_path, monkeypatch):
    """--pretrained read torch's hub cache through torchvision, which unpickles it: a file planted
    there ran its code during a run that ended well. A text, truncated or other-arch file gave a
    traceback or blamed --image-size, after all the data was decoded; a resume needed the file again."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    args = ["--arch", "resnet18", "--pretrained", "--image-size", "32", "--epochs", "2", "--batch-size", "8"]
    torch.save({"conv1.weight": _RunsCode(marker)}, cached)
    wrong = {"evil": "cannot be read", "text": "cannot be read", "vgg": "tensor conv1.weight [64, 3, 7, 7] of the model is not in"}
    for kind, needle in wrong.items():
        if kind == "text":
            cached.write_text("<html>a proxy's page</html>\n")
        elif kind == "vgg":
            torch.save(torchvision.models.vgg11(weights=None).features.state_dict(prefix="features."), cached)
        r = _train(vehicles, tmp_path / "runs", kind, tmp_path / "cache", *args)
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert lines[-1].startswith("Error: the pretrained weights ") and str(cached) in lines[-1], lines[-1]
        assert needle in lines[-1] and "delete it to download it again" in lines[-1], lines[-1]
        cache = tmp_path / "cache"  # found before any image was decoded
        assert not (cache.exists() and any(cache.iterdir())) and not (tmp_path / "runs" / kind).exists()
    assert not marker.exists(), "the planted file's code ran"
    torch.manual_seed(0)
    imagenet = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()  # for the download:
                if not k.endswith(".num_batches_tracked")}  # torchvision's file predates these (BatchNorm fills them in)
    torch.save(imagenet, cached)
    r = _train(vehicles, tmp_path / "runs", "ok", tmp_path / "cache", *args, "--stop-after", "1")
    assert r.exit_code == 0, r.stderr[-2000:]
    first = load_checkpoint(tmp_path / "runs" / "ok" / "last.pt")["state_dict"]
    # the recipe freezes the backbone for the first epoch: every tensor but the new head is the file's
    assert all(torch.equal(first[k], v) for k, v in imagenet.items() if not k.startswith("fc."))
    cached.unlink()  # last.pt holds every weight: resuming needs no ImageNet file (nor a download)
    r = run_cli(["train", "--resume", tmp_path / "runs" / "ok", "--quiet", "--workers", "1", "--threads", "1"])
    assert r.exit_code == 0, r.stderr[-2000:]
    assert len(load_checkpoint(tmp_path / "runs" / "ok" / "last.pt")["history"]) == 2


def test_the_backbone_trains_at_its_lr_multiplier_and_the_head_at_the_full_rate():
    """--backbone-lr-mult scales the pretrained layers' rate, not the new head's (swapped, the
    fresh head learned at a tenth of the rate and the backbone at all of it, without a sign)."""
    from cnnx.train.finetune import param_groups

    net = create_model("seed-cnn", 4)
    head = head_names("seed-cnn", 4, {})
    assert head and all(name in dict(net.named_parameters()) for name in head)
    backbone, top = param_groups(net, head, 0.1)
    ids = {id(p): name for name, p in net.named_parameters()}
    assert backbone["lr_mult"] == 0.1 and top["lr_mult"] == 1.0
    assert {ids[id(p)] for p in top["params"]} == set(head)
    assert {ids[id(p)] for p in backbone["params"]} == set(ids.values()) - set(head)


def test_weights_of_another_variant_of_the_arch_do_not_fit_in_either_direction():
    """A checkpoint with a tensor the model lacks (another variant of the arch: an extra layer)
    is refused as one with a tensor missing is, naming it; a subset was loaded silently."""
    from cnnx.train.finetune import state_dict_mismatch

    own = create_model("seed-cnn", 4).state_dict()
    assert state_dict_mismatch(own, dict(own)) is None
    extra = {**own, "features.9.weight": torch.zeros(3, 3)}
    assert state_dict_mismatch(own, extra) == "tensor features.9.weight [3, 3] of the checkpoint is not in the model"
    name = next(iter(own))
    missing = {k: v for k, v in own.items() if k != name}
    assert state_dict_mismatch(own, missing).startswith(f"tensor {name} ")
    assert "of the model is not in the checkpoint" in state_dict_mismatch(own, missing)
