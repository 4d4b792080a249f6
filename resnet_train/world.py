"""Who this process is among the processes that train one model: its rank, how many there are, and
its index on its machine, as torchrun or SLURM tell it through the environment.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK. SLURM (e.g. Hydra's submitit launcher, which starts
one task per GPU with srun) sets SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID and the node
list; submitit's local executor its SUBMITIT_LOCAL_* variables. Without any we are a single
process. No torch here: the command line reads this before anything heavy is imported
(`distributed.py` joins the process group).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = ""  # what started the processes: torchrun or slurm ("" for a single process)
    local_world_size: int = 1  # processes on this machine (each holds its own copy of in-memory data)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment(env: dict[str, str] | None = None) -> World:
    env = dict(os.environ if env is None else env)
    if int(env.get("WORLD_SIZE", "1")) > 1:  # torchrun
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")), "torchrun",
                     int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))
    if env.get("SUBMITIT_EXECUTOR") == "local" and int(env.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1:
        # submitit's local executor (hydra/launcher=submitit_local): its LocalJobEnvironment's variables
        tasks = int(env["SUBMITIT_LOCAL_NTASKS"])
        return World(int(env["SUBMITIT_LOCAL_GLOBALID"]), tasks, int(env.get("SUBMITIT_LOCAL_LOCALID", "0")),
                     "submitit", tasks)
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:  # tasks of one srun step (submitit uses srun)
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", "0")),
                     "slurm", _slurm_tasks_here(env))
    return World()


def _slurm_tasks_here(env: dict[str, str]) -> int:
    """Tasks of the step on this node: SLURM_STEP_TASKS_PER_NODE reads like "4(x2)" or "4,3" (the
    first node's count; nodes of one GPU job usually match)."""
    match = re.match(r"(\d+)", env.get("SLURM_STEP_TASKS_PER_NODE", ""))
    return int(match.group(1)) if match else int(env["SLURM_STEP_NUM_TASKS"])


def master_address(env: dict[str, str]) -> tuple[str, str]:
    """MASTER_ADDR / MASTER_PORT for a SLURM step or a submitit local job: the first node of the
    step (or this machine), a port from the job id (so two jobs on one node do not meet)."""
    job = env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID", "0")
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
    first = nodes.split(",")[0]
    match = re.match(r"([^\[]+)\[(\d+)", first)  # node[003-010,012] -> node003
    host = match.group(1) + match.group(2) if match else first
    return host, str(20000 + int(re.sub(r"\D", "", job) or 0) % 20000)
