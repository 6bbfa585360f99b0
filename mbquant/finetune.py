"""QAT fine-tuning on the one training loop (:mod:`mbquant.train`): the schedule (BN and observer freezing),
validation each epoch in eval mode, an atomic resumable checkpoint each epoch, DistributedDataParallel under
torchrun.

A run killed mid-epoch and resumed from its last checkpoint repeats that epoch from the saved model,
optimizer, scheduler and RNG states with the same data order (a seeded ``DistributedSampler``), so it
ends where an uninterrupted run with the same seed ends.
"""
from __future__ import annotations

import copy
import hashlib
import io
import itertools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Collection

import torch
from torch import nn

from .atomic import write_bytes
from .config import SELECT_IMAGES, QATConfig, QuantConfig
from .data.dataset import ImageFolderDataset, make_loader
from .distributed import Dist
from .errors import ConfigError, DataError
from .models.info import ModelInfo
from .quant.qat import QatModel
from .records import paths
from .train import StepHook, TrainLoss, param_groups, train_one_epoch, val_metrics, warmup_cosine

CHECKPOINT_FORMAT = "mbquant-qat-checkpoint/1"
CHECKPOINT_NAME = paths.QAT_CHECKPOINT


@dataclass
class QatResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_epoch: int | None = None
    world_size: int = 1
    backend: str | None = None
    checkpoint: str | None = None
    held_out_images: int = 0                  # keep="best": the training-folder images the state is chosen on
    start_agreement: float | None = None      # the start's agreement with the float model on them (%)
    selected_epoch: int | None = None         # the epoch whose state was kept (0: the start)

    def to_dict(self) -> dict:
        return asdict(self)


