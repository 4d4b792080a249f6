"""The console scripts: argv -> a command; every failure a user can cause -> one `error:` line.

    resnet-train    commands/train.py     (also `python -m resnet_train`, and under torchrun)
    resnet-eval     commands/eval.py
    resnet-predict  commands/predict.py
    resnet-export   commands/export.py
    resnet-summary  commands/summary.py
    resnet-shards   commands/shards.py    (an image folder -> WebDataset shards)

`run_command` is the one place errors become exit codes, for every command: a `UserError` or a
Hydra composition error prints `error: <one line>` and exits 2, Ctrl-C outside training exits 130.
Inside a sweep the job's error is logged and re-raised, so Hydra fails that job and runs the
others. torch is imported by the commands, not here: `--help` and config errors answer at once.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import runs, sweep, world  # sweep registers the job-name resolver train.yaml uses
from .composing import hydra_error
from .config import (CONFIG_GROUPS, CONFIG_MODULE, EVAL_KEYS, EXPORT_KEYS, KEYS, LIST_GROUPS, PATTERN_KEYS,
                     PREDICT_KEYS, Key, duration_seconds, override_key)
from .errors import ConfigError, Refused, UserError, is_out_of_memory
from .files import STORAGE_ERRNOS, storage_error

CONFIG_PATH = f"pkg://{CONFIG_MODULE}"
# time_budget counts from here: the command's own start, imports included. (A command run again in
# the same process -- the tests' in-process runner -- sets it anew.)
STARTED = time.time()
log = logging.getLogger("resnet_train")


def run_command(command: Callable[[], Any], program: str = "resnet-train", keys: dict[str, Key] = KEYS,
                hydra_args: bool = True) -> Any:
    """Run a console script's body, turning user errors into one line and exit status 2 (an unknown
    key is named against `program`'s `keys`; `hydra_args=False`: a command with options of its own)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its own several-line report
    logging.raiseExceptions = False  # a log line that cannot be written (full disk) is dropped, not a traceback
    runs.forget_claims()
    try:
        if hydra_args:
            _check_command_line(sys.argv[1:], program)
        return command()
    except Refused as refused:
        _exit(str(refused.error), refused.error.exit_code)
    except UserError as e:
        prefix = "a sweep job failed: " if sweep.swept_keys() else ""  # (under Optuna: past max_failure_rate)
        _exit(f"{prefix}{e}", e.exit_code)
    except (HydraException, OmegaConfBaseException) as e:
        _exit(str(hydra_error(e, program, keys)), 2)
    except KeyboardInterrupt:
        _exit("interrupted", 130)
    except ValueError as e:  # (not a UserError: those are caught above)
        line = sweep.all_trials_failed(e)
        if line is None:
            raise
        _exit(line, 2)
    except OSError as e:  # a full disk or read-only folder met outside our own writes (Hydra's, TensorBoard's)
        if e.errno not in STORAGE_ERRNOS:
            raise
        _exit(str(storage_error(Path(e.filename or "a file"), e)), 2)


def _check_command_line(args: list[str], program: str) -> None:
    """Mistakes Hydra would answer with its usage text, or not at all: an unknown option, and a list
    of a config group's choices without -m (Hydra merges them all: the last one wins) -- except
    for the groups that take several at once (logger=[tensorboard,mlflow])."""
    from hydra._internal.utils import get_args_parser

    unknown = [a for a in get_args_parser().parse_known_args(args)[1] if a.startswith("-")]
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]}: {program} takes KEY=VALUE overrides and Hydra's options "
                          f"(-m, --cfg job, --info, ...); `{program} --help` lists them")
    if {"-m", "--multirun"} & set(args):
        return
    for arg in args:
        key, _, value = arg.partition("=")
        group = key.lstrip("+~")
        if group in CONFIG_GROUPS and group not in LIST_GROUPS and value.startswith("[") and value.endswith("]"):
            raise ConfigError(f"{arg}: one run takes one {key}; to run each, sweep them with -m: "
                              f"{program} -m {key}={value[1:-1]}")


