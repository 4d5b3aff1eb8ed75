"""A study's placement on a simulated cluster: a head and two GPU workers, all on this machine.

``ray.cluster_utils.Cluster`` starts three Ray nodes shaped like cluster.yaml's:
the head advertises the ``raycf_driver`` resource (and no GPU), each worker one
GPU (logical: nothing here touches CUDA). Then, the way a study places work:

* Tune trial drivers ask for the study's ``search.driver_resources``;
* each driver runs a Ray Train worker group with ``use_gpu=True``;
* a Ray Data actor pool asks for one GPU per actor (the features and masks stages).

Prints one JSON object: the node of every driver, Train worker and Data actor,
the head's and workers' node ids, and what ``check_storage_for_cluster`` says
about local, ``s3://`` and ``file://`` storage paths on this cluster. Run by
tests/test_cluster_placement.py in its own process (never next to another Ray
session in one process), inside tests/cluster/sandbox.sh's namespaces (the
nodes' only address is 127.0.0.1, and nothing outlives the run).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
TRIALS = 2


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def train_worker(_config: dict) -> dict:
    import ray

    return {"node": node_id(), "gpus": [str(gpu) for gpu in ray.get_gpu_ids()]}


def trial_driver(config: dict) -> None:
    """What a study trial does: report where it runs, fit a GPU worker group from here."""
    import ray.train
    import ray.tune
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer  # no torch backend: the GPUs are logical

    trainer = DataParallelTrainer(
        train_worker,
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=True),
        run_config=ray.train.RunConfig(name=f"trial-{config['trial']}", storage_path=config["storage"]),
    )
    worker = trainer.fit().return_value
    ray.tune.report({"driver_node": node_id(), "worker_node": worker["node"], "worker_gpus": worker["gpus"]})


class Featurizer:
    """Stands in for the features stage's actor (one GPU each)."""

    def __call__(self, batch: dict) -> dict:
        batch["node"] = [node_id()] * len(batch["id"])
        return batch


def main() -> None:
    import ray
    import ray.data
    import ray.tune
    from ray.cluster_utils import Cluster

    from raycf.config import load_study
    from raycf.errors import UserError
    from raycf.cluster import check_storage_for_cluster

    cluster_file = yaml.safe_load((REPO / "cluster.yaml").read_text())
    head_resources = cluster_file["available_node_types"]["head"]["resources"]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 0, "resources": head_resources, "include_dashboard": False},
    )
    workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]  # gpu_1x: one GPU per node
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    report: dict = {
        "head": cluster.head_node.node_id,
        "workers": sorted(node.node_id for node in workers),
        "head_resources": head_resources,
    }
    try:
        report["storage"] = {}
        for storage_path in ("results", "s3://raycf-bucket/studies", "file:///mnt/shared/raycf"):
            study = load_study(REPO / "studies" / "digits.yaml", [f"storage_path={storage_path}"])
            try:
                check_storage_for_cluster(study)
                report["storage"][storage_path] = "accepted"
            except UserError as error:
                report["storage"][storage_path] = f"refused: {error}"

        study = load_study(REPO / "studies" / "digits.yaml", ["search.driver_resources={raycf_driver: 0.01}"])
        with tempfile.TemporaryDirectory() as storage:
            tuner = ray.tune.Tuner(
                ray.tune.with_resources(trial_driver, {"cpu": 1, **study.search.driver_resources}),
                param_space={"trial": ray.tune.grid_search(list(range(TRIALS))), "storage": storage},
                tune_config=ray.tune.TuneConfig(max_concurrent_trials=TRIALS),
                run_config=ray.tune.RunConfig(name="placement", storage_path=storage, verbose=0),
            )
            results = tuner.fit()
            report["trials"] = [
                {key: result.metrics.get(key) for key in ("driver_node", "worker_node", "worker_gpus")} | {"error": repr(result.error) if result.error else None}
                for result in results
            ]

        featurized = ray.data.range(8, override_num_blocks=4).map_batches(
            Featurizer, batch_size=2, num_gpus=1, compute=ray.data.ActorPoolStrategy(size=2)
        )
        report["data_actor_nodes"] = sorted({row["node"] for row in featurized.take_all()})
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("PLACEMENT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
