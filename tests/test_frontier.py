"""The airbench-class techniques of cnnx train (issue 7): whitening init, weight average,
test-time views, Muon, their resume and export, and their bad input. CPU, seconds each."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _train_util import run_cli
from cnnx.train import config, optim, whiten, zoo


def _one_line_usage_error(r, *needles):
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    msg = r.stderr.strip().splitlines()[-1]
    assert msg.startswith("Error:"), r.stderr
    for n in needles:
        assert n in msg, (n, msg)


def _correlated_images(n=64, seed=0):
    """Smooth, channel-correlated images: their 2x2 patches are far from white."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 20, 20, generator=g)
    x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return x + 0.8 * x.mean(1, keepdim=True) + 0.3


# --- whitening ----------------------------------------------------------------------------------

def test_whitening_init_gives_identity_patch_covariance():
    x = _correlated_images()
    before = whiten.patch_matrix(x, 2)
    cov_in = before.T @ before / len(before)
    assert (cov_in - torch.eye(12)).abs().max() > 0.5  # the input is far from white
    conv = nn.Conv2d(3, 24, 2, bias=True)
    whiten.init_whitening(conv, x, eps=1e-9)
    with torch.no_grad():
        y = conv(x)  # (N, 24, 19, 19): channel 12 + i is channel i negated
    first = y[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    cov = first.T @ first / len(first)
    assert torch.allclose(cov, torch.eye(12), atol=2e-3), cov
    assert torch.allclose(y[:, 12:], -y[:, :12])
    assert not conv.weight.requires_grad and conv.bias.requires_grad and float(conv.bias.detach().abs().max()) == 0.0


def test_whitening_layer_must_have_the_whitening_shape():
    assert whiten.whitening_layer(zoo.AirNet(10)).out_channels == 24
    with pytest.raises(whiten.WhiteningError, match="2 x 3 x k x k"):
        whiten.whitening_layer(zoo.SeedCNN(10))


def test_whitening_sample_larger_than_the_split_is_an_error():
    assert len(whiten.sample_images(10, 10, seed=0)) == 10
    with pytest.raises(whiten.WhiteningError, match="only 9"):
        whiten.sample_images(9, 10, seed=0)


# --- weight average -----------------------------------------------------------------------------

def test_ema_equals_hand_computed_average_after_three_steps():
    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema = optim.WeightAverage(net, decay=0.5)
    expected = 1.0
    for step, w in enumerate((3.0, -2.0, 7.0), start=1):
        with torch.no_grad():
            net.weight.fill_(w)
        ema.update(step)
        d = min(0.5, (1 + step) / (10 + step))  # 0.1818..., 0.25, 0.3077...: the warm-up decides here
        expected = d * expected + (1 - d) * w
    assert torch.allclose(ema.module.weight, torch.full((1, 2), expected), atol=1e-6)
    assert ema.module.weight.data_ptr() != net.weight.data_ptr()


def test_ema_averages_bn_statistics_and_copies_counters():
    net = nn.BatchNorm1d(2)
    ema = optim.WeightAverage(net, decay=0.9)
    with torch.no_grad():
        net.running_mean.fill_(10.0)
    net.num_batches_tracked.fill_(7)
    ema.update(100)
    assert torch.allclose(ema.module.running_mean, torch.full((2,), 1.0))  # 0.9 * 0 + 0.1 * 10
    assert int(ema.module.num_batches_tracked) == 7


# --- test-time views ----------------------------------------------------------------------------

def _shift(x, dy, dx):
    """x with its content moved (dy, dx) pixels; the uncovered row/column is the reflected border."""
    h, w = x.shape[-2:]
    rows = (torch.arange(h) - dy).abs()
    rows = torch.where(rows > h - 1, 2 * (h - 1) - rows, rows)
    cols = (torch.arange(w) - dx).abs()
    cols = torch.where(cols > w - 1, 2 * (w - 1) - cols, cols)
    return x[..., rows[:, None], cols[None, :]]


@pytest.mark.parametrize("views", [1, 2, 6])
def test_tta_logits_are_the_mean_of_the_per_view_logits(views):
    torch.manual_seed(0)
    # a large logit scale: an untrained net's logits are ~1e-5 at the default 1/9
    net = zoo.AirNet(10, widths=(8, 16, 16), tta=views, scale=1e4).eval()
    x = torch.randn(5, 3, 32, 32)
    one = zoo.AirNet(10, widths=(8, 16, 16), tta=1, scale=1e4).eval()
    one.load_state_dict(net.state_dict())
    bases = [x] + ([_shift(x, 1, 1), _shift(x, -1, -1)] if views == 6 else [])
    per_view = [b2 for b in bases for b2 in ([b] if views == 1 else [b, b.flip(3)])]
    assert len(per_view) == views
    with torch.no_grad():
        expected = torch.stack([one(v) for v in per_view]).mean(0)
        got = net(x)
    assert got.abs().max() > 0.01
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    if views > 1:
        assert (got - one(x)).abs().max() > 0.01 * got.abs().max()  # the views change the result


def test_set_tta_views_and_bad_counts():
    net = zoo.AirNet(10, widths=(8, 16, 16))
    assert zoo.tta_views(net) == 2  # the default: mirror
    zoo.set_tta_views(zoo.Uint8Input(net, zoo.CIFAR_MEAN, zoo.CIFAR_STD), 6)
    assert zoo.tta_views(net) == 6
    for bad in (0, 3, True):
        with pytest.raises(ValueError, match="1, 2, 6"):
            zoo.set_tta_views(net, bad)
    with pytest.raises(ValueError, match="no test-time views"):
        zoo.set_tta_views(zoo.SeedCNN(10), 2)
    zoo.set_tta_views(zoo.SeedCNN(10), 1)  # one view, the image alone: what it does (--tta 1 was refused)
    assert zoo.tta_views(zoo.SeedCNN(10)) == 1
    assert zoo.AirNet(10, tta=False).tta == 1 and zoo.AirNet(10, tta=True).tta == 2  # older checkpoints' bools
    assert config.TTA_VIEWS == zoo.TTA_VIEWS


# --- Muon ---------------------------------------------------------------------------------------

def test_orthogonalise_flattens_the_singular_values():
    g = torch.randn(16, 36) @ torch.diag(torch.logspace(-2, 1, 36))
    s = torch.linalg.svdvals(optim.orthogonalise(g, steps=5))
    assert float(s.min()) > 0.3 and float(s.max()) < 1.3  # from a spread of 1000x to ~1


def test_muon_steps_plain_groups_exactly_as_torch_sgd():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    ref = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.85, nesterov=True, weight_decay=1e-3)
    mu = optim.Muon(b.parameters(), lr=0.1, momentum=0.85, nesterov=True, weight_decay=1e-3)
    for i in range(3):
        x = torch.randn(8, 4)
        for net, opt in ((a, ref), (b, mu)):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_muon_filters_keep_their_norm_and_move():
    conv = nn.Conv2d(4, 8, 3)
    opt = optim.Muon([dict(params=[conv.weight], orthogonal=True, momentum=0.6)], lr=0.1)
    before = conv.weight.detach().clone()
    conv(torch.randn(2, 4, 6, 6)).sum().backward()
    opt.step()
    assert not torch.equal(before, conv.weight)
    # renormalised to sqrt(8) before the step; an orthogonal update of size lr moves it by little
    assert abs(float(conv.weight.detach().norm()) - 8 ** 0.5) < 0.5


