"""The one training loop, for float training and for quantization-aware fine-tuning (as torchvision's
``train_quantization.py`` reuses ``train_one_epoch``/``evaluate``): :func:`train_one_epoch`, :func:`val_metrics`,
the loss (:class:`TrainLoss`: cross-entropy, label smoothing, optional distillation from a teacher), the
optimizer's parameter groups and the warmup + cosine schedule. :func:`fit` is float training; QAT's schedule,
checkpoints and DDP are in :mod:`mbquant.finetune`.

Randomness (dropout, augmentation, init) is drawn inside ``torch.random.fork_rng`` from the run's seed, so a
run never leaves the caller's global RNG changed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .config import TrainConfig
from .data.dataset import ImageFolderDataset, make_loader
from .distributed import Dist
from .errors import DataError, QuantizationError, TrainingError

if TYPE_CHECKING:
    from pathlib import Path

    from .models.info import ModelInfo

StepHook = Callable[[int, int], None]


BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    bn_recalibration_images: int = 0
    eval_train_top1: float | None = None     # eval mode, on the (unaugmented) recalibration images
    final_val_top1: float | None = None      # eval mode on the val set, after recalibration

    def metrics(self) -> dict:
        return {"history": self.history, "bn_recalibration_images": self.bn_recalibration_images,
                "eval_train_top1": self.eval_train_top1, "final_val_top1": self.final_val_top1}

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)  # BN weights/biases and biases: no decay
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_frac: float):
    warm = max(1, int(total_steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TrainLoss(nn.Module):
    """Cross-entropy on the labels (with ``label_smoothing``), optionally mixed with distillation from a float
    teacher: ``(1 - a) * CE(student, y) + a * T^2 * KL(softmax(teacher / T) || softmax(student / T))``."""

    def __init__(self, teacher: nn.Module | None = None, weight: float = 0.0, temperature: float = 1.0,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.teacher = teacher.eval() if teacher is not None and weight > 0 else None
        self.weight, self.t, self.smoothing = weight, temperature, label_smoothing

    def forward(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.cross_entropy(out, y, label_smoothing=self.smoothing)
        if self.teacher is None:
            return ce
        with torch.no_grad():
            soft = nn.functional.softmax(self.teacher(x) / self.t, dim=1)
        kd = nn.functional.kl_div(nn.functional.log_softmax(out / self.t, dim=1), soft, reduction="batchmean")
        return (1 - self.weight) * ce + self.weight * self.t ** 2 * kd


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def train_one_epoch(net: nn.Module, loader, opt: torch.optim.Optimizer, sched, loss_fn: nn.Module, *,
                    dist: Dist = Dist(), to_input: Callable[[torch.Tensor], torch.Tensor] = _identity,
                    progress: bool = False, desc: str = "train", epoch: int = 0,
                    on_step: StepHook | None = None) -> dict:
    """One pass over ``loader`` (the model already in train mode); metrics summed over all ranks."""
    from tqdm import tqdm

    sums = [0.0, 0.0, 0.0]  # loss * n, correct, n
    bar = tqdm(loader, disable=not (progress and dist.is_main), desc=desc, unit="batch", leave=False)
    for step, batch in enumerate(bar):
        if batch is None:
            if dist.active:
                raise DataError("a whole training batch was unreadable; under torchrun every process must take "
                                "the same number of steps: remove the unreadable images from the training folder")
            continue
        x, y = to_input(batch[0].to(dist.device)), batch[1].to(dist.device)
        out = net(x)
        loss = loss_fn(out, x, y)
        if not torch.isfinite(loss):
            raise QuantizationError(f"the training loss became {float(loss)} at epoch {epoch + 1}, step {step + 1}; "
                                    f"lower --lr (or --weight-decay) and check the weights are finite")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        sums[0] += float(loss.detach()) * len(y)
        sums[1] += int((out.argmax(1) == y).sum())
        sums[2] += len(y)
        bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{100 * sums[1] / sums[2]:.1f}")
        if on_step is not None:
            on_step(epoch, step)
    loss_sum, correct, n = dist.all_sum(sums)
    return {"train_loss": round(loss_sum / max(1, n), 4), "train_top1": round(100 * correct / max(1, n), 2),
            "train_images": int(n)}


def val_metrics(net: nn.Module, dataset: ImageFolderDataset, batch_size: int, *, dist: Dist = Dist(),
                to_input: Callable[[torch.Tensor], torch.Tensor] = _identity) -> dict:
    """Validation during training: top-1 and loss of ``net`` (already in eval mode) on ``dataset`` (each rank a
    shard, summed over ranks). Measuring models against each other is :func:`mbquant.evaluate.compare`'s job."""
    shard = torch.utils.data.Subset(dataset, dist.shard(len(dataset))) if dist.active else dataset
    sums = [0.0, 0.0, 0.0]
    with torch.no_grad():
        for batch in make_loader(shard, batch_size):
            if batch is None:
                continue
            x, y = to_input(batch[0].to(dist.device)), batch[1].to(dist.device)
            out = net(x)
            sums[0] += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            sums[1] += int((out.argmax(1) == y).sum())
            sums[2] += len(y)
    loss_sum, correct, n = dist.all_sum(sums)
    return {"val_loss": round(loss_sum / max(1, n), 4), "val_top1": round(100 * correct / max(1, n), 2),
            "val_images": int(n)}


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def fit(model: nn.Module, train_set: ImageFolderDataset, val_set: ImageFolderDataset | None, config: TrainConfig,
        *, progress: bool = True) -> TrainResult:
    """Train ``model`` in place (channels_last, SGD Nesterov, warmup + cosine); validate after each epoch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        sampler = None
        if config.max_train_samples is not None and config.max_train_samples < len(train_set):
            g = torch.Generator().manual_seed(config.seed)
            idx = torch.randperm(len(train_set), generator=g)[: config.max_train_samples].tolist()
            sampler = torch.utils.data.SubsetRandomSampler(idx, generator=torch.Generator().manual_seed(config.seed + 1))
        loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed, sampler=sampler,
                             drop_last=True)
        if len(loader) == 0:
            raise DataError(f"{len(train_set)} training images give no full batch of {config.batch_size}; pass a "
                            f"smaller --batch-size or more images")
        model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(param_groups(model, config.weight_decay), lr=config.lr, momentum=config.momentum,
                              nesterov=config.momentum > 0)
        sched = warmup_cosine(opt, config.epochs * len(loader), config.warmup_frac)
        loss_fn = TrainLoss(label_smoothing=config.label_smoothing)
        result = TrainResult()
        start = time.perf_counter()
        for epoch in range(config.epochs):
            model.train()
            row = {"epoch": epoch + 1, **train_one_epoch(model, loader, opt, sched, loss_fn, to_input=_channels_last,
                                                         progress=progress, desc=f"epoch {epoch + 1}/{config.epochs}",
                                                         epoch=epoch)}
            row.pop("train_images")
            if val_set is not None:
                model.eval()
                row["val_top1"] = val_metrics(model, val_set, config.batch_size * 2, to_input=_channels_last)["val_top1"]
            result.history.append(row)
            if progress:
                print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        _finish_training(model, train_set, val_set, config, result)
        result.seconds = round(time.perf_counter() - start, 1)
    model.eval()
    return result


def recalibrate_bn(model: nn.Module, batches) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches``: a cumulative average (momentum None) with
    BN in train mode and everything else in eval mode, no gradient step (as torchvision's references and NNCF's BN
    adaptation do). Returns the images seen (0 when the model has no BatchNorm)."""
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
                seen += len(x)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.eval()
    return seen


