"""The network benchmark: a fused DynaMixer against the upstream one with the same weights, checked against
the float64 upstream network, then timed by :mod:`.timing` (images/s, inference and training step)."""
from __future__ import annotations

import contextlib
import math

import torch

from ..nn import convert
from ..testing import MODEL_TOLERANCE, relative_error
from .op import DTYPE_BY_NAME, compile_mode
from .timing import BASELINES, first_line, time_side_by_side

MODELS = ("dynamixer_s", "dynamixer_m", "dynamixer_l")
# The optimizers --optimizer accepts for the training step.
OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


class BenchError(Exception):
    """A problem the user can fix (missing module, unusable request); reported without a traceback."""


def _load_model_modules():
    try:
        from .. import models, upstream
    except ImportError as exc:
        raise BenchError(f"--model needs dynamixer_ops.models and dynamixer_ops.upstream, which failed to import "
                         f"({exc})") from None
    return models, upstream


def run_model(args, device, dtype, backends, skipped, log) -> list[dict]:
    models, upstream = _load_model_modules()
    name = args.model
    variant = name.removeprefix("dynamixer_")
    torch.manual_seed(0)
    kw = {"img_size": args.img_size}
    base = upstream.eager_model(variant, **kw).eval()
    state = base.state_dict()
    size = (3, args.img_size, args.img_size)
    B = args.batch
    x = torch.randn(B, *size, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    n_check = min(B, 2 if device.type == "cpu" else 8)
    # float64 upstream network: the truth for outputs and parameter gradients on the first n_check images
    ref_net = upstream.eager_model(variant, **kw).double().eval()
    ref_net.load_state_dict(state)
    ref_net = ref_net.to(device)       # on the device x is on
    x64 = x[:n_check].double()
    ref_out = ref_net(x64)
    names, params = zip(*ref_net.named_parameters())
    ref_grads = dict(zip(names, torch.autograd.grad(ref_out.square().mean(), params)))
    ref_out = ref_out.detach()
    del ref_net

    # --autocast: parameters and input stay in --dtype, the forward runs under torch.autocast (as users train)
    amp_dtype = DTYPE_BY_NAME[args.autocast] if args.autocast else None
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    nets, results = {}, []
    for bname in backends:
        row = {"model": name, "backend": bname, "images": B, "dtype": str(dtype).replace("torch.", ""),
               "autocast": args.autocast, "device": str(device), "status": "ok", "message": None}
        if bname in skipped:
            nets[bname] = None
            results.append(dict(row, status="SKIPPED", message=skipped[bname]))
            continue
        try:
            if bname in BASELINES:
                net = upstream.eager_model(variant, **kw)
            elif args.convert:
                net = convert(upstream.eager_model(variant, **kw), backend=bname)
            else:
                net = models.create(variant, backend=bname, **kw)
            net.load_state_dict(state)
            net = net.to(device=device, dtype=dtype)
            if bname == "compile":
                net = torch.compile(net, mode=compile_mode(device, args.compile_mode))
            nets[bname] = net
        except Exception as exc:
            nets[bname] = None
            results.append(dict(row, status="ERROR", message=first_line(exc)))
            continue
        results.append(row)

    # correctness, in eval mode (no dropout / drop-path), against the float64 upstream network
    errs = {}
    for row in results:
        net = nets.get(row["backend"])
        if net is None or row["status"] != "ok":
            continue
        try:
            net.eval()
            with amp():
                out = net(x[:n_check])
            # parameters matched by name: a fused module may register them in another order
            named = dict(getattr(net, "_orig_mod", net).named_parameters())
            grads = torch.autograd.grad(out.double().square().mean(), [named[n] for n in ref_grads])
            g = torch.cat([t.double().flatten() for t in grads])
            r = torch.cat([t.flatten() for t in ref_grads.values()])
            errs[row["backend"]] = max(relative_error(out, ref_out), relative_error(g, r))
        except Exception as exc:
            row.update(status="ERROR", message=first_line(exc))
    own = errs.get("eager")
    tol = max(MODEL_TOLERANCE[amp_dtype or dtype], 2 * own if own is not None and math.isfinite(own) else 0)
    for row in results:
        if row["backend"] in errs:
            err = errs[row["backend"]]
            row.update(error=err if math.isfinite(err) else None, tolerance=tol)
            if not err <= tol:
                row.update(status="WRONG", message=f"relative error {err:.3g} > tolerance {tol:.3g}")

    mode_of = {"fwd": "inference", "fwdbwd": "train_step"}
    out_rows = []
    for direction in args.direction:
        mode = mode_of[direction]
        rows, runs = {}, {}
        for row in results:
            r = dict(row, mode=mode)
            rows[r["backend"]] = r
            net = nets.get(r["backend"])
            if r["status"] != "ok":
                continue
            if mode == "inference":
                net.eval()

                def run(net=net):
                    with torch.no_grad(), amp():
                        return net(x)
            else:
                net.train()
                opt = OPTIMIZERS[args.optimizer](net.parameters(), lr=1e-6)
                labels = torch.randint(0, 1000, (B,), generator=torch.Generator().manual_seed(2)).to(device)

                def run(net=net, opt=opt, labels=labels):
                    opt.zero_grad(set_to_none=True)
                    with amp():
                        loss = torch.nn.functional.cross_entropy(net(x).float(), labels)
                    loss.backward()
                    opt.step()
            runs[r["backend"]] = run
        # one block per sample: a network call is long enough to time alone
        medians = time_side_by_side(runs, rows, device, warmup_ms=args.warmup, repeat_ms=args.repeat,
                                    rounds=args.rounds, blocks=1)
        for bname, med in medians.items():
            rows[bname]["images_per_s"] = B / med
        out_rows += rows.values()
        log(f"[{name}, {B} images, {mode}] " + ", ".join(
            f"{n} {r['images_per_s']:.3g} img/s" if r.get("images_per_s") else f"{n} {r['status']}"
            for n, r in rows.items()))
    return out_rows
