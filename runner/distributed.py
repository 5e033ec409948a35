"""torch.distributed for the one loop: who am I, who is rank 0, and the few collectives the
loop needs. The one switch for 'only rank 0 logs, checkpoints and prints' lives here.

Ranks come from torchrun (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) or from Slurm tasks
(SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, the job's first node as master). NCCL on CUDA,
gloo on CPU.
"""

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

from runner.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def global_rank() -> int:
    """This process's rank: torchrun sets RANK, a Slurm task SLURM_PROCID; a lone process is 0."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def is_rank_zero() -> bool:
    return global_rank() == 0


def setup(strategy: str, use_cuda: bool) -> Dist:
    """Join (or create) the process group for trainer.strategy=ddp; a no-op otherwise."""
    import torch.distributed as dist

    if strategy != "ddp":
        return Dist()
    if not dist.is_available():
        raise ConfigError("trainer.strategy=ddp but this torch build has no torch.distributed; use trainer.strategy=auto")
    _environment_from_slurm()
    # neither torchrun nor Slurm: one process on its own, which needs no rendezvous server
    standalone = "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if not dist.is_initialized():  # a multirun under torchrun reuses the group across jobs
        backend, timeout = "nccl" if use_cuda else "gloo", datetime.timedelta(minutes=30)
        if standalone:
            # an in-process store instead of the TCP store env:// starts (which listens on
            # every interface), and gloo's own socket on the loopback interface
            loopback = _loopback_interface()
            if loopback:
                os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            dist.init_process_group(backend, timeout=timeout)
    return Dist(dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size())


def _loopback_interface() -> str | None:
    """The loopback interface's name (lo on Linux, lo0 on macOS), if there is one."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((name for name in ("lo", "lo0") if name in names), None)


def _environment_from_slurm() -> None:
    """Slurm tasks (srun, submitit with tasks_per_node>1): derive torchrun's variables."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
        try:
            first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30, check=True).stdout.split()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            first = nodes.split(",")[0]
        os.environ["MASTER_ADDR"] = first
    # the same port on every task of a job, different between jobs
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_reduce_sum(tensor, dist_info: Dist):
    """Sum a tensor over ranks in place (a no-op for one process)."""
    if dist_info.enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor, dist_info: Dist):
    if dist_info.enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def gather_objects(value, dist_info: Dist) -> list:
    if not dist_info.enabled:
        return [value]
    import torch.distributed as dist

    gathered = [None] * dist_info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value, dist_info: Dist):
    """Rank 0's value on every rank."""
    if not dist_info.enabled:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(dist_info: Dist) -> None:
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()