def state_digest(model: nn.Module) -> str:
    """A short hash of a model's parameters and buffers (names which float weights a QAT run started from)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def apply_schedule(qg: QatModel, epoch: int, config: QATConfig) -> None:
    """Freeze BN statistics / observers once ``epoch`` (0-based, about to start) reaches their setting."""
    if config.freeze_bn_after is not None and epoch >= config.freeze_bn_after and not qg.bn_frozen:
        qg.freeze_bn()
    if config.freeze_observers_after is not None and epoch >= config.freeze_observers_after and not qg.observers_frozen:
        qg.freeze_observers()


def held_out_count(config: QATConfig, available: int) -> int:
    """How many training-folder images ``keep="best"`` holds out (``select_images``, or a fifth of the folder and
    at most ``SELECT_IMAGES``); 0 with ``keep="last"``."""
    if config.keep != "best":
        return 0
    n = config.select_images if config.select_images is not None else min(SELECT_IMAGES, available // 5)
    if n < 1 or available - n < config.batch_size:
        raise DataError(f"the training folder has {available} images: too few to hold out {n} for choosing the QAT "
                        f"state and still train on full batches of {config.batch_size}; pass a smaller "
                        f"--select-images, more images, or --keep last (no held-out choice)")
    return n


def split_training(train_set: ImageFolderDataset, config: QATConfig, exclude: Collection[Path] = ()):
    """The images QAT trains on and, with ``keep="best"``, the held-out ones it chooses its state on (a seeded draw
    of the same folder, evaluation preprocessing, never trained on); (dataset, None) with ``keep="last"``.

    ``exclude``: images never held out (the calibration images: the start's ranges and bias correction were
    measured on them, so they would favour the start); they may still be trained on."""
    held = held_out_count(config, len(train_set))
    if held == 0 and (config.max_train_samples is None or config.max_train_samples >= len(train_set)):
        return train_set, None
    g = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(train_set), generator=g).tolist()
    skip = {Path(p).resolve() for p in exclude}
    eligible = (i for i in order if not skip or train_set.samples[i].path.resolve() not in skip)
    held_idx = list(itertools.islice(eligible, held))     # resolves paths only until enough are found
    if len(held_idx) < held:                               # every eligible image was taken
        raise DataError(f"the training folder has {len(held_idx)} images besides the calibration images: too few to "
                        f"hold out {held} for choosing the QAT state; pass a smaller --select-images, more images, "
                        f"or --keep last (no held-out choice)")
    kept = set(held_idx)
    rest = [i for i in order if i not in kept]
    train_idx = rest if config.max_train_samples is None else rest[:config.max_train_samples]
    if held == 0:
        return torch.utils.data.Subset(train_set, train_idx), None
    chosen = ImageFolderDataset([train_set.samples[i] for i in held_idx], train_set.classes, train_set.spec,
                                train=False, max_pixels=train_set.max_pixels)
    return torch.utils.data.Subset(train_set, train_idx), chosen


def _top1(net: nn.Module, dataset: ImageFolderDataset, batch_size: int, device: torch.device) -> torch.Tensor:
    """``net``'s predicted class for every readable image of ``dataset``, in order."""
    out = []
    with torch.no_grad():
        for batch in make_loader(dataset, batch_size):
            if batch is not None:
                out.append(net(batch[0].to(device)).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


class _Keeper:
    """keep="best": the state (start or an epoch's end) whose INT8 model (converted from a copy, as the run will
    convert it) agrees with the float model on the most held-out images; the start wins ties."""

    def __init__(self, qg: QatModel, held: ImageFolderDataset, reference: nn.Module, batch_size: int,
                 device: torch.device):
        self.qg, self.held, self.batch_size, self.device = qg, held, batch_size, device
        self.float_top1 = _top1(reference.to(device).eval(), held, batch_size, device)
        if len(self.float_top1) == 0:
            raise DataError("none of the held-out training images is readable; fix the training folder or pass "
                            "--keep last")
        self.best: dict | None = None

    def agreement(self) -> float:
        from .quant.fast_qdq import with_fast_qdq

        self.qg.set_mode(False)
        top1 = _top1(with_fast_qdq(self.qg.converted_copy()), self.held, self.batch_size, self.device)
        return round(100.0 * float((top1 == self.float_top1).float().mean()), 3)

    def offer(self, epoch: int, agreement: float) -> None:
        if self.best is None or agreement > self.best["agreement"]:
            state = copy.deepcopy(self.qg.module.state_dict())   # keeps _metadata: observers read its version
            self.best = {"epoch": epoch, "agreement": agreement, "state_dict": state}

    def restore(self) -> None:
        """Load the kept state into the model."""
        self.qg.module.load_state_dict(self.best["state_dict"])


def _train_loader(dataset, config: QATConfig, dist: Dist, epoch: int):
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                 seed=config.seed, drop_last=True)
    sampler.set_epoch(epoch)
    loader = make_loader(dataset, config.batch_size, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise DataError(f"{len(dataset)} training images give no full batch of {config.batch_size} per process "
                        f"on {dist.world} process(es); pass a smaller --batch-size or more images")
    return loader


def validate(qg: QatModel, val_set: ImageFolderDataset, batch_size: int, dist: Dist) -> dict:
    """Top-1 and loss of the fake-quantized model in eval mode (each rank a shard, reduced over ranks)."""
    qg.set_mode(False)
    return val_metrics(qg.module, val_set, batch_size, dist=dist)


_IDENTITY = ("name", "width_mult", "resolution", "num_classes", "classes")


def _identity(info: ModelInfo) -> dict:
    return {k: list(getattr(info, k)) if k == "classes" else getattr(info, k) for k in _IDENTITY}


def save_qat_checkpoint(path: Path, qg: QatModel, opt, sched, *, epoch: int, info: ModelInfo, float_digest: str,
                        quant: QuantConfig, config: QATConfig, history: list[dict], rng: list[torch.Tensor],
                        world: int, best: dict | None = None) -> Path:
    """Everything a resume needs, written atomically (a killed write never leaves a half checkpoint). ``best``:
    with ``keep="best"``, the state kept so far (its epoch, held-out agreement and tensors)."""
    payload = {"format": CHECKPOINT_FORMAT, "model": _identity(info), "float_digest": float_digest,
               "quant_config": quant.to_dict(), "qat_config": config.to_dict(), "epoch": epoch,
               "state_dict": qg.module.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
               "rng": rng, "world_size": world, "history": history, "best": best}
    buf = io.BytesIO()
    torch.save(payload, buf)
    return write_bytes(path, buf.getvalue())


def _describe(model: dict) -> str:
    return (f"{model['name']} (width {model['width_mult']:g}, {model['resolution']}x{model['resolution']}, "
            f"{model['num_classes']} classes)")


def load_qat_checkpoint(path: Path, *, info: ModelInfo, float_digest: str, quant: QuantConfig,
                        config: QATConfig) -> dict:
    """Read a QAT checkpoint (``weights_only``) and check it belongs to this model, weights and configs."""
    path = resume_path(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"--resume '{path}' is not a readable checkpoint ({type(exc).__name__}: {str(exc)[:160]}); "
                          f"pass the {CHECKPOINT_NAME} a QAT run wrote") from exc
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"--resume '{path}' is not an mbquant QAT checkpoint (format "
                          f"{ck.get('format') if isinstance(ck, dict) else type(ck).__name__!r}, expected "
                          f"{CHECKPOINT_FORMAT}); a float checkpoint goes to --weights")
    _check_schema(ck, path)
    if ck["model"] != _identity(info):
        raise ConfigError(f"--resume '{path}' is a QAT checkpoint of {_describe(ck['model'])} but this run is "
                          f"{_describe(_identity(info))}; resume with the same model and --weights, or drop --resume")
    if ck["float_digest"] != float_digest:
        raise ConfigError(f"--resume '{path}' was fine-tuned from other float weights (digest {ck['float_digest']}, "
                          f"these: {float_digest}); pass the --weights that run started from")
    if ck["quant_config"] != quant.to_dict():
        diff = {k: (v, quant.to_dict()[k]) for k, v in ck["quant_config"].items() if quant.to_dict()[k] != v}
        raise ConfigError(f"--resume '{path}' was quantized with other settings {diff} (checkpoint, now); "
                          f"resume with the same flags")
    theirs, ours = dict(ck["qat_config"]), config.to_dict()
    diff = {k: (theirs[k], ours[k]) for k in ours if k != "epochs" and theirs.get(k) != ours[k]}
    if diff:
        raise ConfigError(f"--resume '{path}' was trained with other QAT settings {diff} (checkpoint, now); "
                          f"resume with the same flags (only --epochs may change)")
    if ck["epoch"] > config.epochs:
        raise ConfigError(f"--resume '{path}' has already trained {ck['epoch']} epochs, more than --epochs "
                          f"{config.epochs}; pass --epochs {ck['epoch']} or more")
    return ck