# --- recipes ------------------------------------------------------------------------------------

def test_gpu_recipe_applies_only_on_cuda_and_is_named():
    cpu = config.resolve_config("airnet")
    gpu = config.resolve_config("airnet", cuda=True)
    assert cpu.recipe == "airnet" and cpu.optimizer == "sgd" and not cpu.whiten
    assert gpu.recipe == "airnet+gpu" and gpu.optimizer == "muon" and gpu.whiten and gpu.tta == 6
    assert dict(gpu.arch_kwargs)["widths"] == (64, 256, 256)
    assert config.resolve_config("airnet", cuda=True, optimizer="sgd").optimizer == "sgd"  # the user wins
    assert config.resolve_config("seed-cnn", cuda=True) == config.resolve_config("seed-cnn")  # tutorial net unchanged
    zoo.AirNet(10, **dict(gpu.arch_kwargs))  # the recipe's arch_kwargs build


def test_param_groups_by_role():
    cfg = config.resolve_config("airnet", cuda=True)
    net = zoo.AirNet(10, widths=(8, 16, 16))
    conv = whiten.whitening_layer(net)
    conv.weight.requires_grad_(False)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.requires_grad_(False)
    groups = {g["name"]: g for g in optim.param_groups(net, cfg, steps_per_epoch=22, whitening=conv)}
    assert groups["whiten_bias"]["params"] == [conv.bias] and groups["whiten_bias"]["decay_steps"] == 66
    assert all(p.ndim == 4 for p in groups["filters"]["params"]) and groups["filters"]["orthogonal"]
    assert len(groups["filters"]["params"]) == 6 and groups["other"]["params"] == [net.head.weight]
    assert all(p.ndim == 1 for p in groups["bn"]["params"]) and len(groups["bn"]["params"]) == 6
    assert optim.group_lr(groups["whiten_bias"], 5.0, 10.0, 33) == pytest.approx(cfg.bn_bias_lr * 10.0 * 0.5)
    assert optim.group_lr(groups["whiten_bias"], 5.0, 10.0, 70) == 0.0  # fixed after its epochs
    assert optim.group_lr(groups["filters"], 5.0, 10.0, 33) == pytest.approx(5.0 * cfg.muon_lr / cfg.lr)


