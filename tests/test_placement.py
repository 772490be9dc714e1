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


def test_spread_cpus_gives_a_small_stage_the_idle_slots_and_only_whole_fits():
    from orchestrator.config import StageConfig
    from orchestrator.sweep import spread_cpus_per_worker, stage_trials

    local = lambda **kw: parse_sweep({"name": "p", "cluster": {"spread_cpus": True, **kw},  # noqa: E731
                                      "stages": [{"name": "a"}]}).cluster
    two_cores = [{"CPU": 3}]          # a local Ray declares one CPU more than its cores
    assert spread_cpus_per_worker(local(), 2, 1, two_cores) == 2       # a lone trial takes both cores
    assert spread_cpus_per_worker(local(), 2, 2, two_cores) == 1       # two trials: one each, as before
    assert spread_cpus_per_worker(local(), 2, 3, two_cores) == 1
    assert spread_cpus_per_worker(local(), 8, 3, [{"CPU": 9}]) == 2    # 3 trials of 2 CPUs fit 8 cores
    assert spread_cpus_per_worker(local(spread_cpus=False), 2, 1, two_cores) == 1
    # a joined cluster: widened workers must fit whole on its nodes (4 + 2 CPUs, two workers per trial)
    joined = local(address="auto", workers_per_trial=2)
    assert spread_cpus_per_worker(joined, 2, 1, [{"CPU": 4}, {"CPU": 2}]) == 1     # 2 x 2 would need 2 nodes of 2
    assert spread_cpus_per_worker(joined, 2, 1, [{"CPU": 4.5}, {"CPU": 2.5}]) == 2
    # trials in one Tuner: the grid times num_samples
    grid = StageConfig.model_validate({"name": "g", "search": {"num_samples": 2, "parameters": {
        "dp.noise_multiplier": {"values": [1.0, 2.0, 3.0]}}}})
    assert stage_trials(grid, 2) == 6
