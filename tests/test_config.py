"""Config: defaults < file < CLI, aliases, dict flags, and a one-line error for every kind of bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from caption_train.config import TrainConfig, build_arg_parser, load_train_config, resolve
from caption_train.errors import UserError

from conftest import REPO

SEED_FLAGS = (
    "--output_dir --dataset_dir --lr --model_name_or_path --training_name --epochs --save_every_n_epochs --batch_size "
    "--gradient_accumulation_steps --gradient_checkpointing --max_grad_norm --shuffle_captions --frozen_parts "
    "--caption_dropout --peft_module --seed --interactive --model_config --optimizer --lr_scheduler --scheduler_args --config_file"
).split()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(argv: list[str]) -> str:
    with pytest.raises(UserError) as info:
        load_train_config(argv)
    return str(info.value)


def test_every_seed_flag_is_offered():
    help_text = build_arg_parser().format_help()
    for flag in SEED_FLAGS + ["--learning_rate", "--validation_split", "--optimizer_args", "--peft_args", "--label_smoothing",
                              "--max_length", "--mixed_precision", "--log_with", "--num_workers", "--save_every_n_steps"]:
        assert flag in help_text, flag
    for choice in ("LoRA", "IA3", "Prodigy", "AdamW", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR"):
        assert choice in help_text


def test_defaults_are_typed():
    cfg = load_train_config(["--dataset_dir", "d"])
    assert cfg.model_name_or_path == "Salesforce/blip-image-captioning-base"
    assert isinstance(cfg.frozen_parts, int) and isinstance(cfg.caption_dropout, float) and isinstance(cfg.seed, int)
    assert cfg.peft_module == "LoRA" and cfg.interactive is None


def test_precedence_defaults_file_cli(tmp_path):
    path = write(tmp_path, 'dataset_dir = "from_file"\nepochs = 7\nbatch_size = 3\n[scheduler_args]\neta_min = 0.5\n')
    cfg = load_train_config(["--config_file", str(path), "--epochs", "2"])
    assert cfg.dataset_dir == str(Path("from_file").resolve())  # file beats default; recorded absolute
    assert cfg.batch_size == 3
    assert cfg.epochs == 2  # CLI beats file
    assert cfg.seed == TrainConfig().seed  # default where neither says
    assert cfg.scheduler_args == {"eta_min": 0.5}


def test_aliases_and_types(tmp_path):
    path = write(tmp_path, 'train_dir = "x"\nlearning_rate = 3e-4\nfrozen_parts = 2\ncaption_dropout = 0.25\nshuffle_captions = true\n')
    cfg = load_train_config(["--config_file", str(path)])
    assert (cfg.dataset_dir, cfg.lr, cfg.frozen_parts, cfg.caption_dropout, cfg.shuffle_captions) == (str(Path("x").resolve()), 3e-4, 2, 0.25, True)
    cfg = load_train_config(["--dataset_dir", "d", "--learning_rate", "5e-5", "--shuffle_captions", "--gradient_checkpointing", "false"])
    assert cfg.lr == 5e-5 and cfg.shuffle_captions is True and cfg.gradient_checkpointing is False


def test_interactive_address_is_accepted():
    assert load_train_config(["--dataset_dir", "d", "--interactive", "127.0.0.1:8765"]).interactive == "127.0.0.1:8765"


def test_choices_are_case_insensitive():
    cfg = load_train_config(["--dataset_dir", "d", "--optimizer", "prodigy", "--peft_module", "ia3", "--lr_scheduler", "onecyclelr"])
    assert (cfg.optimizer, cfg.peft_module, cfg.lr_scheduler) == ("Prodigy", "IA3", "OneCycleLR")


@pytest.mark.parametrize("text", ['{max_lr = 1e-3, pct_start = 0.1}', '{"max_lr": 1e-3, "pct_start": 0.1}'])
def test_dict_flags_take_toml_or_json(text):
    cfg = load_train_config(["--dataset_dir", "d", "--lr_scheduler", "OneCycleLR", "--scheduler_args", text])
    assert cfg.scheduler_args == {"max_lr": 1e-3, "pct_start": 0.1}


def test_shipped_config_toml_loads():
    cfg = load_train_config(["--config_file", str(REPO / "config.toml")])
    assert cfg.dataset_dir == str(Path("dataset").resolve()) and cfg.optimizer_args == {"weight_decay": 0.01}
    assert cfg.peft_args == {"r": 16, "lora_alpha": 16}


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--dataset_dir", "d", "--lr", "0"], "lr must be > 0"),
        (["--dataset_dir", "d", "--lr", "-1e-3"], "lr must be > 0"),
        (["--dataset_dir", "d", "--epochs", "0"], "epochs must be >= 1"),
        (["--dataset_dir", "d", "--caption_dropout", "1.5"], "caption_dropout must be in [0, 1]"),
        (["--dataset_dir", "d", "--frozen_parts", "-1"], "frozen_parts must be >= 0"),
        (["--dataset_dir", "d", "--epochs", "five"], "--epochs: expected an integer, got 'five'"),
        (["--dataset_dir", "d", "--lr", "fast"], "--lr: expected a number"),
        (["--dataset_dir", "d", "--optimizer", "SGD"], "unknown value 'SGD'; choose one of AdamW, Prodigy"),
        (["--dataset_dir", "d", "--lr_scheduler", "Linear"], "unknown value 'Linear'"),
        (["--dataset_dir", "d", "--peft_module", "QLoRA"], "unknown value 'QLoRA'; choose one of LoRA, IA3, none"),
        (["--dataset_dir", "d", "--scheduler_args", "{foo = 1}"], "CosineAnnealingLR does not accept 'foo'"),
        (["--dataset_dir", "d", "--lr_scheduler", "OneCycleLR", "--scheduler_args", "{max_lrr = 1}"], "did you mean 'max_lr'"),
        (["--dataset_dir", "d", "--optimizer_args", "{wieght_decay = 1}"], "did you mean 'weight_decay'"),
        (["--dataset_dir", "d", "--scheduler_args", "{not toml"], "expected a TOML inline table"),
        (["--epochs", "2"], "dataset_dir is required"),
        (["--dataset_dir", "d", "--interactive", "host:notaport"], "expected [HOST:]PORT"),
    ],
)
def test_bad_values_name_the_problem(argv, expected):
    assert expected in error_of(argv)


def test_all_problems_reported_at_once():
    message = error_of(["--dataset_dir", "d", "--lr", "-1", "--epochs", "0", "--caption_dropout", "2"])
    assert "lr must be" in message and "epochs must be" in message and "caption_dropout must be" in message
    assert "\n" not in message


def test_unknown_key_in_file_names_it_and_closest(tmp_path):
    path = write(tmp_path, 'dataset_dir = "d"\nepoch = 3\n')
    message = error_of(["--config_file", str(path)])
    assert "unknown key 'epoch'" in message and "did you mean 'epochs'" in message and str(path) in message


def test_wrong_type_in_file(tmp_path):
    path = write(tmp_path, 'dataset_dir = "d"\nepochs = "three"\nshuffle_captions = 3\n')
    message = error_of(["--config_file", str(path)])
    assert 'epochs = "three": expected an integer, got a string' in message
    assert "shuffle_captions = 3: expected true or false, got an integer" in message


@pytest.mark.parametrize("line, message", [
    ('batch_size = "8"', 'batch_size = "8": expected an integer, got a string'),
    ("batch_size = 8.0", "batch_size = 8.0: expected an integer, got a float"),
    ('lr = "1e-4"', 'lr = "1e-4": expected a number, got a string'),
    ("shuffle_captions = 1", "shuffle_captions = 1: expected true or false, got an integer"),
    ('shuffle_captions = "true"', 'shuffle_captions = "true": expected true or false, got a string'),
    ("training_name = 5", "training_name = 5: expected a string, got an integer"),
    ('scheduler_args = "{eta_min = 0.1}"', 'scheduler_args = "{eta_min = 0.1}": expected a table, got a string'),
])
def test_toml_values_must_have_the_fields_type(tmp_path, line, message):
    """A string in TOML is a string: only command-line values (always strings) are parsed."""
    path = write(tmp_path, f'dataset_dir = "d"\n{line}\n')
    assert f"{path}: {message}" in error_of(["--config_file", str(path)])


def test_command_line_strings_are_still_parsed(tmp_path):
    path = write(tmp_path, 'dataset_dir = "d"\nlr = 1\n')  # an integer where a float goes is fine in TOML
    cfg = load_train_config(["--config_file", str(path), "--batch_size", "8", "--shuffle_captions", "true", "--scheduler_args", "{eta_min = 0.1}"])
    assert (cfg.lr, cfg.batch_size, cfg.shuffle_captions, cfg.scheduler_args) == (1.0, 8, True, {"eta_min": 0.1})


def test_every_problem_in_one_pass(tmp_path):
    """A top-level typo, typos inside the optimizer/scheduler/peft tables and a wrong type: one error names them all."""
    path = write(tmp_path, 'dataset_dir = "d"\nepoch = 3\nbatch_size = "8"\nlr_scheduler = "CosineAnnealingLR"\n'
                           "[optimizer_args]\nweight_decy = 0.1\n[scheduler_args]\neta_mn = 0.1\n[peft_args]\nlora_alpah = 8\n")
    message = error_of(["--config_file", str(path), "--epochs", "0"])
    assert "unknown key 'epoch' (did you mean 'epochs'?)" in message
    assert 'batch_size = "8": expected an integer' in message
    assert "optimizer_args: AdamW does not accept 'weight_decy' (did you mean 'weight_decay'?)" in message
    assert "scheduler_args: CosineAnnealingLR does not accept 'eta_mn' (did you mean 'eta_min'?)" in message
    assert "peft_args: LoraConfig does not accept 'lora_alpah' (did you mean 'lora_alpha'?)" in message
    assert "epochs must be >= 1, got 0" in message and "\n" not in message


def test_a_rejected_value_is_not_judged_again_by_its_default(tmp_path):
    path = write(tmp_path, 'dataset_dir = 5\noptimizer = "adamx"\n[optimizer_args]\nd_coef = 2\n')
    message = error_of(["--config_file", str(path)])
    assert "dataset_dir = 5: expected a string" in message and "unknown value 'adamx'" in message
    assert "dataset_dir is required" not in message and "d_coef" not in message  # no noise from the stand-in defaults


def test_peft_args_for_a_full_fine_tune_or_ia3(tmp_path):
    assert "peft_module is none" in error_of(["--dataset_dir", "d", "--peft_module", "none", "--peft_args", "{r = 4}"])
    assert "IA3Config does not accept 'r'" in error_of(["--dataset_dir", "d", "--peft_module", "IA3", "--peft_args", "{r = 4}"])
    assert load_train_config(["--dataset_dir", "d", "--peft_args", "{r = 4, lora_dropout = 0.0}"]).peft_args == {"r": 4, "lora_dropout": 0.0}


def test_toml_syntax_error_gives_line(tmp_path):
    path = write(tmp_path, 'dataset_dir = "d"\nepochs = = 3\n')
    message = error_of(["--config_file", str(path)])
    assert "TOML syntax error" in message and "line 2" in message


def test_missing_config_file(tmp_path):
    assert "no such file" in error_of(["--config_file", str(tmp_path / "nope.toml")])


def test_resolve_from_dicts_matches_cli():
    assert resolve({}, {"dataset_dir": "d", "epochs": 3}) == load_train_config(["--dataset_dir", "d", "--epochs", "3"])


def test_cli_error_is_one_line_without_traceback(tmp_path):
    out = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, str(REPO / "train2.py"), "--dataset_dir", str(tmp_path), "--output_dir", str(out), "--epochs", "0", "--lr", "-2"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert not out.exists()


def test_help_works():
    result = subprocess.run([sys.executable, str(REPO / "train2.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--peft_module" in result.stdout