def _finish_training(model: nn.Module, train_set: ImageFolderDataset, val_set: ImageFolderDataset | None,
                     config: TrainConfig, result: TrainResult) -> None:
    """BatchNorm recalibration, then eval mode held against what training measured (see TrainConfig)."""
    from .data.slicing import stratified_indices

    n = min(config.bn_recalibration or 1024, len(train_set))
    idx = stratified_indices([s.label for s in train_set.samples], n, config.seed)
    clean = ImageFolderDataset([train_set.samples[i] for i in idx], train_set.classes, train_set.spec,
                               max_pixels=train_set.max_pixels)
    if config.bn_recalibration:
        result.bn_recalibration_images = recalibrate_bn(model, (_channels_last(b[0]) for b in
                                                                make_loader(clean, config.batch_size) if b is not None))
    model.eval()
    result.eval_train_top1 = val_metrics(model, clean, config.batch_size * 2, to_input=_channels_last)["val_top1"]
    if val_set is not None:
        result.final_val_top1 = val_metrics(model, val_set, config.batch_size * 2, to_input=_channels_last)["val_top1"]
    trained = result.history[-1]["train_top1"]
    gap = trained - result.eval_train_top1
    if gap > config.max_eval_gap_pp:
        raise TrainingError(
            f"in eval mode the model scores {result.eval_train_top1:.1f} % on {len(clean)} of its own training images, "
            f"{gap:.1f} pp below the {trained:.1f} % training measured (train mode, augmented): its BatchNorm statistics "
            f"do not describe the data"
            + ("" if config.bn_recalibration else " (BN recalibration was off: drop --bn-recalibration 0)")
            + "; no checkpoint was written: train longer (more steps), or check that train/ and val/ hold the same "
              "kind of images")


