"""Mean attention maps per warehouse (kw_ops.attention_map) on a generated ImageFolder: shapes and
member order, what τ and CAF imply for the rows, and the PNG written by `python -m kw_ops attention-map`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import kw_ops
from kw_ops.attention_map import collect_attention, main, plot_attention
from kw_ops.train import build_model
from kw_ops.train.data import ImageFolder, write_synthetic_image_folder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: means of float64 sums of float32 attentions
MEAN_TOLERANCE = {"atol": 1e-6, "rtol": 1e-6}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(write_synthetic_image_folder(tmp_path_factory.mktemp("images")))


def _loader(data):
    return DataLoader(ImageFolder(data, "val", 16, train=False), batch_size=5)


def _maps(model, data, tau):
    kw_ops.set_temperature(model, tau)
    return collect_attention(model, _loader(data))


@pytest.mark.parametrize("name", ["tiny_kw1d2x", "tiny_kw1x", "tiny_kw2x"])
def test_shapes_follow_the_warehouses_in_member_order(data, name):
    model = build_model(name, 3)
    maps = _maps(model, data, 0.0)
    assert [m.name for m in maps] == [w.name for w in kw_ops.warehouses(model)]
    for item, warehouse in zip(maps, kw_ops.warehouses(model)):
        assert item.mean.shape == (sum(member.m for member in warehouse.members), warehouse.cells.shape[0])
        assert [m for _, m in item.layers] == [member.m for member in warehouse.members]
        assert [path for path, _ in item.layers] == [member._name for member in warehouse.members]
        assert item.samples == 12


@pytest.mark.parametrize("name", ["tiny_kw1d2x", "tiny_kw1x", "tiny_kw2x"])
def test_tau_one_gives_beta_one_mixture_per_cell(data, name):
    """τ = 1: α = β exactly; a row sums to 1 (its cell) or 0 (zero cell); no cell serves two mixtures,
    and min(n, Σm) cells serve one (b >= 1: every mixture; b < 1: every cell)."""
    model = build_model(name, 3)
    for item, warehouse in zip(_maps(model, data, 1.0), kw_ops.warehouses(model)):
        beta = torch.cat([member.attention.beta[:, :-1] for member in warehouse.members]).double()
        assert torch.equal(item.mean, beta)
        assert set(item.mean.sum(dim=1).tolist()) <= {0.0, 1.0}
        columns = item.mean.sum(dim=0)
        assert set(columns.tolist()) <= {0.0, 1.0}
        assert columns.sum() == min(item.mean.shape)


def test_caf_rows_and_the_temperature_blend(data):
    """τ = 0: CAF rows have Σ|α| < 1 (the zero cell and ε take the rest). τ = 0.5 blends linearly with β
    for the first KW layer (its input does not depend on τ; later layers see features that do)."""
    model = build_model("tiny_kw1x", 3)
    free, half = _maps(model, data, 0.0), _maps(model, data, 0.5)
    assert all((item.mean.abs().sum(dim=1) < 1).all() for item in free)
    first = kw_ops.warehouses(model)[0].members[0]
    rows = slice(0, first.m)
    beta = first.attention.beta[:, :-1].double()
    torch.testing.assert_close(half[0].mean[rows], 0.5 * free[0].mean[rows] + 0.5 * beta, **MEAN_TOLERANCE)


def test_collect_restores_training_mode_and_removes_hooks(data):
    model = build_model("tiny_kw1x", 3).train()
    collect_attention(model, _loader(data), max_batches=1)
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_plot_writes_a_png(data, tmp_path):
    path = plot_attention(_maps(build_model("tiny_kw1d2x", 3), data, 0.0), tmp_path / "maps" / "a.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_main_with_a_checkpoint(data, tmp_path):
    """A state_dict wrapped with its classes: the model is built for that many classes."""
    model = build_model("tiny_kw1x", 5)
    torch.save({"model": model.state_dict(), "classes": list("abcde")}, tmp_path / "ckpt.pt")
    out = tmp_path / "map.png"
    assert main(["--model", "tiny_kw1x", "--checkpoint", str(tmp_path / "ckpt.pt"), "--data", data,
                 "--image-size", "16", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_command_line(data, tmp_path):
    out = tmp_path / "cli.png"
    result = subprocess.run([sys.executable, "-m", "kw_ops", "attention-map", "--model", "tiny_kw2x", "--data", data,
                             "--image-size", "16", "--out", str(out)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == PNG_MAGIC and "2 warehouses" in result.stdout


def _unreadable(tmp_path, data):
    path = tmp_path / "truncated.pt"
    torch.save({"model": build_model("tiny_kw1x", 3).state_dict()}, path)
    path.write_bytes(path.read_bytes()[:4096])
    return ["--checkpoint", str(path)], f"{path} is not a readable checkpoint (truncated, or not written by torch.save)"


def _image_as_checkpoint(tmp_path, data):
    path = Path(data) / "val" / "class0" / "0.png"
    return ["--checkpoint", str(path)], f"{path} is not a readable checkpoint"


def _tensor_as_checkpoint(tmp_path, data):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    return ["--checkpoint", str(path)], f"--checkpoint {path} holds a Tensor, not a state_dict or checkpoint"


def _other_classes(tmp_path, data):
    path = tmp_path / "five.pt"
    torch.save(build_model("tiny_kw1x", 5).state_dict(), path)
    return ["--checkpoint", str(path)], "key '5.weight' has shape (5, 32), the model's '5.weight' (3, 32)"


def _corrupt_image(tmp_path, data):
    root = Path(shutil.copytree(data, tmp_path / "data"))
    image = root / "val" / "class2" / "1.png"
    image.write_bytes(b"not a png")
    return ["--data", str(root)], f"cannot decode image {image}: UnidentifiedImageError"


def _empty_class_folder(tmp_path, data):
    root = Path(shutil.copytree(data, tmp_path / "data"))
    (root / "val" / "class7").mkdir()
    return ["--data", str(root)], f"class folders without images under {root / 'val'}: class7"


def _flags(*flags, message):
    """A case that only adds command-line flags."""
    return lambda tmp_path, data: (list(flags), message)


@pytest.mark.parametrize("case", [
    _unreadable, _image_as_checkpoint, _tensor_as_checkpoint, _other_classes, _corrupt_image, _empty_class_folder,
    _flags("--device", "bogus", message="--device: expected cpu, cuda or cuda:N, got 'bogus'"),
    _flags("--max-batches", "0", message="--max-batches must be an integer >= 1 (or left out: every batch), got 0"),
    _flags("--max-batches", "-3", message="--max-batches must be an integer >= 1 (or left out: every batch), got -3"),
    pytest.param(_flags("--device", "cuda", message="--device cuda: no CUDA device here"),
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
], ids=["truncated-checkpoint", "image-as-checkpoint", "tensor-as-checkpoint", "other-classes", "corrupt-image",
        "empty-class-folder", "unknown-device", "max-batches-0", "max-batches-negative", "cuda-without-cuda"])
def test_bad_input_is_one_line_and_exit_code_2_and_the_old_png_is_kept(data, tmp_path, capsys, case):
    """Each: exit code 2, one line naming what was wrong, an existing PNG at --out untouched."""
    args, message = case(tmp_path, data)
    out = tmp_path / "map.png"
    out.write_bytes(PNG_MAGIC + b"an earlier map")
    code = main(["--model", "tiny_kw1x", "--data", data, "--image-size", "16", "--out", str(out), *args])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("kw_ops attention-map: ") and message in err[0], err
    assert out.read_bytes() == PNG_MAGIC + b"an earlier map" and not captured.out


def test_collect_refuses_fewer_than_one_batch(data):
    with pytest.raises(ValueError, match="max_batches must be None or >= 1, got 0"):
        collect_attention(build_model("tiny_kw1x", 3), _loader(data), max_batches=0)
