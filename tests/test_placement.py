"""Placement: what a trial reserves, how many run at once, and trials that can never fit
(refused before the sweep starts). `cluster_plan` reads the cluster's alive nodes; here the
node lists are given directly (the shapes `ray.nodes()` reports)."""
import pytest

from orchestrator.sweep_file import parse_sweep
from orchestrator.errors import UserError
from orchestrator.launch import cluster_plan


def cfg(**cluster):
    return parse_sweep({"name": "p", "cluster": {"address": "auto", **cluster}, "stages": [{"name": "a"}]})


def test_cpu_only_cluster_fits_trials_by_cpus_and_leaves_room_for_drivers():
    nodes = [{"CPU": 16}, {"CPU": 16}]
    # 8 worker slots of 4 CPUs; the trial drivers' slivers may cost one slot per node
    assert cluster_plan(cfg(workers_per_trial=2, cpus_per_worker=4), None, nodes) == (False, 3)
    assert cluster_plan(cfg(workers_per_trial=1, cpus_per_worker=1), None, [{"CPU": 1}, {"CPU": 1}]) == (False, 1)
    assert cluster_plan(cfg(workers_per_trial=1, cpus_per_worker=1), None, [{"CPU": 8}]) == (False, 7)
    assert cluster_plan(cfg(workers_per_trial=2, cpus_per_worker=4, max_concurrent_trials=1), None, nodes) == (False, 1)


def test_gpus_decide_concurrency_and_fractions_pack_small_trials():
    nodes = [{"CPU": 16, "GPU": 4}, {"CPU": 16, "GPU": 4}]
    assert cluster_plan(cfg(workers_per_trial=2), None, nodes) == (True, 4)
    # quarter-GPU single-worker trials: 4 per GPU (32), bounded by CPU slots (32 less what drivers may take)
    assert cluster_plan(cfg(workers_per_trial=1, gpus_per_worker=0.25), None, nodes) == (True, 30)
    assert cluster_plan(cfg(workers_per_trial=1, gpus_per_worker=0.25, cpus_per_worker=2), None, nodes) == (True, 14)
    assert cluster_plan(cfg(use_gpu=False), None, nodes)[0] is False


@pytest.mark.parametrize("cluster, nodes, key", [
    ({"workers_per_trial": 8, "cpus_per_worker": 4}, [{"CPU": 16}], "cluster.workers_per_trial"),
    ({"workers_per_trial": 2, "cpus_per_worker": 1}, [{"CPU": 1}, {"CPU": 1}], "cluster.workers_per_trial"),
    ({"cpus_per_worker": 32}, [{"CPU": 16}, {"CPU": 16}], "cluster.cpus_per_worker"),
    ({"use_gpu": True}, [{"CPU": 16}], "cluster.use_gpu"),
    ({"workers_per_trial": 3, "gpus_per_worker": 2}, [{"CPU": 16, "GPU": 4}], "cluster.workers_per_trial"),
    ({"gpus_per_worker": 8}, [{"CPU": 16, "GPU": 4}, {"CPU": 16, "GPU": 4}], "cluster.gpus_per_worker"),
    ({"workers_per_trial": 2, "gpus_per_worker": 0.5}, [{"CPU": 16, "GPU": 4}], "cluster.gpus_per_worker"),
])
def test_trials_that_can_never_fit_are_refused(cluster, nodes, key):
    with pytest.raises(UserError) as err:
        cluster_plan(cfg(**cluster), None, nodes)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_local_ray_keeps_one_declared_cpu_for_trial_drivers():
    local = parse_sweep({"name": "p", "stages": [{"name": "a"}]})
    assert cluster_plan(local, None, [{"CPU": 3}]) == (False, 2)


def test_a_local_cluster_trial_starts_no_dataset_manager_or_placement_group_cleaner():
    """The trainer of a local launch drops exactly the two helper actors a single-machine
    cluster without Ray Datasets never uses, and keeps every other default callback."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from orchestrator.trial import _local_trainer_class

    local = _local_trainer_class()
    assert local is not TorchTrainer and issubclass(local, TorchTrainer)
    kwargs = dict(train_loop_per_worker=lambda config: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
    stock = [type(cb) for cb in TorchTrainer(**kwargs)._create_default_callbacks()]
    lean = [type(cb) for cb in local(**kwargs)._create_default_callbacks()]
    assert DatasetsCallback in stock and PlacementGroupCleanerCallback in stock
    assert lean == [c for c in stock if c not in (DatasetsCallback, PlacementGroupCleanerCallback)]
