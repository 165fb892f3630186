"""`python -m kw_ops train` on a generated ImageFolder with the tiny KW nets: recipes, the τ schedule
per iteration, learning, exact resume, the command line, and one DDP step (2 gloo processes) equal
to a single-process step on the same global batch."""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import pytest
import torch

import kw_ops
from kw_ops.train import TrainConfig, build_model, get_recipe, lr_factor, param_groups, train
from kw_ops.train.checkpoint import load_checkpoint
from kw_ops.train.data import ImageFolder, write_synthetic_image_folder

#: DDP all-reduces gradients in a different summation order than one process: float32 rounding only
DDP_TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}
#: tiny runs: 3 classes x 8 training images, batch 4 at 16x16 -> 6 iterations per epoch
TINY = {"model": "tiny_kw1x", "batch_size": 4, "image_size": 16, "workers": 0, "progress": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(write_synthetic_image_folder(tmp_path_factory.mktemp("images")))


def _train(data, out, on_step=None, **changes) -> dict:
    return train(TrainConfig(data=data, out=str(out), **{**TINY, **changes}), on_step=on_step)


def _steps(data, out, **changes) -> tuple[list, dict]:
    records = []
    summary = _train(data, out, on_step=records.append, **changes)
    return records, summary


# -- recipes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name, optimizer, lr, wd, epochs, schedule, temp_epochs", [
    ("resnet", "sgd", 0.1, 1e-4, 100, "step", 20),
    ("mobilenetv2", "sgd", 0.1, 4e-5, 150, "cosine", 15),
    ("convnext", "adamw", 4e-3, 0.05, 300, "cosine", 20),
    ("deit", "adamw", 1e-3, 0.05, 300, "cosine", 20),
])
def test_recipes_follow_the_paper_and_spec(name, optimizer, lr, wd, epochs, schedule, temp_epochs):
    recipe = get_recipe(name)
    assert (recipe.optimizer, recipe.lr, recipe.weight_decay, recipe.epochs, recipe.schedule, recipe.temp_epochs) \
        == (optimizer, lr, wd, epochs, schedule, temp_epochs)
    assert get_recipe(name, epochs=3, lr=None).epochs == 3 and get_recipe(name, lr=None).lr == lr


def test_convnext_recipe_smooths_labels_and_warms_up():
    recipe = get_recipe("convnext")
    assert recipe.label_smoothing == 0.1 and recipe.warmup_epochs == 20 and recipe.betas == (0.9, 0.999)


