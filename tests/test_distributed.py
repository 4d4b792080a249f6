"""Several processes, one model: torchrun with gloo on the CPU, the SLURM launcher config, and the
sharding that makes N processes see exactly what one process sees."""

import os
import signal
import time

import pytest
import torch
from conftest import Runner, assert_ok, assert_one_error, metrics_of, write_image_folder
from hydra import compose, initialize_config_module

from resnet_train.data import Augment, BatchTransform, MemoryLoader, Shard
from resnet_train.world import World, from_environment, master_address

# A frozen backbone keeps BatchNorm in eval mode, so one process and two must agree up to float
# rounding (with BatchNorm training, each process normalizes its half batch: model.sync_bn=true
# makes that global, on GPUs).
RUN = ["model=resnet20", "model.freeze=backbone", "precision=fp32", "epochs=2", "batch_size=64", "optim.lr=0.01",
       "dataset.val_size=100", "num_workers=0", "tensorboard.images=false"]
TOLERANCE = 1e-4  # max absolute difference of any weight after 2 epochs (measured: ~7e-6)


def torchrun(runner: Runner, *args: str):
    return runner("torchrun", "--standalone", "--nproc_per_node=2", "-m", "resnet_train", *args, timeout=300)


def test_environment_gives_the_ranks():
    assert from_environment({}) == World()
    assert from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == World(3, 4, 1, "torchrun", 4)
    assert from_environment({"WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"}) == \
        World(9, 16, 1, "torchrun", 8)
    slurm = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
             "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}
    assert from_environment(slurm) == World(5, 8, 1, "slurm", 4)
    assert from_environment({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) == World()  # a batch script, not srun
    assert master_address(slurm) == ("gpu07", str(20000 + 123456 % 20000))
    assert master_address({"SLURM_JOB_NODELIST": "a1,b2"})[0] == "a1"


def test_two_shards_see_exactly_what_one_process_sees():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.arange(40)
    transform = BatchTransform((0.5,) * 3, (0.25,) * 3, Augment())
    one = MemoryLoader(images, labels, 8, transform, train=True, seed=3)
    shards = [MemoryLoader(images, labels, 4, transform, train=True, seed=3, shard=Shard(r, 2)) for r in (0, 1)]
    for loader in (one, *shards):
        loader.set_epoch(2)
    for (x, y), (x0, y0), (x1, y1) in zip(one, *shards):
        assert torch.equal(torch.cat([y0, y1]), y) and torch.equal(torch.cat([x0, x1]), x)
    evals = [MemoryLoader(images, labels, 3, transform, train=False, shard=Shard(r, 2)) for r in (0, 1)]
    seen = sorted(int(v) for loader in evals for _, y in loader for v in y)
    assert seen == list(range(40))  # every image exactly once


@pytest.fixture(scope="module")
def runs(cifar_root, module_tmp):
    user = Runner(module_tmp / "ddp")
    (user.cwd / "data").symlink_to(cifar_root)
    assert_ok(user("resnet-train", *RUN, "hydra.run.dir=single"))
    ddp = torchrun(user, *RUN)
    assert_ok(ddp)
    return user, ddp


def test_torchrun_writes_one_run_and_matches_one_process(runs):
    user, ddp = runs
    run_dirs = [p.parent for p in (user.cwd / "outputs").glob("*/*/.hydra")]
    assert len(run_dirs) == 1 and (run_dirs[0] / "checkpoints" / "best.pt").is_file()  # one run dir, rank 0's
    assert len(list(run_dirs[0].glob("events.out.tfevents.*"))) == 1
    assert "2 processes (DistributedDataParallel), global batch 64" in ddp.stdout
    assert ddp.stdout.count("Done in") == 1  # only the first process reports
    assert "destroy_process_group" not in ddp.stderr  # each process left the group at the end

    single = torch.load(user.cwd / "single" / "checkpoints" / "last.pt", weights_only=True)
    multi = torch.load(run_dirs[0] / "checkpoints" / "last.pt", weights_only=True)
    assert single["state"]["global_step"] == multi["state"]["global_step"] == 2 * (900 // 64)
    diff = max((single["model"][k].float() - multi["model"][k].float()).abs().max().item() for k in single["model"])
    assert diff < TOLERANCE
    assert len(multi["rng"]) == 2  # each process's own generator states

    m1, m2 = metrics_of(user.cwd / "single"), metrics_of(run_dirs[0])
    assert m2["test_images"] == m1["test_images"] == 500  # the test split, each image once
    assert [r["val_images"] for r in m2["history"]] == [100, 100] and m2["history"][0]["train_images"] == 896
    assert m2["test_accuracy"] == pytest.approx(m1["test_accuracy"], abs=0.005)
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-4)


def test_torchrun_resumes(runs):
    user, _ = runs
    run_dir = next((user.cwd / "outputs").glob("*/*/.hydra")).parent
    result = torchrun(user, f"resume={run_dir.relative_to(user.cwd)}", "epochs=3")
    assert_ok(result)
    assert "Resuming from" in result.stdout
    metrics = metrics_of(run_dir)
    assert metrics["epochs"] == 3 and [r["epoch"] for r in metrics["history"]] == [1, 2, 3]


def test_torchrun_time_budget_times_the_distributed_step(runs):
    """epochs=auto under torchrun: the timed steps run under DistributedDataParallel like the run's,
    the first process's choice holds for all, and the run fits."""
    user, _ = runs
    run = [a for a in RUN if not a.startswith("epochs=")]
    result = torchrun(user, *run, "epochs=auto", "time_budget=15s", "hydra.run.dir=budget")
    assert_ok(result)
    assert result.stdout.count("time_budget=15s:") == 1  # (reported by the first process only)
    chosen = torch.load(user.cwd / "budget" / "checkpoints" / "last.pt", weights_only=True)["config"]["epochs"]
    assert isinstance(chosen, int) and chosen >= 1 and metrics_of(user.cwd / "budget")["epochs"] == chosen


def test_a_mid_epoch_checkpoint_of_two_processes_resumes_in_one(runs):
    """Stopped mid-epoch under torchrun (SIGTERM, which torchrun passes on to its processes; they
    stop together at the next log step), continued by one process: the epoch's statistics still count
    every image once (the checkpoint keeps the global count, not one process's)."""
    user, _ = runs
    proc = user.popen("torchrun", "--standalone", "--nproc_per_node=2", "-m", "resnet_train", *RUN,
                      "log_every_n_steps=1", "hydra.run.dir=halfway",  # (processes agree to stop at a log step)
                      env={"RESNET_TRAIN_PAUSE_AT": "train_step@6"})
    for line in proc.stdout:
        if line.startswith("paused at"):
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    state = torch.load(user.cwd / "halfway" / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert state["epoch"] == 0 and state["epoch_progress"]["step"] >= 6  # a mid-epoch checkpoint
    assert_ok(user("resnet-train", "resume=halfway"))
    resumed, single = metrics_of(user.cwd / "halfway"), metrics_of(user.cwd / "single")
    assert resumed["history"][0]["train_images"] == single["history"][0]["train_images"] == 896
    assert resumed["history"][0]["train_loss"] == pytest.approx(single["history"][0]["train_loss"], rel=1e-3)


def _local_main_first_worker(rank: int, path: str, port: int) -> None:
    import os
    import time

    from resnet_train import distributed, world
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    distributed.init_process_group(world.from_environment())
    with distributed.local_main_first():
        time.sleep(0.5 if rank == 0 else 0)  # the first process is slow: the other must still wait for it
        with open(path, "a") as f:
            f.write(f"{rank}\n")
    distributed.shutdown()


def test_downloads_happen_once_per_machine_before_the_others_read(tmp_path):
    """local_main_first: the first process of a machine finishes (a CIFAR download, ImageNet weights)
    before the others start on the same files."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    order = tmp_path / "order.txt"
    mp.start_processes(_local_main_first_worker, args=(str(order), port), nprocs=2, start_method="forkserver")
    assert order.read_text().split() == ["0", "1"]


def test_global_batch_must_split_evenly(cifar_root, run_cli):
    """Refused before any process group forms or data is read: here as the first of two SLURM tasks."""
    slurm = Runner(run_cli.cwd, SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="0", SLURM_LOCALID="0")
    assert_one_error(slurm("resnet-train", "batch_size=63", f"dataset.root={cifar_root}"),
                     "batch_size=63 (the global batch) does not split evenly over 2 processes")
    assert not (run_cli.cwd / "outputs").exists()


def test_slurm_launcher_submits_one_task_per_gpu(tmp_path, monkeypatch):
    """hydra/launcher=slurm as submitit turns it into an sbatch script (built the way the launcher
    builds its executor; a stand-in srun on PATH, as on a login node): one task per GPU on each
    node, and each task of the step finds its rank in SLURM's variables."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with initialize_config_module(config_module="resnet_train.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2"],
                      return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    queue_keys = set(OmegaConf.structured(BaseQueueConf).keys())  # (an unknown key fails here)
    executor.update_parameters(**{k if k in queue_keys else f"slurm_{k}": v for k, v in launcher.params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python -m resnet_train", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4"):
        assert line in script.splitlines(), script
    assert "\nsrun " in script  # every task is started by srun: a step of 8 tasks
    step = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_STEP_NODELIST": "gpu[1-2]"}
    assert from_environment(step) == World(6, 8, 2, "slurm", 8)  # (no SLURM_STEP_TASKS_PER_NODE: all here)


def test_processes_of_a_run_agree_where_an_image_folder_lives(tmp_path):
    """loader=auto decides on each machine's free memory; if one process must stream, all do (the
    loaders shuffle from different generators, and every process slices the same global batches)."""
    hook = tmp_path / "rank1_is_short_of_memory.py"
    hook.write_text("import os\n"
                    "if os.environ.get('RANK') == '1':\n"
                    "    from resnet_train.data import storage\n"
                    "    storage.host_available_bytes = lambda: 1024\n")
    user = Runner(tmp_path / "work", RESNET_TRAIN_TEST_HOOK=str(hook))
    write_image_folder(user.cwd / "pets", {"train": 64, "test": 16}, num_classes=2)
    result = torchrun(user, "model=resnet20", "dataset=image_folder", "dataset.root=pets", "epochs=1", "batch_size=16",
                      "num_workers=0", "tensorboard.images=false", "dataset.val_size=0")
    assert_ok(result)
    assert "streamed, as another process of the run must" in result.stdout
    assert "64 training images in stream" in result.stdout


def test_fewer_validation_images_than_processes(cifar_root, tmp_path):
    """One validation image for two processes: the second has none to evaluate. Validation runs each
    process's shard without DistributedDataParallel's per-batch collective (which would wait for a
    batch the second never has), with the first process's BatchNorm statistics on both."""
    user = Runner(tmp_path)
    (user.cwd / "data").symlink_to(cifar_root)
    result = torchrun(user, "model=resnet20", "dataset.root=data", "dataset.val_size=1", "epochs=1",
                      "batch_size=64", "tensorboard.images=false", "hydra.run.dir=run")
    assert_ok(result)
    assert [r["val_images"] for r in metrics_of(user.cwd / "run")["history"]] == [1]


def test_the_resume_command_after_a_stop_is_the_one_that_started_the_run(tmp_path):
    from pathlib import Path

    from resnet_train.commands.train import _resume_command
    run = Path("outputs/r")
    assert _resume_command(run, World()) == "resnet-train resume=outputs/r"
    assert _resume_command(run, World(1, 2, 1, "torchrun", 2)) == "torchrun --nproc_per_node=2 -m resnet_train resume=outputs/r"
    two_nodes = _resume_command(run, World(1, 2, 0, "torchrun", 1))  # (used to say --nproc_per_node=2)
    assert two_nodes.startswith("torchrun --nnodes=2 --nproc_per_node=1 ") and "each of the 2 machines" in two_nodes
    assert "resume=outputs/r" in _resume_command(run, World(3, 8, 1, "slurm", 4))


def test_torchrun_restarts_a_killed_process_and_the_run_ends_as_if_never_stopped(runs, tmp_path):
    """torchrun --max-restarts reruns the same command: with resume=auto the restarted processes
    continue from last.pt (written every 4 steps) after one of them was SIGKILLed at step 10, and
    the weights end bitwise equal to the uninterrupted 2-process run's."""
    user, _ = runs
    pid_file, hook = tmp_path / "rank1.pid", tmp_path / "first_attempt_rank1_waits.py"
    hook.write_text("import os\n"
                    "if os.environ.get('TORCHELASTIC_RESTART_COUNT') == '0' and os.environ.get('RANK') == '1':\n"
                    "    os.environ['RESNET_TRAIN_PAUSE_AT'] = 'train_step@10'\n"
                    f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n")
    proc = user.popen("torchrun", "--standalone", "--nproc_per_node=2", "--max-restarts=1", "-m", "resnet_train",
                      *RUN, "checkpoint.every_n_steps=4", "hydra.run.dir=restarted", "resume=auto",
                      env={"RESNET_TRAIN_TEST_HOOK": str(hook)})
    for line in proc.stdout:
        if line.startswith("paused at"):
            break
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert "part-way through epoch 1/2, step 8" in output
    # (what process 0 of the first attempt says races with torchrun stopping it: the hung-process test checks it)
    assert_ok(torchrun(user, *RUN, "checkpoint.every_n_steps=4", "hydra.run.dir=uninterrupted"))
    reference = user.cwd / "uninterrupted" / "checkpoints" / "last.pt"
    ours = torch.load(user.cwd / "restarted" / "checkpoints" / "last.pt", weights_only=True)["model"]
    theirs = torch.load(reference, weights_only=True)["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_hung_process_ends_the_run_within_the_collective_timeout(runs, tmp_path):
    """Process 1 stops answering after step 3 (paused, not dead): process 0 gives up after
    collective_timeout with one line that says what was saved and how to continue."""
    user, _ = runs
    hook = tmp_path / "rank1_hangs.py"
    hook.write_text("import os\n"
                    "if os.environ.get('RANK') == '1':\n"
                    "    os.environ['RESNET_TRAIN_PAUSE_AT'] = 'train_step@6'\n")
    result = Runner(user.cwd, RESNET_TRAIN_TEST_HOOK=str(hook)).installed(
        "torchrun", "--standalone", "--nproc_per_node=2", "-m", "resnet_train", *RUN, "checkpoint.every_n_steps=4",
        "collective_timeout=45s", "hydra.run.dir=hung", timeout=240)  # (it bounds the waits at the start too:
    assert result.returncode != 0                                      # 20s failed once with both test workers busy)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: process 0 of 2")]
    assert lines, result.stdout[-2000:] + result.stderr[-3000:]
    line = lines[0]
    assert "stopped answering" in line and "the last checkpoint is hung/checkpoints/last.pt" in line
    assert "continue with: torchrun --nproc_per_node=2 -m resnet_train resume=hung" in line
    assert "[rank0]: Traceback" not in result.stderr  # (torchrun's own report of the failed process has one)


def test_submitit_local_tasks_form_one_run_and_a_failed_task_fails_the_job(tmp_path):
    """hydra/launcher=submitit_local with 2 tasks: the tasks read their ranks from submitit's
    variables and train one model together; when one crashes, the other says so and the sweep
    counts the job failed (the launcher reports only the first task's result)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    hook = tmp_path / "task1_crashes.py"
    hook.write_text("import os\n"
                    "if os.environ.get('SUBMITIT_LOCAL_GLOBALID') == '1' and os.environ.get('CRASH') == '1':\n"
                    "    from resnet_train import pause\n"
                    "    pause.point = lambda name: os._exit(3) if name == 'train_step' else None\n")
    user = Runner(tmp_path / "work", RESNET_TRAIN_TEST_HOOK=str(hook))
    write_image_folder(user.cwd / "pets", {"train": 64, "test": 16}, num_classes=2)
    job = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=5",
           "model=resnet20", "dataset=image_folder", "dataset.root=pets", "epochs=1", "batch_size=16", "num_workers=0",
           "tensorboard.images=false", "dataset.val_size=0"]
    assert_ok(user("resnet-train", *job, "hydra.sweep.dir=together", timeout=300))
    logs = "".join(p.read_text() for p in (user.cwd / "together").glob(".submitit/*/*_0_log.out"))
    assert "2 processes (DistributedDataParallel), global batch 16" in logs and "Done in" in logs
    crashed = Runner(user.cwd, RESNET_TRAIN_TEST_HOOK=str(hook), CRASH="1")
    result = crashed("resnet-train", *job, "hydra.sweep.dir=crashed", timeout=300)
    assert result.returncode == 2 and "1 of 1 sweep jobs failed" in result.stderr
    assert "failed" in (user.cwd / "crashed" / "summary.csv").read_text()


def test_two_machines_without_a_shared_disk(cifar_root, tmp_path):
    """Two torchrun "nodes" in working directories of their own: the first node's process reads
    and writes every run file (the other receives the resumed checkpoint and the best weights over
    the process group), so the run -- and its resume -- lives in one run dir on the first node."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    nodes = [Runner(tmp_path / f"node{k}") for k in (0, 1)]
    for node in nodes:
        (node.cwd / "data").symlink_to(cifar_root)

    def both(*args: str) -> list[str]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [node.popen("torchrun", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={k}",
                            "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "resnet_train", *RUN, *args)
                 for k, node in enumerate(nodes)]
        with ThreadPoolExecutor(2) as pool:
            outputs = [out for out, _ in pool.map(lambda p: p.communicate(timeout=300), procs)]
        for proc, output in zip(procs, outputs):
            assert proc.returncode == 0, output
        return outputs

    first = both("epochs=1")
    run_dirs = [p.parent for p in (nodes[0].cwd / "outputs").glob("*/*/checkpoints")]
    assert len(run_dirs) == 1 and "2 processes (DistributedDataParallel)" in first[0]
    assert not (nodes[1].cwd / "outputs").exists() and sorted(p.name for p in nodes[1].cwd.iterdir()) == ["data"]
    assert metrics_of(run_dirs[0])["test_images"] == 500
    both(f"resume={run_dirs[0].relative_to(nodes[0].cwd)}", "epochs=2")  # (that path exists on the first node only)
    assert [r["epoch"] for r in metrics_of(run_dirs[0])["history"]] == [1, 2]
    assert sorted(p.name for p in nodes[1].cwd.iterdir()) == ["data"]


def test_a_preempted_submitit_job_is_requeued_and_continues_its_run(tmp_path):
    """USR2 (what SLURM and submitit send before a time limit or on preemption) mid-epoch: the run
    saves last.pt at the next step, submitit requeues the job, and the requeued job continues the
    run, ending bitwise equal to an uninterrupted one."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    pid_file = tmp_path / "task0.pid"
    hook = tmp_path / "first_attempt_waits.py"
    hook.write_text("import os\n"
                    f"if os.environ.get('SUBMITIT_LOCAL_GLOBALID') == '0' and not os.path.exists({str(pid_file)!r}):\n"
                    "    os.environ.update(RESNET_TRAIN_PAUSE_AT='train_step@5', RESNET_TRAIN_PAUSE_SECONDS='120')\n"
                    f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n")
    user = Runner(tmp_path / "work", RESNET_TRAIN_TEST_HOOK=str(hook))
    write_image_folder(user.cwd / "pets", {"train": 64, "test": 16}, num_classes=2)
    run = ["model=resnet20", "dataset=image_folder", "dataset.root=pets", "epochs=2", "batch_size=16",
           "num_workers=0", "tensorboard.images=false", "dataset.val_size=0", "log_every_n_steps=1"]
    sweep = user.popen("resnet-train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                       "hydra.sweep.dir=preempted", *run)
    deadline = time.time() + 240
    while not any("paused at" in p.read_text() for p in (user.cwd / "preempted").glob(".submitit/*/*_0_log.err")):
        assert time.time() < deadline and sweep.poll() is None, "the job never reached step 5"
        time.sleep(0.2)
    os.kill(int(pid_file.read_text()), signal.SIGUSR2)
    output, _ = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, output
    logs = "".join(p.read_text() for p in (user.cwd / "preempted").glob(".submitit/*/*_0_log.out"))
    assert "Stopped by SIGUSR2 at epoch 2, step 5" in logs and "part-way through epoch 2/2, step 5" in logs
    job = next((user.cwd / "preempted").glob("*/checkpoints")).parent
    assert_ok(Runner(user.cwd)("resnet-train", *run, "hydra.run.dir=uninterrupted"))
    ours = torch.load(job / "checkpoints" / "last.pt", weights_only=True)["model"]
    theirs = torch.load(user.cwd / "uninterrupted" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