_SCHEMA = {"model": dict, "float_digest": str, "quant_config": dict, "qat_config": dict, "epoch": int,
           "state_dict": dict, "optimizer": dict, "scheduler": dict, "rng": list, "world_size": int, "history": list}


def _check_schema(ck: dict, path: Path) -> None:
    for key, kind in _SCHEMA.items():
        if key not in ck:
            raise ConfigError(f"--resume '{path}' lacks '{key}': not a complete mbquant QAT checkpoint; pass the "
                              f"{CHECKPOINT_NAME} a QAT run wrote")
        if not isinstance(ck[key], kind) or isinstance(ck[key], bool):
            raise ConfigError(f"--resume '{path}': '{key}' is a {type(ck[key]).__name__}, expected {kind.__name__}; the "
                              f"file was not written by `mbquant qat`")
    if not isinstance(ck.get("best"), (dict, type(None))):
        raise ConfigError(f"--resume '{path}': 'best' is a {type(ck['best']).__name__}, expected the kept state or "
                          f"None; the file was not written by `mbquant qat`")
    if ck["epoch"] < 0 or ck["world_size"] < 1 or len(ck["rng"]) != ck["world_size"]:
        raise ConfigError(f"--resume '{path}': epoch {ck['epoch']}, world size {ck['world_size']} and "
                          f"{len(ck['rng'])} RNG states do not fit together; the file was not written by `mbquant qat`")
    missing = sorted(set(_IDENTITY) - set(ck["model"]))
    if missing:
        raise ConfigError(f"--resume '{path}': the model description lacks {missing}; the file was not written by "
                          f"`mbquant qat`")


