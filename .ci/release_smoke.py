"""Run in a fresh venv holding only the pinned torch and the wheel built from the sdist, outside the source tree:
the package imports from site-packages, the CPU op matches the float64 reference, a tiny model runs forward and
backward on the fused op, and the console script is there."""
import copy
import os
import shutil
import sys

import torch

import dynamixer_ops
import dynamixer_triton  # noqa: F401  (installed as its own top-level package)
from dynamixer_ops import dynamic_mix, upstream
from dynamixer_ops.testing import make_inputs, reference_outputs, relative_error, tolerance

for module in (dynamixer_ops, dynamixer_triton):
    assert "site-packages" in module.__file__, f"{module.__name__} imported from {module.__file__}, not the wheel"
assert "cpu" in dynamixer_ops.available_backends("cpu"), dynamixer_ops.unavailable_backends()

torch.manual_seed(0)
inputs = [t.requires_grad_() for t in make_inputs((3,), 7, 24, 2, 2, dtype=torch.float32, device="cpu")]
y = dynamic_mix(*inputs, 2, backend="cpu")
grad_y = torch.randn_like(y)
grads = torch.autograd.grad(y, inputs, grad_y)
ref_y, ref_grads = reference_outputs(inputs, 2, grad_y)
errors = [relative_error(y, ref_y), *(relative_error(g, r) for g, r in zip(grads, ref_grads))]
assert max(errors) <= tolerance(torch.float32, "cpu"), errors

# A tiny DynaMixer (28x28 input, patch 7: mixing lengths 4 and 2), and a copy with its mixers on the fused op.
eager = upstream.VisionModel(img_size=28, patch_size=7, num_classes=3, layers=[1, 1], transitions=[True, False],
                             num_heads=[2, 4], mlp_ratios=[2, 2], embed_dims=[16, 32], reduced_dims=[2, 2]).eval()
fused = dynamixer_ops.convert(copy.deepcopy(eager), backend="cpu")
images = torch.randn(2, 3, 28, 28)
out = fused(images)
out.square().mean().backward()
assert relative_error(out, eager(images)) <= 10 * tolerance(torch.float32, "cpu")
assert shutil.which("dynamixer-bench", path=os.path.dirname(sys.executable)), "no dynamixer-bench script"
print(f"release install OK: dynamixer_ops {dynamixer_ops.__version__} from "
      f"{os.path.dirname(dynamixer_ops.__file__)}; "
      f"cpu op max rel err {max(errors):.1e}; tiny model forward + backward on {dynamixer_ops.available_backends('cpu')}")
