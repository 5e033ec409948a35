"""How many CPU threads torch's intra-op work gets (``trainer.num_threads``).

``auto`` (the default) decides from the work one training step does, counted once before
training with torch's FLOP counter on one sample: below ``SMALL_STEP_FLOPS`` a step is too small
to split (each op's threads are woken and joined for microseconds of work, and on a machine
other processes share they wait on each other for whole time slices), so one thread; above
it, every core this process may use, divided between the ranks of a machine. The rule reads
only the model, the data's shape and the batch size, never the machine's load, so the same
config picks the same count on every run and resumes bit for bit (a different thread count
sums floats in another order). A number sets the count; ``0`` keeps torch's own default.
"""

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

log = logging.getLogger("runner")

# multiply-adds x 2 per optimizer step (forward x 3 for the backward pass) below which one
# thread is as fast or faster; measured on this project's 2-core machine (README, Performance)
SMALL_STEP_FLOPS = 1.0e9


@dataclass(frozen=True)
class Threads:
    count: int  # what torch.set_num_threads got (torch's default where the setting is 0)
    reason: str  # one line for the log and the summary


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may run on (taskset, Slurm, cgroups' cpusets)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def ranks_on_this_node() -> int:
    """Processes of one DDP job on this machine: torchrun's LOCAL_WORLD_SIZE, else Slurm's
    tasks per node (as "2" or "2(x3)"), else 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0]
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def step_flops(model: torch.nn.Module, input_shape: Sequence[int], batch_size: int) -> float | None:
    """FLOPs of one training step: the multiply-adds (x 2) of every convolution and linear
    layer in a forward pass on 2 samples of zeros, scaled to the batch, x 3 for the backward.
    Counted with forward hooks rather than torch's FlopCounterMode, whose import (torch._dynamo)
    costs 0.7 s of start-up; attention's own matmuls are left out, which only matters for long
    sequences. None where the model cannot be run on zeros of that shape."""
    total = [0]

    def count(module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            return
        if isinstance(module, torch.nn.Linear):
            total[0] += 2 * output.numel() * module.in_features
        else:  # a convolution: each output value sums in_channels / groups x kernel products
            kernel = 1
            for size in module.kernel_size:
                kernel *= size
            total[0] += 2 * output.numel() * module.in_channels // module.groups * kernel

    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    hooks = [module.register_forward_hook(count) for module in model.modules() if isinstance(module, layers)]
    was_training = model.training
    try:
        model.eval()
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros(2, *[int(size) for size in input_shape], device=device))
        return total[0] / 2 * batch_size * 3
    except Exception:  # a model whose inputs are not one tensor of input_shape
        return None
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)


def choose(setting: Any, model: torch.nn.Module, input_shape: Sequence[int], batch_size: int, device: torch.device,
           ranks_per_node: int = 1) -> Threads:
    """Apply ``trainer.num_threads`` and say what it chose and why."""
    if isinstance(setting, int) and not isinstance(setting, bool):
        if setting > 0:
            torch.set_num_threads(setting)
            return Threads(setting, f"{setting} (trainer.num_threads)")
        return Threads(torch.get_num_threads(), f"{torch.get_num_threads()} (torch's default: trainer.num_threads=0)")
    share = max(1, usable_cores() // max(1, ranks_per_node))
    if device.type != "cpu":
        torch.set_num_threads(share)
        return Threads(share, f"{share} (auto: the model runs on {device.type}; the host's cores, shared by {ranks_per_node} rank(s))")
    flops = step_flops(model, input_shape, batch_size)
    if flops is None:
        torch.set_num_threads(share)
        return Threads(share, f"{share} (auto: the step's work could not be counted)")
    if flops < SMALL_STEP_FLOPS or share == 1:
        torch.set_num_threads(1)
        why = f"{flops / 1e9:.2g} GFLOP a step, under {SMALL_STEP_FLOPS / 1e9:g}" if flops < SMALL_STEP_FLOPS else "one core for this rank"
        return Threads(1, f"1 (auto: {why})")
    torch.set_num_threads(share)
    return Threads(share, f"{share} (auto: {flops / 1e9:.2g} GFLOP a step; {share} of {usable_cores()} cores for this rank)")


def busy_hint(threads: Threads, load: float | None = None) -> str | None:
    """A line for the summary when several threads ran on a machine busier than its cores:
    then they wait on each other, and one thread is often several times faster."""
    if threads.count <= 1:
        return None
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            return None
    cores = usable_cores()
    if load <= cores:
        return None
    return (f"the machine was busy (load {load:.1f} on {cores} cores) while {threads.count} threads trained: "
            "they wait on each other; trainer.num_threads=1 may be several times faster")
