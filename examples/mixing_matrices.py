"""Plot the mixing matrices of one image, as people plot attention maps.

Each DynaMixerOp mixes the L tokens of a row (``mix_w``) or a column (``mix_h``) with a matrix P (S, L, L) per
sequence: ``y[j] = sum_i P[s, i, j] x[i]``, one matrix per segment s. :meth:`DynaMixerOp.mixing_matrices` computes
them from the layer's input by calling the layer's own ``compress``, ``generate`` and ``activation``, so they are
what the layer applies, and the network keeps its fused forward: a forward pre-hook on the block (not on a mixer,
which would make the block run the upstream code) keeps the block's input.

    python examples/mixing_matrices.py                       # untrained DynaMixer-S, a random image
    python examples/mixing_matrices.py --image cat.jpg --checkpoint dynamixer_s.pth --out maps.png
"""
from __future__ import annotations

import argparse

import torch

from dynamixer_ops import models


def block_inputs(model, x):
    """The input (B, H, W, C) of every DynaMixerBlock, from one forward of ``model`` on ``x``."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if type(module).__name__ == "DynaMixerBlock":
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: seen.__setitem__(name, (mod, args[0].detach()))))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", help="an image file (default: a random image)")
    parser.add_argument("--checkpoint", help="DynaMixer-S weights (default: untrained)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--block", type=int, default=0, help="which DynaMixerBlock (in forward order)")
    parser.add_argument("--segments", type=int, default=4, help="how many segments to plot")
    parser.add_argument("--out", default="mixing_matrices.png")
    args = parser.parse_args(argv)

    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    model = models.dynamixer_s(img_size=args.img_size).eval()
    if args.checkpoint:
        models.load_checkpoint(model, args.checkpoint)
    if args.image:
        from PIL import Image
        from torchvision.transforms.functional import normalize, pil_to_tensor, resize
        img = resize(pil_to_tensor(Image.open(args.image).convert("RGB")).float() / 255, [args.img_size] * 2)
        x = normalize(img, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))[None]
    else:
        x = torch.randn(1, 3, args.img_size, args.img_size)

    name, (block, h) = list(block_inputs(model, x).items())[args.block]
    with torch.no_grad():
        rows = block.mix_w.mixing_matrices(h)                       # (B, H, S, W, W): mixing along each row
        cols = block.mix_h.mixing_matrices(h.transpose(1, 2))       # (B, W, S, H, H): along each column
    middle = h.shape[1] // 2
    n = min(args.segments, rows.shape[2])
    fig, axes = plt.subplots(2, n, figsize=(3 * n, 6), squeeze=False)
    for s in range(n):
        for ax, P, what in ((axes[0, s], rows, "row"), (axes[1, s], cols, "column")):
            ax.imshow(P[0, middle, s].numpy(), cmap="viridis")
            ax.set_title(f"{what} {middle}, segment {s}", fontsize=9)
            ax.set_xlabel("target token j")
            ax.set_ylabel("source token i")
    fig.suptitle(f"{name}: mixing matrices P[s, i, j] (each column sums to 1)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"{name}: rows {tuple(rows.shape)}, columns {tuple(cols.shape)} -> {args.out}")


if __name__ == "__main__":
    main()
