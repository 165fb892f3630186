"""The demo job: KW-ify a small ConvNet at the paper's budgets, train a few steps with the
temperature schedule, check a save/reload round trip, and print warehouses, sizes and timings."""
from __future__ import annotations

import copy
import io
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import KWConfig
from .nn import TemperatureSchedule, convert, count_parameters, describe


def small_convnet(num_classes: int = 10) -> nn.Sequential:
    """A 3-stage ConvNet (stem, 2 convs per stage) for demos and tests."""
    def stage(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         stage(16, 32, 2), stage(32, 64, 2), stage(64, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def stage_sharing(name: str, module: nn.Module) -> str | None:
    """Stem and classifier static; every conv of stage i joins warehouse 'stage{i}'."""
    top = name.split(".")[0]
    return f"stage{int(top) - 2}" if top in ("3", "4", "5") else None


#: the demo's options: name -> (least value, what it is)
LIMITS = {"batch": (2, "the attention's BatchNorm cannot train on one sample"), "size": (1, "the input resolution"),
          "steps": (1, "training steps per budget")}


def check_demo_options(batch: int, size: int, steps: int) -> None:
    """ValueError naming the option (`--batch`, `--size`, `--steps`) for a value the demo cannot run."""
    for name, value in (("batch", batch), ("size", size), ("steps", steps)):
        least, what = LIMITS[name]
        if value < least:
            raise ValueError(f"{name} (--{name}) must be an integer >= {least} ({what}), got {value}")


def run_demo(batch: int = 8, size: int = 32, steps: int = 10) -> None:
    """Train `steps` SGD steps of batch `batch` at `size`x`size` per budget and print the results
    (ValueError from `check_demo_options` first)."""
    check_demo_options(batch, size, steps)
    torch.manual_seed(0)
    static = small_convnet()
    x, target = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    rows = [("static", count_parameters(static), static)]
    for preset in ("kw1d4x", "kw1d2x", "kw1x", "kw2x", "kw4x"):
        model = convert(copy.deepcopy(static), KWConfig.preset(preset), sharing=stage_sharing)
        rows.append((preset, count_parameters(model), model))
    print(describe(rows[3][2]))
    print(f"\n{'model':<8} {'params':>10} {'loss first→last':>18} {'train step ms':>14} {'reload':>7}")
    for name, params, model in rows:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        schedule = TemperatureSchedule(iters_per_epoch=max(steps // 2, 1), epochs=1)
        losses, start = [], time.perf_counter()
        for _ in range(steps):
            schedule.step(model)
            loss = F.cross_entropy(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        step_ms = (time.perf_counter() - start) / steps * 1e3
        model.eval()
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        reloaded = torch.load(buffer, weights_only=False)
        same = torch.equal(reloaded(x), model(x))
        print(f"{name:<8} {params:>10,} {losses[0]:>8.3f} → {losses[-1]:<7.3f} {step_ms:>14.1f} "
              f"{'exact' if same else 'DIFFERS':>7}")
    print(f"\n(batch {batch}, {size}x{size} random data, {steps} SGD steps, τ scheduled 1 → 0, CPU threads "
          f"{torch.get_num_threads()})")
