"""The one training loop for any task's model, datasets of sample dicts and heads (``docs/ENGINE.md``).

DDP under ``torchrun`` on the seeded global batch order of :class:`GlobalBatchSampler`, AMP on CUDA,
BatchNorm recalibration, early stopping, and a pickle-free ``<out>/state`` from which ``resume=True``
continues bit-identically on CPU.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..atomic import write_text
from ..checkpoint import cpu_state_dict, find_training_state, load_training_state, save_training_state
from ..errors import InputError
from .batchnorm import recalibrate_batchnorm
from .heads import Head

ProgressFn = Callable[[dict[str, Any]], None]
BatchTransform = Callable[[dict[str, Any], torch.Generator, int], dict[str, Any]]
# Loop settings a resumed run may change (more epochs, other patience / workers / eval batch).
RESUMABLE = ("fit.epochs", "fit.early_stopping_patience", "fit.num_workers", "fit.eval_batch_size",
             "fit.state_every")
CHOICES = {"optimizer": ("adam", "adamw"), "scheduler": ("none", "onecycle", "cosine"),
           "select": ("best", "last"), "bn_recalibration": ("epoch", "final", "none"),
           "device": ("auto", "cpu", "cuda")}


@dataclass
class FitConfig:
    """The loop's settings (or a plain dict of them); the string settings take one of :data:`CHOICES`."""

    epochs: int = 100
    batch_size: int = 4                 # global batch (all processes, all accumulation steps)
    accumulate_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adam"
    scheduler: str = "none"             # stepped per optimiser step
    seed: int = 0
    device: str = "auto"
    amp: bool = True                    # CUDA only
    channels_last: bool = False         # CUDA only
    sync_batchnorm: bool = True         # DDP on CUDA
    eval_batch_size: int = 8
    num_workers: int = 0
    early_stopping_patience: int = 0    # epochs without improvement of the monitored score; 0 = off
    select: str = "best"                # weights kept: "best" (monitored score) | "last"
    monitor: str = ""                   # head whose score selects; "" = the first head
    bn_recalibration: str = "epoch"
    collect_val_outputs: bool = False   # keep every epoch's validation outputs (out-of-fold selection)
    state_every: int = 1                # resume state every N epochs (0: only at the end / early stop)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.accumulate_steps < 1 or self.batch_size % self.accumulate_steps:
            raise ValueError(f"batch_size {self.batch_size} must be a positive multiple of accumulate_steps "
                             f"{self.accumulate_steps}")
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r}: one of {allowed}")

    @classmethod
    def from_any(cls, cfg: FitConfig | Mapping[str, Any]) -> FitConfig:
        if isinstance(cfg, FitConfig):
            return cfg
        d, names = dict(cfg), sorted(f.name for f in fields(cls))
        if d.get("select") == "best_val_auc":
            d["select"] = "best"
        if set(d) - set(names):
            raise ValueError(f"unknown fit setting(s) {sorted(set(d) - set(names))}; known: {names}")
        return cls(**d)


@dataclass
class FitResult:
    """``model`` holds the selected weights (eval mode); ``val_outputs`` their raw outputs per head."""

    model: torch.nn.Module
    history: list[dict[str, Any]]
    epochs_run: int
    best_epoch: int | None
    best_score: float | None
    score_name: str
    stopped: bool = False
    early_stopped: bool = False
    weights: str = "last"
    bn_recalibration: str = "none"
    val_outputs: dict[str, torch.Tensor] | None = None
    epoch_val_outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    world_size: int = 1
    device: str = "cpu"
    amp: bool = False
    channels_last: bool = False


@dataclass
class DistContext:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


@contextlib.contextmanager
def process_group(device: str) -> Iterator[DistContext]:
    """The torchrun process group (created, and destroyed on exit, when WORLD_SIZE > 1 and none exists)."""
    created = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device != "cpu" and torch.cuda.is_available() else "gloo")
    try:
        yield (DistContext(dist.get_world_size(), dist.get_rank(),
                           int(os.environ.get("LOCAL_RANK", dist.get_rank())))
               if dist.is_initialized() else DistContext())
    finally:
        if created:
            dist.destroy_process_group()


