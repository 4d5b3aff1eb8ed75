"""A study's placement on a simulated cluster: a head and two GPU workers, all on this machine.

``ray.cluster_utils.Cluster`` starts three Ray nodes shaped like cluster.yaml's:
the head advertises the ``raycf_driver`` resource (and no GPU), each worker has
four CPUs and one GPU like a g5.xlarge (logical: nothing here touches CUDA) and a
cache folder of its own (``RAYCF_NODE_CACHE``, as each machine has its own disk).
Then, the way a study places work:

* single-worker search trials (``debug.workers: 1``) train inside their Tune
  trial and reserve ``debug.gpus_per_trial`` of a GPU: with 0.25, eight trials
  run at once, four to a GPU node; each reads the frozen-prefix cache from the
  results folder on S3 (moto's server on 127.0.0.1) through
  ``raycf.results.node_cache``, which must fetch it once per node;
* multi-worker trials: a driver asking for ``search.driver_resources`` runs a
  Ray Train worker group with ``use_gpu=True``;
* a Ray Data actor pool asks for one GPU per actor (the features stage).

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
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
TRIALS = 2
PACKED_TRIALS = 8
GPUS_PER_TRIAL = 0.25
BUCKET = "raycf-results"


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


def packed_trial(config: dict) -> None:
    """A single-worker trial: where it runs, its GPU share, and its node's copy of the prefix cache."""
    import ray
    import ray.tune

    from raycf.results import node_cache

    downloads = Path(config["log"])
    real_download = node_cache.download

    def counted(location: str, target: Path) -> None:
        with downloads.open("a") as log:
            log.write(f"{node_id()}\n")
        real_download(location, target)

    node_cache.download = counted
    Path(config["barrier"], str(config["trial"])).write_text("")
    deadline = time.time() + 120
    while len(list(Path(config["barrier"]).iterdir())) < PACKED_TRIALS and time.time() < deadline:
        time.sleep(0.1)  # every trial runs at once, as a packed search does
    folder = node_cache.local_folder(config["cache"], "prefix-simulated")
    ray.tune.report({"node": node_id(), "gpus": [str(gpu) for gpu in ray.get_gpu_ids()], "cached": (folder / "train_0.npy").read_text()})


def upload_prefix() -> str:
    """A stand-in prefix cache on a local S3 server: the results folder of a cluster study."""
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    for name, content in (("train_0.npy", "activations"), ("meta.json", "{}")):
        client.put_object(Bucket=BUCKET, Key=f"digits/prefix/{name}", Body=content.encode())
    return f"s3://{BUCKET}/digits/prefix"


def run_packed_trials(scratch: Path) -> dict:
    import ray.tune

    cache = upload_prefix()
    (scratch / "barrier").mkdir()
    downloads = scratch / "downloads.log"
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(packed_trial, {"cpu": 1, "gpu": GPUS_PER_TRIAL}),
        param_space={"trial": ray.tune.grid_search(list(range(PACKED_TRIALS))), "cache": cache, "barrier": str(scratch / "barrier"), "log": str(downloads)},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=PACKED_TRIALS),
        run_config=ray.tune.RunConfig(name="packed", storage_path=str(scratch / "tune"), verbose=0),
    )
    results = tuner.fit()
    return {
        "trials": [
            {key: result.metrics.get(key) for key in ("node", "gpus", "cached")} | {"error": repr(result.error) if result.error else None}
            for result in results
        ],
        "downloads": downloads.read_text().split() if downloads.exists() else [],
    }


def main() -> None:
    import ray
    import ray.data
    import ray.tune
    from moto.server import ThreadedMotoServer
    from ray.cluster_utils import Cluster

    from raycf.runtime.cluster import check_storage_for_cluster
    from raycf.config import load_study
    from raycf.errors import UserError

    scratch = Path(tempfile.mkdtemp(prefix="placement-"))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}")
    cluster_file = yaml.safe_load((REPO / "cluster.yaml").read_text())
    head_resources = cluster_file["available_node_types"]["head"]["resources"]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 0, "resources": head_resources, "include_dashboard": False},
    )
    # gpu_1x (g5.xlarge): four CPUs and one GPU per node, a disk (here: a cache folder) of its own
    workers = [cluster.add_node(num_cpus=4, num_gpus=1, env_vars={"RAYCF_NODE_CACHE": str(scratch / f"node-{index}")}) for index in range(2)]
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

        report["packed"] = run_packed_trials(scratch)

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
        server.stop()
    print("PLACEMENT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
