"""`--engine ray` on a Ray cluster of two nodes started on this machine
(ray.cluster_utils.Cluster, one CPU each): the actors run on both nodes and every file is
in the output exactly once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._ray_util import read_predictions
from tests._runtime_util import exported_model

pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'cnnx[ray]')")


def test_two_nodes_each_file_once(cifar_subset, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from cnnx.runtime.ray_engine import classify_with_ray

    if ray.is_initialized():
        pytest.skip("another test left a Ray session open in this process")
    model = exported_model(tmp_path)
    folder = cifar_subset(4)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "preds.csv"
        # Two actors of one CPU each on two nodes of one CPU: one actor per node.
        summary = classify_with_ray([str(folder)], str(model), output=str(out), address=cluster.address,
                                    num_workers=2, batch_size=8)
    finally:
        cluster.shutdown()
    assert not ray.is_initialized()  # the engine left the cluster it joined
    paths = [p for p, _, _ in read_predictions(out)]
    assert paths == sorted(str(p) for p in Path(folder).rglob("*.jpg"))  # each once, in path order
    assert len(summary.nodes) == 2, summary.line()