def _exit(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def as_job(fn: Callable[..., Any], cfg: DictConfig, *args: Any) -> Any:
    """A command's body inside Hydra: running out of device memory becomes a user error (it fails
    this job of a sweep, not the sweep). A sweep job's user error goes to its log and on to Hydra,
    which records the job as failed; a single run's passes Hydra by (`Refused`) to run_command."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        try:
            return fn(cfg, *args)
        except OmegaConfBaseException as e:  # a config it cannot read: one line, not Hydra's job report
            raise hydra_error(e) from None
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            raise _out_of_memory(cfg) from None
    except UserError as e:
        if not sweep.in_sweep():
            raise Refused(e) from None
        log.error(f"error: {e}")
        raise
    except SystemExit as e:  # a sweep job stopped by a signal (saved): the sweep ends with what ran summarized
        if sweep.in_sweep() and e.code in (130, 143, 140) and world.from_environment().is_main:
            sweep.record_stopped_job(int(e.code) - 128)
        raise
    except BrokenPipeError:  # the output went to `head` or a closed pager: stop quietly, as shell tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None


def _out_of_memory(cfg: DictConfig) -> UserError:
    from .commands.train import out_of_memory_error

    return out_of_memory_error(cfg)


# --------------------------------------------------------------------------------------------
# resnet-train
# --------------------------------------------------------------------------------------------


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train_app(cfg: DictConfig) -> float | None:
    from .commands.train import train

    hydra_cfg = HydraConfig.get()
    metrics = as_job(train, cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task),
                     None if sweep.swept_keys() else STARTED)
    return metrics["best_val_accuracy"]  # what a Hydra sweeper (e.g. Optuna) maximizes


def train_main() -> None:
    """The `resnet-train` console script (also under torchrun: one process per GPU)."""
    run_command(lambda: _train_command(sys.argv[1:]))


def quote_patterns(args: list[str]) -> list[str]:
    """Shard patterns as users type them (`dataset.train=shards/train-{000000..000099}.tar`) quoted for
    Hydra, whose grammar reads an unquoted `{` as the start of a dict."""
    quoted = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and override_key(key) in PATTERN_KEYS and "{" in value and value[:1] not in ("'", '"'):
            arg = f"{key}='{value}'"
        quoted.append(arg)
    return quoted


def _train_command(args: list[str]) -> None:
    args = quote_patterns(args)
    this = world.from_environment()
    if this.launcher == "torchrun":  # agree on one run dir before Hydra makes one (SLURM's jobs have theirs)
        from . import distributed

        # Only the first process reads and writes the run dir: the others (on other machines, maybe
        # without a shared disk) take its decisions and a scratch dir of their own.
        distributed.init_process_group(this, _collective_timeout(args))
        args = distributed.decided_by_main(lambda: runs.resume_arguments(args))
        stamp = distributed.decided_by_main(lambda: runs.free_stamp(time.strftime("%Y-%m-%d/%H-%M-%S")))
        args = runs.distributed_arguments(args, this.is_main, stamp)
    else:
        args = runs.resume_arguments(args)
    sys.argv[1:] = args
    _train_app()


def _collective_timeout(args: list[str]) -> float:
    """collective_timeout= as given (torchrun's processes join before Hydra reads the config; a
    value it refuses later is replaced by the default until then)."""
    from .distributed import DEFAULT_TIMEOUT_S

    given = [a.split("=", 1)[1] for a in args if override_key(a) == "collective_timeout"]
    value = given[-1] if given else DEFAULT_TIMEOUT_S
    return duration_seconds(float(value) if re.fullmatch(r"[\d.]+", str(value)) else value) or DEFAULT_TIMEOUT_S


# --------------------------------------------------------------------------------------------
# resnet-eval
# --------------------------------------------------------------------------------------------

# resnet-eval's own keys go to Hydra (eval.yaml); every other KEY=VALUE is an override of the
# checkpoint's training config, checked by composing it onto train.yaml.
_training_overrides: list[str] = []


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _eval_app(cfg: DictConfig) -> None:
    from .commands.eval import evaluate_checkpoint

    as_job(evaluate_checkpoint, cfg, _training_overrides)


def eval_main() -> None:
    """The `resnet-eval` console script."""
    args = sys.argv[1:]
    own = [a for a in args if a.startswith("-") or override_key(a) in EVAL_KEYS or a.startswith(("hydra.", "hydra/"))]
    _training_overrides[:] = quote_patterns([a for a in args if a not in own])
    sys.argv[1:] = own
    run_command(_eval_app, "resnet-eval", EVAL_KEYS)


# --------------------------------------------------------------------------------------------
# resnet-predict
# --------------------------------------------------------------------------------------------


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def _predict_app(cfg: DictConfig) -> None:
    from .commands.predict import predict

    sys.exit(as_job(predict, cfg))


def predict_main() -> None:
    """The `resnet-predict` console script. (`model=FILE` is passed on as model_file=FILE: Hydra
    would take `model=` for the training configs' model group.)"""
    sys.argv[1:] = [f"model_file={a[6:]}" if a.startswith("model=") else a for a in sys.argv[1:]]
    run_command(_predict_app, "resnet-predict", PREDICT_KEYS)


# --------------------------------------------------------------------------------------------
# resnet-export
# --------------------------------------------------------------------------------------------


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def _export_app(cfg: DictConfig) -> None:
    from .commands.export import export_command

    as_job(export_command, cfg)


def export_main() -> None:
    """The `resnet-export` console script."""
    run_command(_export_app, "resnet-export", EXPORT_KEYS)


# --------------------------------------------------------------------------------------------
# resnet-summary
# --------------------------------------------------------------------------------------------

SUMMARY_HELP = """resnet-summary: a per-layer table of a model (output shape, parameters, trainable or frozen,
multiply-accumulates), for a config or a checkpoint.

Usage:
  resnet-summary [KEY=VALUE ...]          any resnet-train keys, e.g. model=resnet50 dataset.image_size=224
  resnet-summary checkpoint=PATH          the model of a trained run (a .pt file or a run dir)

Examples:
  resnet-summary model=resnet20
  resnet-summary model=resnet50 dataset.image_size=224 model.freeze=layer3
"""


def summary_main() -> None:
    """The `resnet-summary` console script."""
    args = sys.argv[1:]
    if {"-h", "--help"} & set(args):
        print(SUMMARY_HELP)
        return

    def command() -> None:
        from .commands.summary import summary_table

        print(summary_table(args))
    run_command(command, "resnet-summary")


# --------------------------------------------------------------------------------------------
# resnet-shards
# --------------------------------------------------------------------------------------------


def shards_main() -> None:
    """The `resnet-shards` console script: an image folder -> WebDataset shards."""
    args = sys.argv[1:]

    def command() -> None:
        from .commands.shards import write_shards_command

        write_shards_command(args)
    run_command(command, "resnet-shards", hydra_args=False)
