"""Run in a fresh venv holding only a torch and the wheel, outside the source tree (CI runs it on several torch x
Python stacks with the one wheel it built): the package imports from site-packages, its native library loads, the
CPU op matches the float64 reference forward and backward, a tiny model runs forward and backward on the fused op,
torch.compile and torch.export keep the op, and the console script is there."""
import copy
import os
import shutil
import sys
import time

import torch

import dynamixer_ops
import dynamixer_triton  # noqa: F401  (installed as its own top-level package)
from dynamixer_ops import deploy, dynamic_mix, upstream
from dynamixer_ops.reference import reference_forward
from dynamixer_ops.testing import make_inputs, reference_outputs, relative_error, tolerance

start = time.time()
for module in (dynamixer_ops, dynamixer_triton):
    assert "site-packages" in module.__file__, f"{module.__name__} imported from {module.__file__}, not the wheel"
libraries = deploy.native_library_paths()     # raises if the native library did not load
assert all(".abi3." in os.path.basename(p) for p in libraries), libraries
assert "cpu" in dynamixer_ops.available_backends("cpu"), dynamixer_ops.unavailable_backends()
# A wheel with the CUDA kernels: their library loads wherever torch has CUDA (a GPU or not), and is left alone
# (with its reason) where torch is a CPU-only build.
if any(name.startswith("_C_cuda.") for name in os.listdir(os.path.dirname(dynamixer_ops.__file__))):
    if torch.version.cuda:
        assert len(libraries) == 2, dynamixer_ops.unavailable_backends()["cuda"]
        assert torch._C._dispatch_has_kernel_for_dispatch_key("dynamixer_ops_C::dynamic_mix_out", "CUDA")
    else:
        assert "CPU-only" in dynamixer_ops.unavailable_backends()["cuda"], dynamixer_ops.unavailable_backends()

torch.manual_seed(0)
inputs = [t.requires_grad_() for t in make_inputs((3,), 7, 24, 2, 2, dtype=torch.float32, device="cpu")]
y = dynamic_mix(*inputs, 2, backend="cpu")
grad_y = torch.randn_like(y)
grads = torch.autograd.grad(y, inputs, grad_y)
ref_y, ref_grads = reference_outputs(inputs, 2, grad_y)
errors = [relative_error(y, ref_y), *(relative_error(g, r) for g, r in zip(grads, ref_grads))]
assert max(errors) <= tolerance(torch.float32, "cpu"), errors
# bfloat16 (the widened or bf16-dot paths) and float64 forward against the reference too
for dtype in (torch.bfloat16, torch.float64):
    args = make_inputs((2,), 7, 24, 2, 2, dtype=dtype, device="cpu")
    err = relative_error(dynamic_mix(*args, 2, backend="cpu"), reference_forward(*[t.double() for t in args], 2))
    assert err <= tolerance(dtype, "cpu"), (dtype, err)

# A tiny DynaMixer (28x28 input, patch 7: mixing lengths 4 and 2), and a copy with its mixers on the fused op.
eager = upstream.VisionModel(img_size=28, patch_size=7, num_classes=3, layers=[1, 1], transitions=[True, False],
                             num_heads=[2, 4], mlp_ratios=[2, 2], embed_dims=[16, 32], reduced_dims=[2, 2]).eval()
fused = dynamixer_ops.convert(copy.deepcopy(eager), backend="cpu")
images = torch.randn(2, 3, 28, 28)
out = fused(images)
out.square().mean().backward()
assert relative_error(out, eager(images)) <= 10 * tolerance(torch.float32, "cpu")

# torch.compile: the op alone in one graph (fullgraph), and the model; torch.export keeps the op in the graph.
compiled_op = torch.compile(lambda *t: dynamic_mix(*t, 2, backend="cpu"), fullgraph=True)
assert relative_error(compiled_op(*inputs), ref_y) <= tolerance(torch.float32, "cpu")
with torch.no_grad():
    compiled = torch.compile(fused)
    assert relative_error(compiled(images), eager(images)) <= 10 * tolerance(torch.float32, "cpu")
    ep = torch.export.export(fused, (images,))
    calls = [n for n in ep.graph.nodes if n.op == "call_function" and "dynamixer_ops" in str(n.target)]
    assert calls, "the exported graph lost dynamixer_ops::dynamic_mix"
    assert relative_error(ep.module()(images), eager(images)) <= 10 * tolerance(torch.float32, "cpu")

assert shutil.which("dynamixer-bench", path=os.path.dirname(sys.executable)), "no dynamixer-bench script"
cuda = (os.path.basename(libraries[1]) if len(libraries) > 1
        else f"not loaded: {dynamixer_ops.unavailable_backends().get('cuda')}")
print(f"release install OK on torch {torch.__version__}, Python {sys.version.split()[0]}: dynamixer_ops "
      f"{dynamixer_ops.__version__} from {os.path.dirname(dynamixer_ops.__file__)} "
      f"({os.path.basename(libraries[0])}; CUDA kernels {cuda}); cpu op max rel err {max(errors):.1e}; "
      f"tiny model forward + backward, torch.compile, torch.export ({len(calls)} op calls) "
      f"in {time.time() - start:.0f} s")
