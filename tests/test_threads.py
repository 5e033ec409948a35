"""trainer.num_threads: auto picks one thread for a small step and the process's cores for a
large one, from the model and data alone; a number is taken as given."""

import pytest
import torch
from torch import nn

from runner import threads
from runner.run import check
from runner.errors import ConfigError


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


CPU = torch.device("cpu")


def test_a_small_step_trains_on_one_thread_and_says_why():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # 2 x 64 x 10 FLOPs a sample
    chosen = threads.choose("auto", model, [1, 8, 8], batch_size=32, device=CPU)
    assert chosen.count == torch.get_num_threads() == 1
    flops = threads.step_flops(model, [1, 8, 8], 32)
    assert flops == 2 * 64 * 10 * 32 * 3  # forward x 3 for the backward
    assert chosen.reason == f"1 (auto: {flops / 1e9:.2g} GFLOP a step, under 1)"
    assert model.training  # counted in eval mode, handed back as it was


def test_a_large_step_gets_the_cores_shared_between_the_ranks_of_the_machine():
    model = nn.Linear(2048, 2048)  # 2 x 2048^2 x 64 x 3 = 1.6 GFLOP a step
    cores = threads.usable_cores()
    chosen = threads.choose("auto", model, [2048], batch_size=64, device=CPU)
    assert chosen.count == torch.get_num_threads() == cores
    assert chosen.reason.startswith(f"{cores} (auto: 1.6 GFLOP a step") if cores > 1 else chosen.reason == "1 (auto: one core for this rank)"
    shared = threads.choose("auto", model, [2048], batch_size=64, device=CPU, ranks_per_node=cores)
    assert shared.count == 1  # each rank of a full machine: one core's worth


def test_a_number_is_taken_as_given_and_0_keeps_torchs_default():
    model = nn.Linear(4, 2)
    assert threads.choose(3, model, [4], 8, CPU).count == torch.get_num_threads() == 3
    default = torch.get_num_threads()
    zero = threads.choose(0, model, [4], 8, CPU)
    assert zero.count == default and "torch's default" in zero.reason


def test_a_model_that_cannot_run_on_zeros_gets_the_cores():
    class Pairs(nn.Module):  # takes (x, t), not one tensor
        def forward(self, x, t):
            return x + t

    chosen = threads.choose("auto", Pairs(), [3], 8, CPU)
    assert chosen.count == threads.usable_cores() and "could not be counted" in chosen.reason


@pytest.mark.parametrize("env, expected", [({"LOCAL_WORLD_SIZE": "2"}, 2), ({"SLURM_NTASKS_PER_NODE": "4(x2)"}, 4), ({}, 1)])
def test_ranks_on_this_node_come_from_torchrun_or_slurm(monkeypatch, env, expected):
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert threads.ranks_on_this_node() == expected


def test_the_summary_hint_appears_only_for_several_threads_on_a_busy_machine():
    cores = threads.usable_cores()
    several = threads.Threads(2, "2 (trainer.num_threads)")
    assert threads.busy_hint(threads.Threads(1, "1"), load=cores * 4) is None
    assert threads.busy_hint(several, load=cores * 0.5) is None
    hint = threads.busy_hint(several, load=cores + 2.0)
    assert hint == (f"the machine was busy (load {cores + 2.0:.1f} on {cores} cores) while 2 threads trained: "
                    "they wait on each other; trainer.num_threads=1 may be several times faster")


@pytest.mark.parametrize("value, ok", [("auto", True), (2, True), (0, True), (-1, False), ("many", False)])
def test_the_setting_is_checked_with_the_fix(cfg, value, ok):
    config = cfg(f"trainer.num_threads={value}")
    if ok:
        check(config)
        return
    with pytest.raises(ConfigError, match=rf"trainer.num_threads={value!r} is not a thread count; use auto \(the default\), a count, or 0"):
        check(config)
