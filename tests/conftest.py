"""Shared fixtures. Data comes from $CNNX_CIFAR_DIR (the real CIFAR-10 JPEGs as
benchmarks/cifar_jpegs.py writes them, DIR/<class>/*.jpg), else ../shared/datasets (the
development checkout's tarball of them); tests that need it skip with a reason without either.
Stage-specific fixtures live in their own test modules (or tests/_<stage>_util.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The Ctrl-C tests send SIGINT to this process and to the commands it starts. A shell without
# job control starts a background job (`pytest &` in a script) with SIGINT ignored, which every
# child inherits: Python's own handler here, and so the default in each child after its exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

CIFAR_TAR = ROOT.parent / "shared" / "datasets" / "cifar10-train.tar.gz"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="session")
def cifar_train_dir(tmp_path_factory) -> Path:
    """The 50,000 CIFAR-10 training JPEGs as DIR/<class>/*.jpg (extracted once per session);
    read, never written, by the tests."""
    given = os.environ.get("CNNX_CIFAR_DIR")
    if given:
        if not all((Path(given) / c).is_dir() for c in CIFAR_CLASSES):
            pytest.skip(f"CNNX_CIFAR_DIR={given} is not DIR/<class>/*.jpg of the 10 CIFAR-10 classes")
        return Path(given)
    if not CIFAR_TAR.exists():
        pytest.skip("no CIFAR-10 JPEGs: set CNNX_CIFAR_DIR to the folder `python benchmarks/cifar_jpegs.py DIR` "
                    f"writes (the development checkout has {CIFAR_TAR.relative_to(ROOT.parent)} beside it)")
    dest = tmp_path_factory.mktemp("cifar")
    if shutil.which("tar"):  # a third of tarfile's time for 50,000 members (the suite's first data fixture)
        subprocess.run(["tar", "-xzf", str(CIFAR_TAR), "-C", str(dest), "--no-same-owner"], check=True)
    else:
        with tarfile.open(CIFAR_TAR) as tar:
            tar.extractall(dest, filter="data")
    return dest / "cifar10" / "train"


@pytest.fixture(scope="session")
def cifar_subset(cifar_train_dir, tmp_path_factory):
    """Factory: cifar_subset(n_per_class, offset=0, classes=None) -> a DIR/<class>/ folder
    holding copies of n real JPEGs per class (cached per argument set)."""
    made = {}

    def make(n_per_class: int, offset: int = 0, classes=None) -> Path:
        classes = tuple(classes or CIFAR_CLASSES)
        key = (n_per_class, offset, classes)
        if key not in made:
            root = tmp_path_factory.mktemp(f"cifar{n_per_class}")
            for c in classes:
                files = sorted((cifar_train_dir / c).iterdir())[offset:offset + n_per_class]
                (root / c).mkdir()
                for f in files:
                    shutil.copyfile(f, root / c / f.name)
            made[key] = root
        return made[key]

    return make


@pytest.fixture(autouse=True, scope="session")
def _isolated_cnnx_cache(tmp_path_factory):
    """Tests never touch the real ~/.cache/cnnx (decoded data, own-checkpoints.sha256):
    $CNNX_CACHE points at a session folder, for this process and its subprocesses."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CNNX_CACHE", str(tmp_path_factory.mktemp("cnnx-cache")))
    yield
    mp.undo()