def test_lr_schedules():
    step = get_recipe("resnet")
    assert [lr_factor(e * 10, step, 10) for e in (0, 29, 30, 60, 99)] == pytest.approx([1, 1, 0.1, 0.01, 1e-3])
    cosine = get_recipe("mobilenetv2", epochs=2)
    assert lr_factor(0, cosine, 10) == 1 and lr_factor(10, cosine, 10) == pytest.approx(0.5)
    assert lr_factor(19, cosine, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 20)))
    warm = get_recipe("convnext", epochs=4, warmup_epochs=1)
    assert [lr_factor(i, warm, 4) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_no_weight_decay_on_biases_and_norms_and_shared_cells_once():
    model = build_model("tiny_kw1x", 3)
    decay, no_decay = param_groups(model, 1e-4)
    assert all(p.ndim == 1 for p in no_decay["params"]) and all(p.ndim > 1 for p in decay["params"])
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 1e-4
    grouped = [id(p) for group in (decay, no_decay) for p in group["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    assert all(any(w.cells is p for p in decay["params"]) for w in kw_ops.warehouses(model))


def test_dataset_shapes_and_deterministic_augmentation(data):
    train_set = ImageFolder(data, "train", 12, train=True, seed=3)
    image, target = train_set[5]
    assert image.shape == (3, 12, 12) and image.dtype == torch.float32 and target == 0
    assert torch.equal(train_set[5][0], image)
    train_set.set_epoch(1)
    assert not torch.equal(train_set[5][0], image)
    val_set = ImageFolder(data, "val", 12, train=False, classes=train_set.classes)
    assert len(train_set) == 24 and len(val_set) == 12 and torch.equal(val_set[0][0], val_set[0][0])


# -- the loop ----------------------------------------------------------------------------------
def test_loss_goes_down_and_tau_follows_the_schedule_every_iteration(data, tmp_path):
    records, summary = _steps(data, tmp_path, epochs=4, temp_epochs=1.5, lr=0.05)
    total = 6 * 1.5  # iterations per epoch x temp epochs
    assert [r.step for r in records] == list(range(1, 25))
    assert [r.tau for r in records] == [max(0.0, (total - t) / total) for t in range(1, 25)]
    losses = [r.loss for r in records]
    assert sum(losses[-6:]) < 0.7 * sum(losses[:6]), losses
    state = load_checkpoint(tmp_path / "last.pt")
    assert all(float(v) == 0 for k, v in state["model"].items() if k.endswith("attention.temperature"))
    assert state["position"] == {"epoch": 4, "batches": 0, "step": 24, "best_top1": summary["position"]["best_top1"]}
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0] == "epoch,step,train_loss,val_loss,top1,top5,lr,tau,images_per_s" and len(rows) == 5
    assert (tmp_path / "best.pt").exists()


@pytest.mark.parametrize("stop", [6, 8], ids=["stop-at-epoch-end", "stop-mid-epoch"])
def test_resume_continues_exactly(data, tmp_path, stop):
    run = {"recipe": "mobilenetv2", "epochs": 2, "temp_epochs": 1, "lr": 0.05}
    full, _ = _steps(data, tmp_path / "full", **run)
    first, _ = _steps(data, tmp_path / "cut", max_steps=stop, **run)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["position"]["step"] == stop
    rest, _ = _steps(data, tmp_path / "cut", resume="auto", **run)
    assert [r.step for r in first + rest] == [r.step for r in full]
    assert [(r.loss, r.tau, r.lr) for r in first + rest] == [(r.loss, r.tau, r.lr) for r in full]
    ours = load_checkpoint(tmp_path / "cut" / "last.pt")
    theirs = load_checkpoint(tmp_path / "full" / "last.pt")
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), key
    assert ours["position"] == theirs["position"]


def test_deit_recipe_trains_a_kw_deit(data, tmp_path):
    summary = _train(data, tmp_path, model="deit_tiny_kw1x", recipe="deit", epochs=1, max_steps=2, image_size=32)
    assert summary["position"]["step"] == 2


def test_resume_refuses_another_model(data, tmp_path):
    _train(data, tmp_path, epochs=1, max_steps=1)
    with pytest.raises(ValueError, match="tiny_kw1x"):
        _train(data, tmp_path, epochs=1, model="tiny_kw2x", resume=str(tmp_path / "last.pt"))


def _command(*args, env=None, launcher=()):
    return subprocess.run([sys.executable, *launcher, "-m", "kw_ops", "train", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_command_line_smoke(data, tmp_path):
    result = _command("--model", "tiny_kw1x", "--data", data, "--epochs", "2", "--batch-size", "4", "--image-size",
                      "16", "--workers", "0", "--max-steps", "3", "--out", str(tmp_path), "--amp", "bf16",
                      "--channels-last")
    assert result.returncode == 0, result.stderr
    assert "loss" in result.stderr and "τ" in result.stderr and "img/s" in result.stderr
    assert (tmp_path / "last.pt").exists() and len((tmp_path / "log.csv").read_text().splitlines()) == 2


def test_command_line_compile(data, tmp_path):
    result = _command("--model", "tiny_kw1x", "--data", data, "--epochs", "1", "--batch-size", "4", "--image-size",
                      "16", "--workers", "0", "--max-steps", "2", "--out", str(tmp_path), "--compile", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "last.pt").exists()


def test_command_line_unknown_model_is_a_clear_error(data, tmp_path):
    result = _command("--model", "no_such_net", "--data", data, "--out", str(tmp_path))
    assert result.returncode == 2 and "no_such_net" in result.stderr


# -- distributed -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_match_one_process_on_the_same_global_batch(data, tmp_path):
    """2 ranks x batch 4 vs 1 process x batch 8: same samples per step (shared sampler permutation),
    batch-independent norms (GroupNorm, LayerNorm attention), so the parameters after 2 SGD steps agree."""
    args = ["--model", "tiny_gn_kw1x", "--data", data, "--epochs", "1", "--image-size", "16", "--workers", "0",
            "--max-steps", "2", "--no-progress"]
    launcher = ("-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(_free_port()))
    ddp = _command(*args, "--batch-size", "4", "--out", str(tmp_path / "ddp"), launcher=launcher)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = _command(*args, "--batch-size", "8", "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    ours = load_checkpoint(tmp_path / "ddp" / "last.pt")
    theirs = load_checkpoint(tmp_path / "single" / "last.pt")
    assert len(ours["rng"]) == 2 and ours["position"]["step"] == theirs["position"]["step"] == 2
    torch.manual_seed(0)
    initial = build_model("tiny_gn_kw1x", 3).state_dict()
    for key, value in theirs["model"].items():
        torch.testing.assert_close(ours["model"][key], value, **DDP_TOLERANCE, msg=lambda m, k=key: f"{k}: {m}")
    assert not torch.allclose(theirs["model"]["1.0.warehouse.cells"], initial["1.0.warehouse.cells"])
