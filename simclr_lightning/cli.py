"""The ``simclr-lightning`` command: pretrain, finetune, prepare, evaluate, demo, configs."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from jsonargparse import lazy_instance
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from simclr_lightning.loggers import WandbRunLogger, run_dir_of

logger = logging.getLogger(__name__)

COMMANDS = {
    "pretrain": "SimCLR pretraining (LightningCLI: fit/validate/test/predict)",
    "finetune": "fine-tuning or linear evaluation from a checkpoint (LightningCLI)",
    "prepare": "decode, crop and resize every image once into a memory-mapped cache",
    "evaluate": "run the evaluation protocol and write a report folder",
    "demo": "pretrain and probe on the bundled LFW faces in a few minutes on a CPU",
    "configs": "list the YAML configs shipped with the package",
}


def shipped_configs() -> dict[str, Path]:
    """Map each shipped config's name (without .yaml) to its path inside the package."""
    folder = resources.files("simclr_lightning") / "configs"
    return {
        Path(entry.name).stem: Path(str(entry))
        for entry in folder.iterdir()
        if entry.name.endswith(".yaml")
    }


def resolve_config_arguments(argv: Sequence[str]) -> list[str]:
    """Replace ``--config NAME`` by the shipped config's path when NAME is not a file.

    ``--config pretrain_faces`` and ``--config pretrain_faces.yaml`` both find the config
    shipped inside the package, so the commands work from any folder.
    """
    configs = shipped_configs()
    resolved: list[str] = []
    expect_value = False
    for argument in argv:
        if expect_value:
            resolved.append(_resolve_config(argument, configs))
            expect_value = False
        elif argument == "--config":
            resolved.append(argument)
            expect_value = True
        elif argument.startswith("--config="):
            resolved.append("--config=" + _resolve_config(argument.split("=", 1)[1], configs))
        else:
            resolved.append(argument)
    return resolved


def _resolve_config(value: str, configs: dict[str, Path]) -> str:
    if Path(value).exists():
        return value
    name = Path(value).name.removesuffix(".yaml")
    if name in configs:
        return str(configs[name])
    raise SystemExit(
        f"Config {value!r} is neither a file nor a shipped config. "
        f"Shipped configs: {', '.join(sorted(configs))}."
    )


