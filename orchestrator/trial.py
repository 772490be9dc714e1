"""The trial driver: one Tune trial = one Ray Train run of `trainers.loop.train_worker`.

Ray Train V2 no longer runs as a Tune trainable itself; the supported pattern is a Tune
function that builds a TorchTrainer and calls `.fit()`, with TuneReportCallback forwarding
rank 0's reports to Tune. The Train run is named after the Tune trial id so that a
restarted trial (or `--resume`) finds its own checkpoints.
"""
from __future__ import annotations

import functools

import ray.train
from ray import tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

DRIVER_CPUS = 0.05  # the driver only waits on the trainer; Tune rejects a request of 0


@functools.cache
def _local_trainer_class():
    """TorchTrainer without the two helper actors a single-machine cluster never needs.

    Ray Train V2 (2.5x-2.6x) starts, per run, a DatasetManager actor even when the trainer gets
    no Ray Datasets (ours never does: each worker reads its own shard of files), and a
    detached PlacementGroupCleaner that frees the run's placement group should the controller
    die ungracefully; on a local cluster the whole cluster goes with the launch. Each is one
    more Python process importing Ray (and Ray Data) for every trial, on the cores the workers
    train on. Both come from the trainer's private `_create_default_callbacks`; if a Ray
    version moves them, this falls back to the stock trainer (slower, nothing else): a missing
    module gives TorchTrainer itself, a renamed method leaves the override below uncalled.
    Built once per process."""
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return TorchTrainer

    class LocalTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            unneeded = (PlacementGroupCleanerCallback,) + (() if self.datasets else (DatasetsCallback,))
            return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, unneeded)]

    return LocalTorchTrainer


def train_worker(config: dict) -> None:
    """What each Ray Train worker runs: `trainers.loop.train_worker`, imported there.

    Ray pickles this function by reference into the trial driver and the Train controller;
    referring to trainers.loop directly would make both import it (MONAI and Opacus: about
    5 of its 7 s of imports), on the cores the workers train on, for every trial."""
    from trainers.loop import train_worker as loop

    return loop(config)


def run_trial(config: dict, meta: dict) -> None:
    """`config` = {"stage": the trial's stage config}; `meta` = what every trial of the
    stage shares (data, privacy, cluster), bound with `tune.with_parameters` so it stays
    out of Tune's trial tables and MLflow params."""
    trial_id = tune.get_context().get_trial_id()
    use_gpu = bool(meta["use_gpu"])
    resources = {"CPU": meta["cpus_per_worker"]}
    if use_gpu:
        resources["GPU"] = meta.get("gpus_per_worker", 1)
    # A local cluster (launch started it; `local_cluster` in meta) skips the helper actors.
    trainer_class = _local_trainer_class() if meta.get("local_cluster") else TorchTrainer
    trainer = trainer_class(
        train_worker,
        train_loop_config={"stage": config["stage"], "meta": meta},
        scaling_config=ray.train.ScalingConfig(num_workers=meta["workers"], use_gpu=use_gpu,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=f"{meta['run_prefix']}-{trial_id}",
            storage_path=meta["storage_path"],
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=meta["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()
