"""Train a small DynaMixer on scikit-learn's digits, fused or eager, on one process or under torchrun.

The 8x8 digits (1,797 images, 10 classes) are upsampled to ``--img-size`` (default 28): with patch size 4 the
first stage mixes L = 7 tokens along each axis and the second L = 3 (``--img-size 56``: 14 and 7). The model is the
upstream network
(:mod:`dynamixer_ops.upstream`), converted to the fused layers with :func:`dynamixer_ops.convert` unless
``--backend eager``; the same seed gives the same initial weights and data order for every backend.

    python examples/train.py                               # fused, backend "auto"
    python examples/train.py --backend eager               # the upstream eager layers
    torchrun --nproc_per_node=2 examples/train.py          # DistributedDataParallel (gloo on CPU, nccl on GPU)

Needs scikit-learn. Prints one line per epoch and a final line with the held-out accuracy.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import dynamixer_ops
from dynamixer_ops import upstream


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="auto",
                   help="'eager' (upstream layers), or a dynamic_mix backend: 'auto', "
                        + ", ".join(repr(b) for b in dynamixer_ops.available_backends()))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--dims", default="48,96", help="channels of the two stages")
    p.add_argument("--depths", default="2,2", help="blocks in the two stages")
    p.add_argument("--heads", default="4,8", help="segments (num_head) of the two stages")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (per process)")
    p.add_argument("--device", default=None, help="default: cuda:<local rank> when available, else cpu")
    p.add_argument("--log-every", type=int, default=0, help="also print every N steps (0: per epoch only)")
    p.add_argument("--metrics", default=None, help="write the final metrics as JSON here (rank 0)")
    p.add_argument("--save", default=None, help="save the trained state_dict here (rank 0)")
    p.add_argument("--dump-weights", default=None, help="every rank saves its weights to DIR/rank<r>.pt")
    return p.parse_args(argv)


def digits(img_size: int, seed: int):
    """(train_x, train_y, test_x, test_y): a stratified 75/25 split, upsampled bilinearly and standardised."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0          # (1797, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.long)
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=0.25, stratify=y.numpy(),
                                           random_state=seed)
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    mean, std = x[idx_train].mean(), x[idx_train].std()
    x = (x - mean) / std
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def build_model(args) -> torch.nn.Module:
    """A two-stage DynaMixer (the upstream network): L = img/patch in stage 1, halved in stage 2."""
    dims = [int(v) for v in args.dims.split(",")]
    depths = [int(v) for v in args.depths.split(",")]
    heads = [int(v) for v in args.heads.split(",")]
    model = upstream.VisionModel(
        depths, img_size=args.img_size, patch_size=args.patch_size, in_chans=1, num_classes=10, embed_dims=dims,
        transitions=[True] * (len(dims) - 1) + [False], num_heads=heads,
        reduced_dims=[2] * len(dims), mlp_ratios=[2] * len(dims))
    if args.backend != "eager":
        dynamixer_ops.convert(model, backend=args.backend)
    return model


@torch.no_grad()
def evaluate(model, x, y, batch_size, device, rank, world):
    """Loss and accuracy on (x, y), each rank taking every world-th example, summed across ranks."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)      # loss sum, correct, count
    xs, ys = x[rank::world], y[rank::world]
    for i in range(0, len(ys), batch_size):
        xb, yb = xs[i:i + batch_size].to(device), ys[i:i + batch_size].to(device)
        logits = model(xb)
        totals += torch.stack([F.cross_entropy(logits, yb, reduction="sum").double(),
                               (logits.argmax(1) == yb).sum().double(), torch.tensor(len(yb), device=device).double()])
    if world > 1:
        dist.all_reduce(totals)
    model.train()
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()


def progress(epoch: int, epochs: int, done: int, total: int, loss: float, width: int = 30) -> None:
    """A one-line progress bar on stderr, redrawn in place (terminals only: logs stay clean)."""
    filled = width * done // max(total, 1)
    end = "\n" if done >= total else ""
    print(f"\repoch {epoch}/{epochs} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} loss {loss:.4f}",
          end=end, file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = args.device is None and torch.cuda.is_available()
    device = torch.device(args.device or (f"cuda:{local_rank}" if use_cuda else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.threads:
        torch.set_num_threads(args.threads)
    log = print if rank == 0 else (lambda *a, **k: None)
    show_progress = rank == 0 and sys.stderr.isatty()

    train_x, train_y, test_x, test_y = digits(args.img_size, args.seed)
    torch.manual_seed(args.seed)            # same initial weights on every rank and for every backend
    model = build_model(args).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)

    train_set = TensorDataset(train_x, train_y)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    steps = args.epochs * len(loader)
    if args.max_steps is not None:
        steps = min(steps, args.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))

    backend = args.backend if args.backend == "eager" else f"fused/{args.backend}"
    log(f"digits: {len(train_y)} train / {len(test_y)} test images at {args.img_size}x{args.img_size}; "
        f"DynaMixer dims {args.dims} depths {args.depths} ({n_params:,} parameters), mixing L = "
        f"{', '.join(str(r) for r in upstream.stage_resolutions(args.img_size, args.patch_size, [True, False]))}; "
        f"{backend} on {device} x{world}, {torch.get_num_threads()} thread(s) per process; {steps} steps")
    loss_before, acc_before = evaluate(model, test_x, test_y, 256, device, rank, world)
    log(f"before training: test loss {loss_before:.4f} acc {acc_before:.4f}")

    step, start, history = 0, time.perf_counter(), []
    model.train()
    for epoch in range(args.epochs):
        if step >= steps:
            break
        sampler.set_epoch(epoch)
        running, count = 0.0, 0
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            running, count = running + loss.item(), count + 1
            if show_progress:
                progress(epoch + 1, args.epochs, count, min(len(loader), steps - step + count), loss.item())
            if args.log_every and step % args.log_every == 0:
                log(f"  step {step}/{steps} loss {loss.item():.4f}")
            if step >= steps:
                break
        test_loss, test_acc = evaluate(model, test_x, test_y, 256, device, rank, world)
        history.append({"epoch": epoch + 1, "step": step, "train_loss": running / max(count, 1),
                        "test_loss": test_loss, "test_acc": test_acc})
        log(f"epoch {epoch + 1:2d}/{args.epochs} step {step:4d} train loss {running / max(count, 1):.4f} "
            f"test loss {test_loss:.4f} acc {test_acc:.4f} ({time.perf_counter() - start:.1f} s)")
    elapsed = time.perf_counter() - start

    metrics = {"backend": backend, "world_size": world, "steps": step, "seconds": elapsed,
               "test_loss_before": loss_before, "test_acc_before": acc_before,
               "test_loss": history[-1]["test_loss"] if history else loss_before,
               "test_acc": history[-1]["test_acc"] if history else acc_before, "history": history,
               "parameters": n_params}
    log(f"final: test acc {metrics['test_acc']:.4f} test loss {metrics['test_loss']:.4f} after {step} steps in "
        f"{elapsed:.1f} s ({backend}, {world} process(es), torch {torch.__version__})")
    plain = model.module if world > 1 else model
    if args.dump_weights:
        os.makedirs(args.dump_weights, exist_ok=True)
        torch.save(plain.state_dict(), os.path.join(args.dump_weights, f"rank{rank}.pt"))
    if rank == 0 and args.save:
        torch.save({"model": plain.state_dict(), "args": vars(args)}, args.save)
    if rank == 0 and args.metrics:
        with open(args.metrics, "w") as f:
            json.dump(metrics, f, indent=1)
    if world > 1:
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
