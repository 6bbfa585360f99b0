"""Float training of zoo models on an ImageFolder: seeded SGD (Nesterov), warmup + cosine, tqdm progress."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import TrainConfig
from .data import ImageFolderDataset, make_loader
from .evaluate import compare
from .models import ModelInfo


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

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


def fit(model: nn.Module, info: ModelInfo, train_set: ImageFolderDataset, val_set: ImageFolderDataset | None,
        config: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Train ``model`` in place; evaluate on ``val_set`` after each epoch."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    sampler = None
    if config.max_train_samples is not None and config.max_train_samples < len(train_set):
        g = torch.Generator().manual_seed(config.seed)
        idx = torch.randperm(len(train_set), generator=g)[: config.max_train_samples].tolist()
        sampler = torch.utils.data.SubsetRandomSampler(idx, generator=torch.Generator().manual_seed(config.seed + 1))
    loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed, sampler=sampler, drop_last=True)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(model, config.weight_decay), lr=config.lr, momentum=config.momentum, nesterov=True)
    sched = warmup_cosine(opt, config.epochs * len(loader), config.warmup_frac)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    result = TrainResult()
    start = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        seen, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(loader, disable=not progress, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch")
        for batch in bar:
            if batch is None:
                continue
            x, y = batch
            x = x.contiguous(memory_format=torch.channels_last)
            out = model(x)
            loss = loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
            correct += int((out.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        row = {"epoch": epoch + 1, "train_loss": round(loss_sum / max(1, seen), 4),
               "train_top1": round(100 * correct / max(1, seen), 2)}
        if val_set is not None:
            row["val_top1"] = round(evaluate_float(model, val_set, config.batch_size * 2).accuracy["model"].top1, 2)
        result.history.append(row)
        if progress:
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    result.seconds = round(time.perf_counter() - start, 1)
    model.eval()
    return result


def evaluate_float(model: nn.Module, dataset: ImageFolderDataset, batch_size: int = 256, *, progress: bool = False):
    """Top-1/top-5 of a float model (channels_last, eval mode) on a labelled dataset."""
    model.eval()
    model = model.to(memory_format=torch.channels_last)

    def run(x: torch.Tensor) -> torch.Tensor:
        return model(x.contiguous(memory_format=torch.channels_last))

    return compare({"model": run}, make_loader(dataset, batch_size), progress=progress, desc="eval")