def select_device(pref: str, d: DistContext) -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise InputError(None, "device = 'cuda' but no CUDA device is available")
    if pref in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def autocast(device: torch.device, enabled: bool) -> Any:
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Per-process micro-batches of a seeded global batch order: each epoch a (seed, epoch)
    permutation cut into global batches (the last completed by wrapping around: nothing dropped),
    each split into ``world_size * accumulate`` micro-batches, process ``rank`` taking
    ``rank*accumulate ...``: one process with accumulate=A sees what A DDP processes see."""

    def __init__(self, n: int, batch_size: int, world_size: int = 1, rank: int = 0, accumulate: int = 1,
                 seed: int = 0):
        if batch_size % (world_size * accumulate):
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size} x "
                             f"accumulate {accumulate}")
        if n < 1:
            raise ValueError("empty dataset")
        self.n, self.batch_size, self.rank, self.accumulate, self.seed = n, batch_size, rank, accumulate, seed
        self.micro, self.epoch = batch_size // (world_size * accumulate), 0
        self.steps = -(-n // batch_size)  # optimiser steps per epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps * self.accumulate

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        total = self.steps * self.batch_size
        order = (order * (total // self.n + 1))[:total]
        for start in range(0, total, self.batch_size):
            for k in range(self.rank * self.accumulate, (self.rank + 1) * self.accumulate):
                yield order[start + k * self.micro:start + (k + 1) * self.micro]


def _to(x: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(x, torch.Tensor):
        fmt = torch.channels_last if channels_last and x.dim() == 4 else torch.contiguous_format
        return x.to(device, non_blocking=True, memory_format=fmt)
    if isinstance(x, Mapping):
        return {k: _to(v, device, channels_last) for k, v in x.items()}
    return x


def forward(model: torch.nn.Module, inputs: Any,
            heads: Mapping[str, Head] | None = None) -> dict[str, torch.Tensor]:
    """``model(**inputs)`` for a dict input, else ``model(inputs)``; a bare Tensor output is named
    after the single head (or "out")."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    name = next(iter(heads)) if heads and len(heads) == 1 else "out"
    return dict(out) if isinstance(out, Mapping) else {name: out}