class RunFolderSaveConfig(SaveConfigCallback):
    """Save the resolved config and the data report into the run's own folder.

    Each W&B run has its own folder (``save_dir/project/RUN_ID``), so a second run started in
    the same working folder never collides with the first.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            run_dir = run_dir_of(trainer)
            run_dir.mkdir(parents=True, exist_ok=True)
            self.parser.save(
                self.config, run_dir / self.config_filename, skip_none=False, overwrite=True
            )
            _save_data_report(getattr(trainer, "datamodule", None), run_dir)
            if isinstance(trainer.logger, WandbRunLogger):
                trainer.logger.announce()
            logger.info("Resolved config saved to %s", run_dir / self.config_filename)
        self.already_saved = bool(trainer.strategy.broadcast(True))


def _save_data_report(datamodule: LightningDataModule | None, run_dir: Path) -> None:
    report = getattr(datamodule, "report", None)
    if report is None:
        return
    if hasattr(report, "to_markdown"):
        (run_dir / "data_report.md").write_text(report.to_markdown())
    if hasattr(report, "to_dict"):
        (run_dir / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2))


class SimCLRLightningCLI(LightningCLI):
    """LightningCLI with a configurable ``checkpoint`` group that every run keeps.

    The checkpoint callback lives outside ``trainer.callbacks``, so a config that lists its own
    callbacks never drops it. Its defaults keep ``last.ckpt``, and for fine-tuning also the
    checkpoint with the best validation balanced accuracy.
    """

    checkpoint_monitor: str | None = None
    command = "pretrain"
    #: What to do with a checkpoint of the other command, shown in the ``--ckpt_path`` error.
    other_kind_hint = (
        "pass a checkpoint written by `simclr-lightning pretrain fit`; a fine-tuned model is "
        "restored by `simclr-lightning finetune` instead."
    )

    def _parse_ckpt_path(self) -> None:
        """Check that ``--ckpt_path`` contains this command's module before LightningCLI reads it.

        LightningCLI applies a checkpoint's hyperparameters to the model config, and a
        checkpoint of the other module fails there with a bare parser error. This overrides a
        private LightningCLI method (Lightning 2.6), which the CLI tests exercise.

        Raises:
            ValueError: If the path is a folder or not a PyTorch checkpoint, or if the
                checkpoint is one of the other module.
        """
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        model_class = self.model_class
        if path and isinstance(model_class, type):
            self._check_checkpoint_kind(Path(path), model_class)
        super()._parse_ckpt_path()

    def _check_checkpoint_kind(self, path: Path, model_class: type) -> None:
        if path.is_dir():
            raise ValueError(f"--ckpt_path {path} is a folder. Pass the .ckpt file in it.")
        if not path.is_file():
            return  # Lightning reports the missing file.
        import torch

        try:
            # The same read as LightningCLI's own, which follows.
            checkpoint = torch.load(path, weights_only=True, map_location="cpu")
        # On bytes that are not a pickle, the weights-only unpickler raises many exception
        # types (UnpicklingError, EOFError, KeyError, IndexError and more).
        except Exception as error:
            raise ValueError(
                f"--ckpt_path {path} is not a PyTorch checkpoint ({type(error).__name__}: "
                f"{error}). Pass a .ckpt file from a run's checkpoints/ folder."
            ) from error
        if not isinstance(checkpoint, dict):
            raise ValueError(f"--ckpt_path {path} is not a Lightning checkpoint dict.")
        hparams = checkpoint.get("hyper_parameters") or {}
        accepted = set(inspect.signature(model_class).parameters)
        foreign = sorted(set(hparams) - accepted - {"_instantiator", "_class_path"})
        state_keys = checkpoint.get("state_dict") or {}
        # Without hyperparameters the weights show the module, because only SimCLRModule has a
        # projection head and only FineTuneModule a classifier.
        other_prefix = "projection_head." if self.command == "finetune" else "classifier."
        foreign_weights = [key for key in state_keys if str(key).startswith(other_prefix)]
        if not foreign and not foreign_weights:
            return
        reason = (
            f"its hyperparameters {', '.join(repr(name) for name in foreign[:3])} are not "
            f"arguments of {model_class.__name__}"
            if foreign
            else f"it has {other_prefix}* weights, which {model_class.__name__} does not have"
        )
        raise ValueError(
            f"--ckpt_path {path} is not a {model_class.__name__} checkpoint: {reason}, and "
            f"`simclr-lightning {self.command}` restores {model_class.__name__} checkpoints "
            "only. To go on, " + self.other_kind_hint
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        defaults: dict[str, Any] = {"checkpoint.save_last": True}
        if self.checkpoint_monitor:
            defaults.update(
                {
                    "checkpoint.monitor": self.checkpoint_monitor,
                    "checkpoint.mode": "max",
                    "checkpoint.save_top_k": 1,
                }
            )
        parser.set_defaults(defaults)


class FineTuneLightningCLI(SimCLRLightningCLI):
    """The fine-tuning CLI: keeps the checkpoint of the best validation balanced accuracy."""

    checkpoint_monitor = "val/balanced_accuracy"
    command = "finetune"
    other_kind_hint = (
        "pass a checkpoint written by `simclr-lightning finetune fit`; to fine-tune from a "
        "SimCLR pretraining checkpoint, pass it as --model.checkpoint_path instead."
    )


def run_lightning_cli(command: str, argv: Sequence[str], run: bool = True) -> LightningCLI:
    """Run the LightningCLI of ``pretrain`` or ``finetune`` with ``argv`` after the command.

    With ``run=False``, ``argv`` has no subcommand and the CLI only builds the model, the
    datamodule and the trainer, which tests and notebooks can then use.
    """
    from simclr_lightning.models.finetune import FineTuneModule
    from simclr_lightning.models.simclr import SimCLRModule

    model_class: type[LightningModule] = SimCLRModule
    cli_class: type[SimCLRLightningCLI] = SimCLRLightningCLI
    if command == "finetune":
        model_class, cli_class = FineTuneModule, FineTuneLightningCLI
    # LightningCLI warns when sys.argv contains arguments besides ``args``. The console script
    # passes them as ``args``, so the warning only repeats the command line. sys.argv itself
    # must stay, because DDP starts the other ranks by re-running it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return _build_cli(cli_class, model_class, command, argv, run)


def _build_cli(
    cli_class: type[SimCLRLightningCLI],
    model_class: type[LightningModule],
    command: str,
    argv: Sequence[str],
    run: bool,
) -> LightningCLI:
    return cli_class(
        model_class,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_callback=RunFolderSaveConfig,
        trainer_defaults={"logger": lazy_instance(WandbRunLogger, job_type=command)},
        args=resolve_config_arguments(argv),
        parser_kwargs={"prog": f"simclr-lightning {command}"},
        run=run,
    )


def _close_run(trainer: Trainer) -> None:
    """Finish the W&B run, so a later run in the same process gets a run and folder of its own."""
    run_logger = trainer.logger
    if isinstance(run_logger, WandbRunLogger) and trainer.is_global_zero:
        logger.info("Run folder: %s", run_logger.run_dir)
        run_logger.experiment.finish()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simclr-lightning",
        description="SimCLR self-supervised learning on faces with PyTorch Lightning.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<10} {text}" for name, text in COMMANDS.items())
        + "\n\nRun 'simclr-lightning COMMAND --help' for the options of a command.",
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    parser.add_argument("arguments", nargs=argparse.REMAINDER)
    return parser


def configure_logging() -> None:
    """Send the library's INFO logs to standard error, once."""
    root = logging.getLogger("simclr_lightning")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


DEBUG_VARIABLE = "SIMCLR_LIGHTNING_DEBUG"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``simclr-lightning`` console script.

    A bad dataset folder, value or checkpoint ends the command with one error line and exit
    status 2. Set ``SIMCLR_LIGHTNING_DEBUG=1`` to get the full traceback instead.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    parsed = _build_parser().parse_args(arguments[:1])
    rest = arguments[1:]
    configure_logging()
    try:
        return _run_command(parsed.command, rest)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        logger.error("simclr-lightning %s failed: %s", parsed.command, error)
        logger.error("Set %s=1 to see the traceback.", DEBUG_VARIABLE)
        return 2


def _run_command(command: str, rest: list[str]) -> int:
    """Run one command with the arguments after its name and return the exit status."""
    if command in ("pretrain", "finetune"):
        cli = run_lightning_cli(command, rest)
        _close_run(cli.trainer)
        return 0
    if command == "configs":
        listing = "".join(
            f"{name:<22} {path}\n" for name, path in sorted(shipped_configs().items())
        )
        sys.stdout.write(listing)
        return 0
    if command == "prepare":
        from simclr_lightning.data.cache import prepare_main

        return prepare_main(rest)
    if command == "evaluate":
        from simclr_lightning.evaluation.protocol import evaluate_main

        return evaluate_main(rest)
    from simclr_lightning.demo import demo_main

    return demo_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