def resume_path(path: Path) -> Path:
    """The checkpoint ``--resume`` names: a file, or a run folder (finished, with ``qat_last.pt``, or killed, with
    the checkpoint kept beside it until the run succeeds)."""
    from .records.paths import OutPaths

    path = Path(path)
    if path.is_dir() or not path.exists():
        for candidate in (path / CHECKPOINT_NAME, OutPaths(path).work / CHECKPOINT_NAME):
            if candidate.is_file():
                return candidate
    if not path.is_file():
        raise ConfigError(f"--resume '{path}' has no {CHECKPOINT_NAME} (looked in the folder and in what a killed run "
                          f"keeps beside it); pass the --out of a QAT run or its {CHECKPOINT_NAME}")
    return path


def _restore(qg: QatModel, opt, sched, ck: dict, config: QATConfig, dist: Dist) -> list[str]:
    warnings = []
    try:
        qg.module.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ConfigError(f"the QAT checkpoint does not fit this model's fake-quantized graph ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); resume with the flags and mbquant version that wrote it") from exc
    if ck["world_size"] == dist.world:
        torch.set_rng_state(ck["rng"][dist.rank])
    else:
        torch.manual_seed(config.seed + dist.rank + 1000 * ck["epoch"])
        warnings.append(f"resumed on {dist.world} process(es) from a checkpoint of {ck['world_size']}: data order "
                        f"and dropout differ from an uninterrupted run")
    return warnings


def fit_qat(qg: QatModel, info: ModelInfo, train_set: ImageFolderDataset, val_set: ImageFolderDataset, *,
            config: QATConfig, quant: QuantConfig, float_digest: str, dist: Dist = Dist(),
            out_dir: Path | None = None, resume: dict | None = None, eval_batch_size: int = 100,
            progress: bool = False, on_step: StepHook | None = None,
            teacher: nn.Module | None = None, reference: nn.Module | None = None,
            calibration_images: Collection[Path] = ()) -> tuple[QatResult, list[str]]:
    """Train ``qg`` in place for ``config.epochs`` epochs (minus those a resumed checkpoint already did).

    ``teacher``: the float model, for ``config.distill > 0``. ``reference``: the float model, for
    ``config.keep == "best"`` (the state kept is the start's or an epoch's, whichever agrees with it on the most
    held-out training images; :func:`split_training`; ``calibration_images`` are never held out). ``resume`` is a
    checkpoint read (and checked) by :func:`load_qat_checkpoint`. Rank 0 writes ``out_dir/qat_last.pt`` after every
    epoch. Returns the result and any warnings. Dropout and augmentation draw from the seed inside ``fork_rng``: the
    caller's RNG is untouched.
    """
    if config.distill > 0 and teacher is None:
        raise ConfigError(f"distill {config.distill} needs the float model as teacher; pass teacher=")
    if config.keep == "best" and reference is None:
        raise ConfigError("keep='best' chooses the state that agrees best with the float model; pass reference=")
    if config.lr is None:
        raise ConfigError("the QAT learning rate is unset (lr=None means the backend's, which run_job fills in); pass "
                          "config.replace(lr=...) when calling fit_qat directly")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + dist.rank)
        return _fit_qat(qg, info, train_set, val_set, config=config, quant=quant, float_digest=float_digest,
                        dist=dist, out_dir=out_dir, resume=resume, eval_batch_size=eval_batch_size, progress=progress,
                        on_step=on_step, teacher=teacher, reference=reference,
                        calibration_images=calibration_images)