# --- cnnx train: resume, export, bad input ------------------------------------------------------

FRONTIER_ARGS = ["--arch", "airnet", "--optimizer", "muon", "--ema", "0.9", "--whiten", "--whiten-images", "100",
                 "--tta", "6", "--batch-size", "64", "--device", "cpu", "--workers", "1", "--quiet"]


def _train(data, out, name, cache, *extra):
    return run_cli(["train", "--data", data, "--out", out, "--name", name, "--cache-dir", cache, *FRONTIER_ARGS,
                    *extra])


@pytest.fixture(scope="module")
def frontier_runs(cifar_subset, tmp_path_factory):
    """Two epochs straight, and one epoch + a resumed one, of the same whitened Muon + EMA + 6-view run."""
    data = cifar_subset(20)
    out = tmp_path_factory.mktemp("frontier-runs")
    cache = out / "cache"
    r = _train(data, out, "straight", cache, "--epochs", "2")
    assert r.exit_code == 0, r.stderr
    r = _train(data, out, "paused", cache, "--epochs", "2", "--stop-after", "1")
    assert r.exit_code == 0, r.stderr
    r = run_cli(["train", "--resume", out / "paused", "--quiet"])
    assert r.exit_code == 0, r.stderr
    return data, out


def test_resume_is_exact_with_ema_and_muon(frontier_runs):
    _, out = frontier_runs
    a = torch.load(out / "straight" / "last.pt", weights_only=True)
    b = torch.load(out / "paused" / "last.pt", weights_only=True)
    for key in ("state_dict", "train_state_dict"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert not all(torch.equal(a["state_dict"][k], a["train_state_dict"][k]) for k in a["state_dict"])  # an average
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"])
    assert [g.get("orthogonal") for g in a["optimizer"]["param_groups"]].count(True) == 1
    assert [h["val_top1"] for h in a["history"]] == [h["val_top1"] for h in b["history"]]
    cfg = json.loads((out / "straight" / "config.json").read_text())
    assert cfg["recipe"] == "airnet" and cfg["arch_kwargs"]["tta"] == 6 and cfg["optimizer"] == "muon"


def test_best_checkpoint_holds_the_average_and_is_whitened(frontier_runs):
    _, out = frontier_runs
    best = torch.load(out / "straight" / "best.pt", weights_only=True)
    last = torch.load(out / "straight" / "last.pt", weights_only=True)
    if best["epoch"] == last["epoch"]:
        for k in best["state_dict"]:
            assert torch.equal(best["state_dict"][k], last["state_dict"][k])
    w = best["state_dict"]["features.0.weight"]
    assert torch.allclose(w[:12], -w[12:])  # the whitening filters stayed frozen (± pairs)


def test_whitened_tta_airnet_exports_through_the_fp32_gate(frontier_runs, tmp_path):
    from cnnx.export.api import export_checkpoint

    data, out = frontier_runs
    res = export_checkpoint(out / "straight" / "best.pt", tmp_path / "export", formats=("onnx", "torchscript"),
                            verify_data=data, parity_images=64)
    doc = json.loads(res.paths["parity"].read_text())
    assert doc["bounds"]["fp32"]["max_abs"] == 1e-4
    fp32 = [r for r in doc["results"] if r["variant"] == "fp32"]
    assert fp32 and all(r["gated"] and r["max_abs"] <= 1e-4 and r["top1_agreement"] == 1.0 for r in fp32)


@pytest.mark.parametrize("extra, needles", [
    (["--tta", "0"], ["--tta", "1, 2, 6"]),
    (["--optimizer", "lion"], ["--optimizer", "lion"]),
    (["--ema", "1"], ["--ema", "(0, 1)"]),
    (["--ema", "0"], ["--ema", "(0, 1)"]),
    (["--arch", "seed-cnn"], ["--tta", "seed-cnn"]),
])
def test_bad_frontier_input_is_one_line_exit_2(cifar_subset, tmp_path, extra, needles):
    r = _train(cifar_subset(20), tmp_path, "bad", tmp_path / "cache", "--epochs", "1", *extra)
    _one_line_usage_error(r, *needles)


def test_a_whitening_sample_larger_than_the_split_samples_all_of_it_with_a_note(cifar_subset, tmp_path):
    """The GPU recipe samples 5,000 images: every photo folder of fewer training images failed on
    CUDA (a usage error naming --whiten-images, which the user never gave)."""
    r = _train(cifar_subset(20), tmp_path, "all", tmp_path / "cache", "--epochs", "1", "--whiten-images", "5000")
    assert r.exit_code == 0, r.stderr[-2000:]
    config = json.loads((tmp_path / "all" / "config.json").read_text())
    n = config["train_images"]
    assert config["whiten_images"] == 5000 > n  # as asked: a --resume repeating it is the same config
    assert f"note: the whitening init samples all {n} training images (whiten_images 5000 is more than the split " \
           "holds)" in r.stderr
    r = run_cli(["train", "--resume", tmp_path / "all", "--epochs", "2", "--whiten-images", "5000", "--quiet"])
    assert r.exit_code == 0, r.stderr[-2000:]


def test_compile_warmup_leaves_the_model_as_it_was():
    from cnnx.train import frontier

    torch.manual_seed(0)
    net = zoo.AirNet(10, widths=(8, 16, 16))
    wrapped = zoo.Uint8Input(net, zoo.CIFAR_MEAN, zoo.CIFAR_STD)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (12,))
    seconds = frontier.compile_warmup(wrapped, net, images, labels, batch=8, device="cpu", bf16=False,
                                      channels_last=False)
    assert seconds > 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BN statistics put back
    assert all(p.grad is None for p in net.parameters())