def evaluate_float(model: nn.Module, dataset: ImageFolderDataset, batch_size: int = 256, *, progress: bool = False,
                   workers: int = 0):
    """Top-1/top-5 of a float model (channels_last, eval mode) on a dataset: a :class:`~mbquant.evaluate.Comparison`
    with the one predictor ``model``; ``workers`` processes decode the images."""
    from .evaluate import compare

    model = model.eval().to(memory_format=torch.channels_last)
    return compare({"model": lambda x: model(_channels_last(x))}, make_loader(dataset, batch_size, workers=workers),
                   progress=progress, desc="eval")


@dataclass
class Trained:
    """What :func:`train_checkpoint` made: the model, its metadata, the checkpoint written and the history."""

    model: nn.Module
    info: "ModelInfo"
    checkpoint: "Path"
    result: TrainResult


def train_checkpoint(name: str, data: "Path", out: "Path", config: TrainConfig, *, width_mult: float = 1.0,
                     resolution: int = 64, preset: str = "small", max_pixels: int | None = None,
                     command: str = "", progress: bool = True) -> Trained:
    """Train zoo model ``name`` on ``data/train`` (validating on ``data/val``) and write an mbquant checkpoint to
    ``out`` atomically: the preset measured from the data, the class names of the folder, the recipe and history."""
    from pathlib import Path

    from .data.contract import spec_of
    from .data.dataset import load_folder, preset_from_data
    from .data.images import MAX_IMAGE_PIXELS
    from .models.checkpoint import save_checkpoint
    from .models.info import ModelInfo
    from .models.zoo import build, rho_for

    data, mp = Path(data), max_pixels or MAX_IMAGE_PIXELS
    chosen, train_set = preset_from_data(preset, resolution, data / "train", max_pixels=mp)
    val_set = load_folder(data / "val", spec_of(chosen), expected_classes=train_set.classes, max_pixels=mp)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the initial weights
        model = build(name, num_classes=len(train_set.classes), width_mult=width_mult)
    info = ModelInfo(name, len(train_set.classes), width_mult, chosen, tuple(train_set.classes))
    result = fit(model, train_set, val_set, config, progress=progress)
    recipe = {"train": config.to_dict(), "data": str(data), "train_samples": len(train_set),
              "seconds": result.seconds, "command": command}
    save_checkpoint(model, info, out, recipe=recipe, metrics=result.metrics(), rho=rho_for(name, resolution))
    return Trained(model, info, Path(out), result)
