"""Tests of the ``simclr-lightning`` command line: configs, LightningCLI runs, run folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint

from simclr_lightning.cli import main, resolve_config_arguments, run_lightning_cli, shipped_configs
from simclr_lightning.loggers import WandbRunLogger
from tests.conftest import UTKFaceTree, write_image

CIFAR_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

EXPECTED_CONFIGS = {
    "pretrain_faces",
    "finetune_race",
    "finetune_gender",
    "cpu_small",
    "multi_gpu",
    "multi_node",
    "cifar10_pretrain",
    "cifar10_linear",
    "gpu_augment",
}

#: Overrides that turn any shipped config into a seconds-long CPU run on the fixtures.
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.image_size=16",
    "--data.batch_size=8",
    "--data.num_workers=0",
    "--data.persistent_workers=false",
]


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)


def test_shipped_configs_present() -> None:
    assert set(shipped_configs()) == EXPECTED_CONFIGS


def test_resolve_config_arguments_finds_shipped() -> None:
    resolved = resolve_config_arguments(
        ["fit", "--config", "cpu_small", "--config=finetune_race.yaml"]
    )
    assert resolved[2] == str(shipped_configs()["cpu_small"])
    assert resolved[3] == "--config=" + str(shipped_configs()["finetune_race"])
    assert resolved[0] == "fit"


def test_resolve_config_arguments_rejects_unknown() -> None:
    with pytest.raises(SystemExit, match="neither a file nor a shipped config"):
        resolve_config_arguments(["--config", "no_such_config"])


def test_shipped_configs_comment_every_file() -> None:
    for name, path in shipped_configs().items():
        first_line = path.read_text().splitlines()[0]
        assert first_line.startswith("# "), name


def _face_roots(utkface_tree: UTKFaceTree) -> list[str]:
    return [f"--data.utkface_root={utkface_tree.root}"]


@pytest.mark.parametrize(
    ("command", "configs", "checks"),
    [
        ("pretrain", ["pretrain_faces"], {"backbone": "resnet50", "temperature": 0.1}),
        ("pretrain", ["pretrain_faces", "cpu_small"], {"backbone": "resnet18"}),
        ("pretrain", ["pretrain_faces", "gpu_augment"], {"gpu_augment": True}),
        ("finetune", ["finetune_race"], {"protocol": "finetune", "class_weights": "balanced"}),
        ("finetune", ["finetune_gender", "cpu_small"], {"backbone": "resnet18"}),
    ],
)
def test_face_configs_instantiate(
    utkface_tree: UTKFaceTree, command: str, configs: list[str], checks: dict[str, object]
) -> None:
    arguments = [item for name in configs for item in ("--config", name)]
    arguments += _face_roots(utkface_tree) + [
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
    ]
    cli = run_lightning_cli(command, arguments, run=False)
    for key, value in checks.items():
        assert cli.model.hparams[key] == value, key
    assert isinstance(cli.datamodule, LightningDataModule)
    assert isinstance(cli.trainer.logger, WandbRunLogger)
    assert any(isinstance(callback, ModelCheckpoint) for callback in cli.trainer.callbacks)


def test_augmentation_override_keeps_the_image_size(utkface_tree: UTKFaceTree) -> None:
    # One augmentation field set on the command line must not reset the view size.
    arguments = [
        *("--config", "pretrain_faces", "--config", "cpu_small"),
        *_face_roots(utkface_tree),
        "--data.init_args.augmentation.cj_hue=0.0",
    ]
    cli = run_lightning_cli("pretrain", arguments, run=False)
    assert cli.datamodule.augmentation.cj_hue == 0.0
    assert cli.datamodule.augmentation.image_size == 64
    assert cli.datamodule.augmentation.cj_sat == 0.8


def test_finetune_config_tasks(utkface_tree: UTKFaceTree) -> None:
    for name, task in (("finetune_race", "race"), ("finetune_gender", "gender")):
        arguments = ["--config", name, *_face_roots(utkface_tree), "--trainer.accelerator=cpu"]
        cli = run_lightning_cli("finetune", arguments, run=False)
        assert cli.datamodule.task == task


@pytest.mark.parametrize("overlay", ["multi_gpu", "multi_node"])
def test_distributed_configs_parse(utkface_tree: UTKFaceTree, overlay: str) -> None:
    path = shipped_configs()[overlay]
    trainer = yaml.safe_load(path.read_text())["trainer"]
    assert trainer["strategy"] == "ddp"
    assert trainer["sync_batchnorm"] is True
    # The overlay's keys must be valid Trainer arguments: parse it, then run on one CPU process.
    arguments = [
        "--config",
        "pretrain_faces",
        "--config",
        overlay,
        *_face_roots(utkface_tree),
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.num_nodes=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32-true",
    ]
    cli = run_lightning_cli("pretrain", arguments, run=False)
    assert cli.trainer.world_size == 1


def test_cifar_configs_instantiate(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    for split in ("train", "test"):
        for index, name in enumerate(CIFAR_CLASSES):
            write_image(root / split / name / f"{index}.png", seed=index, fmt="PNG")
    for command, name in (("pretrain", "cifar10_pretrain"), ("finetune", "cifar10_linear")):
        arguments = ["--config", name, f"--data.root={root}", "--trainer.accelerator=cpu"]
        cli = run_lightning_cli(command, arguments, run=False)
        assert cli.datamodule.num_classes == 10
    assert cli.model.hparams["protocol"] == "linear"


def test_cifar_augmentation_override_keeps_recipe(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    for split in ("train", "test"):
        for index, name in enumerate(CIFAR_CLASSES):
            write_image(root / split / name / f"{index}.png", seed=index, fmt="PNG")
    arguments = ["--config", "cifar10_pretrain", f"--data.root={root}", "--trainer.accelerator=cpu"]
    arguments.append("--data.init_args.augmentation.cj_hue=0.1")
    augmentation = run_lightning_cli("pretrain", arguments, run=False).datamodule.augmentation
    # The SimCLR paper's CIFAR-10 settings stay; only the hue changes.
    assert augmentation.cj_strength == 0.5
    assert augmentation.blur_prob == 0.0
    assert augmentation.cj_hue == 0.1
    assert augmentation.image_size == 32


def test_print_config_shows_resolved_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["pretrain", "fit", "--config", "pretrain_faces", "--print_config"])
    assert raised.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["backbone"] == "resnet50"
    assert printed["data"]["class_path"] == "simclr_lightning.FaceDataModule"


@pytest.mark.slow
def test_pretrain_then_finetune_from_checkpoint(tmp_path: Path, utkface_tree: UTKFaceTree) -> None:
    roots = _face_roots(utkface_tree)
    pretrain = ["fit", "--config", "pretrain_faces", "--config", "cpu_small", *roots, *TINY]
    assert main(["pretrain", *pretrain]) == 0
    # A second run in the same folder gets a folder of its own.
    assert main(["pretrain", *pretrain]) == 0
    run_folders = sorted((tmp_path / "runs" / "simclr-lightning").iterdir())
    assert len(run_folders) == 2
    for folder in run_folders:
        assert (folder / "config.yaml").is_file()
        assert (folder / "data_report.md").is_file()
        assert (folder / "checkpoints" / "last.ckpt").is_file()

    checkpoint = run_folders[0] / "checkpoints" / "last.ckpt"
    finetune = [
        "fit",
        "--config",
        "finetune_gender",
        "--config",
        "cpu_small",
        *roots,
        *TINY,
        f"--model.checkpoint_path={checkpoint}",
    ]
    assert main(["finetune", *finetune]) == 0
    finetune_folder = next(
        folder
        for folder in (tmp_path / "runs" / "simclr-lightning").iterdir()
        if folder not in run_folders
    )
    assert list(finetune_folder.glob("confusion_val_*.png"))
    saved = yaml.safe_load((finetune_folder / "config.yaml").read_text())
    assert saved["model"]["checkpoint_path"] == str(checkpoint)

    pretrained = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    tuned = torch.load(
        finetune_folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )["state_dict"]
    assert not any(key.startswith("projection_head.") for key in tuned)
    assert tuned["classifier.weight"].shape == (2, 512)
    assert set(key for key in pretrained if key.startswith("backbone.")) <= set(tuned)


def test_configs_command_lists_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(EXPECTED_CONFIGS)


def test_bad_dataset_folder_one_line_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SIMCLR_LIGHTNING_DEBUG", raising=False)
    missing = tmp_path / "no_such_folder"
    arguments = ["pretrain", "fit", "--config", "pretrain_faces", "--config", "cpu_small"]
    arguments += [f"--data.utkface_root={missing}", *TINY]
    assert main(arguments) == 2
    assert str(missing) in caplog.text
    assert "SIMCLR_LIGHTNING_DEBUG=1" in caplog.text


def test_debug_variable_keeps_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIMCLR_LIGHTNING_DEBUG", "1")
    arguments = ["pretrain", "fit", "--config", "pretrain_faces", "--config", "cpu_small"]
    arguments += [f"--data.utkface_root={tmp_path / 'missing'}", *TINY]
    with pytest.raises((FileNotFoundError, ValueError)):
        main(arguments)


def _hparams_checkpoint(path: Path, module: torch.nn.Module) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": dict(module.hparams)}, path)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_ckpt_path_other_module_error(
    utkface_tree: UTKFaceTree,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    from simclr_lightning.models.finetune import FineTuneModule
    from simclr_lightning.models.simclr import SimCLRModule

    monkeypatch.delenv("SIMCLR_LIGHTNING_DEBUG", raising=False)
    other = FineTuneModule(backbone="resnet18") if command == "pretrain" else SimCLRModule()
    checkpoint = _hparams_checkpoint(tmp_path / "other.ckpt", other)
    config = "pretrain_faces" if command == "pretrain" else "finetune_race"
    arguments = [command, "validate", "--config", config, "--config", "cpu_small"]
    arguments += [*_face_roots(utkface_tree), *TINY, f"--ckpt_path={checkpoint}"]

    assert main(arguments) == 2

    expected = "SimCLRModule" if command == "pretrain" else "FineTuneModule"
    assert f"is not a {expected} checkpoint" in caplog.text
    hint = "--model.checkpoint_path" if command == "finetune" else "pretrain fit"
    assert hint in caplog.text


def _validate_with(utkface_tree: UTKFaceTree, checkpoint: Path) -> list[str]:
    arguments = ["finetune", "validate", "--config", "finetune_gender", "--config", "cpu_small"]
    return [*arguments, *_face_roots(utkface_tree), *TINY, f"--ckpt_path={checkpoint}"]


def test_ckpt_path_weights_identify_module(
    utkface_tree: UTKFaceTree,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from simclr_lightning.models.simclr import SimCLRModule

    monkeypatch.delenv("SIMCLR_LIGHTNING_DEBUG", raising=False)
    checkpoint = tmp_path / "simclr.ckpt"
    torch.save({"state_dict": SimCLRModule(projection_dim=8).state_dict()}, checkpoint)

    assert main(_validate_with(utkface_tree, checkpoint)) == 2

    assert "it has projection_head.* weights" in caplog.text


@pytest.mark.parametrize("content", ["text", "empty", "folder"])
def test_ckpt_path_not_checkpoint_error(
    utkface_tree: UTKFaceTree,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    content: str,
) -> None:
    monkeypatch.delenv("SIMCLR_LIGHTNING_DEBUG", raising=False)
    checkpoint = tmp_path / "bad.ckpt"
    if content == "folder":
        checkpoint.mkdir()
    else:
        checkpoint.write_text("epoch 3\n" if content == "text" else "")

    assert main(_validate_with(utkface_tree, checkpoint)) == 2

    expected = "is a folder" if content == "folder" else "is not a PyTorch checkpoint"
    assert f"--ckpt_path {checkpoint} {expected}" in caplog.text