def total_loss(heads: Mapping[str, Head], out: Mapping[str, torch.Tensor],
               target: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Weighted sum of the heads' losses."""
    missing = [n for n in heads if n not in out or n not in target]
    if missing:
        raise KeyError(f"head(s) {missing} missing from the model output ({sorted(out)}) or the sample "
                       f"target ({sorted(target)})")
    return sum(h.weight * h.loss(out[n], target[n]) for n, h in heads.items())  # type: ignore[return-value]


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: torch.utils.data.Dataset, device: torch.device,
            heads: Mapping[str, Head] | None = None, batch_size: int = 8, amp: bool = False,
            channels_last: bool = False, should_stop: Callable[[], bool] | None = None,
            desc: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Raw outputs and targets per head (CPU float32, dataset order) and ids; model in eval mode."""
    model.eval()
    outs: dict[str, list[torch.Tensor]] = {}
    tgts: dict[str, list[torch.Tensor]] = {}
    ids: list[str] = []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in tqdm(loader, desc=desc, leave=False, disable=desc is None):
        if should_stop is not None and should_stop():
            raise KeyboardInterrupt("stopped")
        with autocast(device, amp):
            out = forward(model, _to(batch["input"], device, channels_last), heads)
        for k, v in out.items():
            outs.setdefault(k, []).append(v.detach().float().cpu())
        for k, v in (batch.get("target") or {}).items():
            tgts.setdefault(k, []).append(v.detach().cpu())
        ids += [str(i) for i in batch.get("id", [])]
    return {k: torch.cat(v) for k, v in outs.items()}, {k: torch.cat(v) for k, v in tgts.items()}, ids


def _leaves(d: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    """A nested dict flattened to dotted keys."""
    return {k: v for key, val in d.items() for k, v in
            (_leaves(val, f"{path}{key}.") if isinstance(val, Mapping) else {f"{path}{key}": val}).items()}


def config_diff(saved: Mapping[str, Any], now: Mapping[str, Any], resumable: Iterable[str] = ()) -> list[str]:
    """Differences between two (possibly nested) config dicts, ignoring dotted keys in ``resumable``."""
    a, b = _leaves(saved), _leaves(now)
    return [f"{k}: saved {a.get(k)!r}, now {b.get(k)!r}" for k in sorted((set(a) | set(b)) - set(resumable))
            if a.get(k) != b.get(k)]


def fit(model: torch.nn.Module, train_ds: torch.utils.data.Dataset, val_ds: torch.utils.data.Dataset | None,
        heads: Mapping[str, Head], cfg: FitConfig | Mapping[str, Any], out_dir: str | Path,
        progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
        resume: bool = False, *, recal_ds: torch.utils.data.Dataset | None = None,
        batch_transform: BatchTransform | None = None, params: Iterable[torch.nn.Parameter] | None = None,
        train_mode: Callable[[torch.nn.Module], None] | None = None,
        config_record: Mapping[str, Any] | None = None, resumable: Iterable[str] = (),
        show_progress: bool = False, desc: str = "training") -> FitResult:
    """Train ``model`` in place. ``config_record``: the task's whole config, saved with the resume
    state and compared on ``resume`` (dotted keys in :data:`RESUMABLE` and ``resumable`` may change)."""
    c, heads = FitConfig.from_any(cfg), dict(heads)
    monitor = c.monitor or next(iter(heads), "")
    if monitor not in heads:
        raise ValueError(f"monitor {monitor!r} is not a head ({sorted(heads)}); fit needs at least one head")
    out, record = Path(out_dir), {"fit": asdict(c), **(config_record or {})}
    score_name = heads[monitor].score_name
    with process_group(c.device) as d:
        device = select_device(c.device, d)
        cuda = device.type == "cuda"
        amp, cl = c.amp and cuda, c.channels_last and cuda
        if recal_ds is None and callable(getattr(train_ds, "unaugmented", None)):
            recal_ds = train_ds.unaugmented()
        bn_mode = c.bn_recalibration if recal_ds is not None else "none"
        has_val = val_ds is not None and len(val_ds) > 0
        quiet = not (d.main and show_progress)

        sampler = GlobalBatchSampler(len(train_ds), c.batch_size, d.world, d.rank, c.accumulate_steps, c.seed)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, pin_memory=cuda,
                                             num_workers=min(c.num_workers, cpus))
        torch.manual_seed(c.seed)
        np.random.seed(c.seed % (2**32))
        model.to(device, memory_format=torch.channels_last) if cl else model.to(device)
        if d.world > 1 and cuda and c.sync_batchnorm:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
               if d.world > 1 else model)
        trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
        optimizer = (torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam)(
            trainable, lr=c.lr, weight_decay=c.weight_decay)
        sched, total = torch.optim.lr_scheduler, c.epochs * sampler.steps
        scheduler = (sched.OneCycleLR(optimizer, c.lr, total_steps=total) if c.scheduler == "onecycle" else
                     sched.CosineAnnealingLR(optimizer, T_max=total) if c.scheduler == "cosine" else
                     sched.LambdaLR(optimizer, lambda _: 1.0))
        scaler = torch.amp.GradScaler("cuda", enabled=amp and not torch.cuda.is_bf16_supported())

        state_dir = out / "state"
        if (find_training_state(state_dir) is not None) != resume:
            raise InputError(out, "--resume: no saved training state here (state/state.json)" if resume else
                             "holds an earlier run's training state: pass --resume to continue it, "
                             "or choose a new --out")
        st: dict[str, Any] = {"epochs_completed": 0, "best_score": None, "best_epoch": None, "bad_epochs": 0,
                              "history": [], "val_outputs": []}  # the loop's state, saved as the resume meta
        best_state: dict[str, torch.Tensor] | None = None
        if resume:
            meta, best_state = load_training_state(state_dir, model, optimizer, scaler)
            diff = config_diff(meta.get("config", {}), record, (*RESUMABLE, *resumable))
            if diff:
                raise InputError(out / "config.toml", "the config differs from the interrupted run's: "
                                 + "; ".join(diff))
            st.update({k: meta[k] for k in st if k in meta})
            if meta.get("scheduler"):
                scheduler.load_state_dict(meta["scheduler"])
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
        history, epoch_outputs = st["history"], st["val_outputs"]
        columns = ["epoch", "train_loss", "val_loss", f"val_{score_name}", f"best_val_{score_name}", "lr"]

        def _recalibrate() -> None:
            batches = torch.utils.data.DataLoader(recal_ds, batch_size=c.eval_batch_size, shuffle=False)
            recalibrate_batchnorm(model, batches, lambda m, b: forward(m, _to(b["input"], device, cl), heads))

        def _validate() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
            return predict(model, val_ds, device, heads, c.eval_batch_size, amp, cl)[:2]

        stopped = early = False
        epoch_bar = tqdm(range(st["epochs_completed"], c.epochs), desc=desc, unit="epoch",
                         initial=st["epochs_completed"], total=c.epochs, disable=quiet)
        for epoch in epoch_bar:
            sampler.set_epoch(epoch)
            if hasattr(train_ds, "set_epoch"):
                train_ds.set_epoch(epoch)
            train_mode(net) if train_mode is not None else net.train()
            it = iter(loader)
            loss_sum = torch.zeros(2, dtype=torch.float64)
            step_bar = tqdm(range(sampler.steps), f"epoch {epoch + 1}/{c.epochs}", leave=False, disable=quiet)
            for step in step_bar:
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for a in range(c.accumulate_steps):
                    batch = next(it)
                    if batch_transform is not None:
                        k = c.seed * 1_000_003 + epoch * 10_007 + step * 101 + d.rank * c.accumulate_steps + a
                        batch = batch_transform(batch, torch.Generator().manual_seed(k % (2**63)), epoch)
                    last = d.world == 1 or a == c.accumulate_steps - 1  # DDP: gradients sync on the last only
                    with contextlib.nullcontext() if last else net.no_sync():
                        with autocast(device, amp):
                            outputs = forward(net, _to(batch["input"], device, cl), heads)
                        loss = total_loss(heads, {n: v.float() for n, v in outputs.items()},
                                          _to(batch["target"], device)) / c.accumulate_steps
                        scaler.scale(loss).backward()
                    step_loss += float(loss.detach())
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                loss_sum += torch.tensor([step_loss, 1.0], dtype=torch.float64)
                step_bar.set_postfix(loss=f"{step_loss:.4f}")
                if progress:
                    progress({"stage": "step", "epoch": epoch + 1, "epochs": c.epochs, "step": step + 1,
                              "steps": sampler.steps, "loss": step_loss})
            step_bar.close()
            if stopped:
                break
            if d.world > 1:
                dist.all_reduce(loss_sum)
                # every process scores the whole (small) validation set with identical weights and
                # BatchNorm statistics, so all agree on selection and early stopping
                for buf in model.buffers():
                    dist.broadcast(buf, 0)
            if bn_mode == "epoch":
                _recalibrate()
            score = val_loss = float("nan")
            if has_val:
                vo, vt = _validate()
                val_loss = float(total_loss(heads, vo, vt))
                score = heads[monitor].score(heads[monitor].decode(vo[monitor]), vt[monitor].numpy())
                if c.collect_val_outputs:
                    epoch_outputs.append({k: v.tolist() for k, v in vo.items()})
            improved = math.isfinite(score) and (st["best_score"] is None or score > st["best_score"])
            if improved:
                st.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0)
                best_state = cpu_state_dict(model)
            elif math.isfinite(score):
                st["bad_epochs"] += 1
            best = float("nan") if st["best_score"] is None else st["best_score"]
            row = {"epoch": epoch + 1, "train_loss": float(loss_sum[0] / loss_sum[1]), "val_loss": val_loss,
                   f"val_{score_name}": score, f"best_val_{score_name}": best,
                   "lr": float(optimizer.param_groups[0]["lr"])}
            history.append(row)
            st["epochs_completed"] = epoch + 1
            epoch_bar.set_postfix(loss=f"{row['train_loss']:.4f}", **{score_name: f"{score:.3f}"})
            if progress:
                progress({"stage": "epoch", "epochs": c.epochs, **row})
            early = bool(c.early_stopping_patience and st["bad_epochs"] >= c.early_stopping_patience)
            due = early or epoch + 1 == c.epochs or (c.state_every > 0 and (epoch + 1) % c.state_every == 0)
            if d.main and due:
                meta = {**st, "config": record, "score_name": score_name, "scheduler": scheduler.state_dict()}
                save_training_state(state_dir, model, optimizer, meta, scaler=scaler, keep_best=True,
                                    best_model=best_state if improved else None)
                write_text(out / "history.csv", pd.DataFrame(history, columns=columns).to_csv(index=False))
            d.barrier()
            if early:
                break
        epoch_bar.close()

        res = FitResult(model, history, len(history), st["best_epoch"], st["best_score"], score_name,
                        stopped=stopped, early_stopped=early, bn_recalibration=bn_mode, world_size=d.world,
                        device=device.type, amp=amp, channels_last=cl,
                        epoch_val_outputs=[{k: np.asarray(v) for k, v in e.items()} for e in epoch_outputs])
        if stopped:
            return res
        res.weights = "best" if (c.select == "best" and best_state is not None) else "last"
        if res.weights == "best":
            model.load_state_dict(best_state)
        if bn_mode == "final":
            _recalibrate()
        if has_val:
            res.val_outputs = _validate()[0]
        model.eval()
        return res