def test_frozen_parameters_stay_frozen_through_an_epoch(cifar_subset, tmp_path):
    """Frozen BN scales get no step, also without Muon or whitening (the plain parameter list would
    hold them, and the fine-tuning backbone toggle used to wake them at every epoch)."""
    from cnnx.train.config import resolve_config
    from cnnx.train.run import fit

    cfg = resolve_config("airnet", data=str(cifar_subset(20)), cache_dir=str(tmp_path / "c"), device="cpu", epochs=1,
                         batch_size=64, bn_scale_frozen=True, workers=1,
                         arch_kwargs={"widths": (8, 16, 16)})
    (tmp_path / "run").mkdir()
    fit(cfg, tmp_path / "run", progress=False)
    sd = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["state_dict"]
    bn_weights = [v for k, v in sd.items() if k.endswith(".weight") and v.ndim == 1]
    assert bn_weights and all(torch.equal(w, torch.ones_like(w)) for w in bn_weights)

    # fit() into the same folder again (not a resume) replaced this run's best.pt and metrics
    from cnnx.train.run import RunFolderError

    before = (tmp_path / "run" / "best.pt").read_bytes()
    with pytest.raises(RunFolderError, match="already holds last.pt"):
        fit(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "best.pt").read_bytes() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU recipe's compiled path)")
def test_gpu_recipe_trains_compiled_on_cuda(cifar_subset, tmp_path):
    from cnnx.train.config import resolve_config
    from cnnx.train.run import fit

    cfg = resolve_config("airnet", cuda=True, data=str(cifar_subset(100)), cache_dir=str(tmp_path / "c"),
                         device="cuda", epochs=2, batch_size=200, whiten_images=500)
    assert cfg.recipe == "airnet+gpu" and cfg.compile and cfg.optimizer == "muon"
    (tmp_path / "run").mkdir()
    summary = fit(cfg, tmp_path / "run", progress=False)
    assert summary["compile_seconds"] > 0 and summary["whiten_seconds"] > 0
    assert summary["best_val_top1"] > 0.15  # 10 classes: better than chance after 2 short epochs
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["arch_kwargs"]["tta"] == 6 and best["config"]["recipe"] == "airnet+gpu"