def _fit_qat(qg: QatModel, info: ModelInfo, train_set: ImageFolderDataset, val_set: ImageFolderDataset, *,
             config: QATConfig, quant: QuantConfig, float_digest: str, dist: Dist, out_dir: Path | None,
             resume: dict | None, eval_batch_size: int, progress: bool, on_step: StepHook | None,
             teacher: nn.Module | None, reference: nn.Module | None,
             calibration_images: Collection[Path]) -> tuple[QatResult, list[str]]:
    dataset, held = split_training(train_set, config, calibration_images)
    keeper = _Keeper(qg, held, reference, eval_batch_size, dist.device) if held is not None else None
    net: nn.Module = qg.module
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(qg.module, device_ids=[dist.device] if dist.device.type == "cuda" else None)
    opt = torch.optim.SGD(param_groups(qg.module, config.weight_decay), lr=config.lr, momentum=config.momentum)
    sched = warmup_cosine(opt, config.epochs * len(_train_loader(dataset, config, dist, 0)), config.warmup_frac)
    loss_fn = TrainLoss(teacher.to(dist.device) if teacher is not None else None, config.distill,
                        config.distill_temperature)
    result = QatResult(world_size=dist.world, backend=dist.backend)
    warnings: list[str] = []
    start_epoch = 0
    if resume is not None:
        warnings += _restore(qg, opt, sched, resume, config, dist)
        start_epoch, result.history, result.resumed_from_epoch = resume["epoch"], list(resume["history"]), resume["epoch"]
    ckpt_path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    if keeper is not None:
        result.held_out_images = len(keeper.float_top1)
        if resume is not None and resume.get("best") is not None:
            keeper.best = resume["best"]
            result.start_agreement = resume["best"].get("start_agreement")
        if keeper.best is None:
            result.start_agreement = keeper.agreement()
            keeper.offer(0, result.start_agreement)
    t0 = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        apply_schedule(qg, epoch, config)
        te = time.perf_counter()
        row = {"epoch": epoch + 1, "lr": round(opt.param_groups[0]["lr"], 6), "bn_frozen": qg.bn_frozen,
               "observers_frozen": qg.observers_frozen}
        qg.set_mode(True)
        row.update(train_one_epoch(net, _train_loader(dataset, config, dist, epoch), opt, sched, loss_fn, dist=dist,
                                   desc=f"qat epoch {epoch + 1}/{config.epochs}", progress=progress, epoch=epoch,
                                   on_step=on_step))
        row.update(validate(qg, val_set, eval_batch_size, dist))
        if keeper is not None:
            row["held_out_agreement"] = keeper.agreement()
            keeper.offer(epoch + 1, row["held_out_agreement"])
        row["seconds"] = round(time.perf_counter() - te, 1)
        result.history.append(row)
        rng = dist.gather_rng()
        if dist.is_main and ckpt_path is not None:
            best = None if keeper is None else {**keeper.best, "start_agreement": result.start_agreement}
            save_qat_checkpoint(ckpt_path, qg, opt, sched, epoch=epoch + 1, info=info, float_digest=float_digest,
                                quant=quant, config=config, history=result.history, rng=rng, world=dist.world,
                                best=best)
            result.checkpoint = str(ckpt_path)
        if progress and dist.is_main:
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if keeper is not None:
        result.selected_epoch = keeper.best["epoch"]
        if result.selected_epoch != config.epochs:      # the last epoch's state is the model's already
            keeper.restore()
    result.seconds = round(time.perf_counter() - t0, 1)
    return result, warnings
