"""Deployment: torch.export (dynamic batch, run_decompositions), ONNX in onnxruntime, and an AOTInductor package
run by a C++ program without Python; each compared with eager PyTorch (float32, 1e-5 relative)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from dynamixer_ops import deploy, dynamic_mix
from dynamixer_ops.nn import DynaMixerBlock
from dynamixer_ops.ops import BACKWARD_OP, FORWARD_OP, inferred_schema

from dynamixer_ops.testing import assert_close_rel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
OP = torch.ops.dynamixer_ops.dynamic_mix.default
BATCHES = (1, 5)        # both through one exported graph (traced at batch 2)
TRACE_BATCH = 2


class Mixer(torch.nn.Module):
    """The bare op at odd shapes: L = 7, C/S = 24, d = 3, mixing along H through a transposed view and along W."""

    def __init__(self, L=7, C=48, S=2, d=3):
        super().__init__()
        self.compress = torch.nn.Linear(C, S * d)
        self.generate = torch.nn.Linear(L * d, L * L)
        self.S = S

    def forward(self, x):   # x: (B, H, W, C), H = W = L
        args = (self.compress.weight, self.compress.bias, self.generate.weight, self.generate.bias, self.S)
        along_h = dynamic_mix(x.transpose(1, 2), *args).transpose(1, 2)
        along_w = dynamic_mix(x, *args)
        return along_h * 2 + along_w


def _input(batch, L=7, C=48):
    return torch.randn(batch, L, L, C)


def _batch_dim():
    return {"x": {0: torch.export.Dim("batch", min=1, max=64)}}


def _op_count(graph_module) -> int:
    return sum(node.target is OP for node in graph_module.graph.nodes)


@pytest.fixture(scope="module")
def mixer():
    torch.manual_seed(0)
    return Mixer().eval()


@pytest.fixture(scope="module")
def exported_mixer(mixer):
    return torch.export.export(mixer, (_input(TRACE_BATCH),), dynamic_shapes=_batch_dim())


# ---------------------------------------------------------------------------------------------------------------
# The op as the native library defines it

def test_native_library_defines_the_schemas_python_infers():
    """ops.py defines the ops from its kernels' annotations when the library is missing: the two must agree."""
    deploy.native_library_path()      # raises unless the library (not ops.py) defined the ops
    for qualname in (FORWARD_OP, BACKWARD_OP):
        namespace, name = qualname.split("::")
        schema = getattr(getattr(torch.ops, namespace), name).default._schema
        assert str(schema) == qualname + inferred_schema(qualname)


def test_without_the_native_library_python_defines_the_ops():
    """A checkout without the built library still has the op (schema from the annotations), on the Python
    backends, with its autograd."""
    code = """if True:
        import sys, types, torch
        stub = types.ModuleType("dynamixer_ops._library")
        stub.LIBRARY_PATH, stub.LOAD_ERROR = None, "hidden by the test"
        stub.CUDA_LIBRARY_PATH, stub.CUDA_LOAD_ERROR = None, "hidden by the test"
        sys.modules["dynamixer_ops._library"] = stub
        import dynamixer_ops
        from dynamixer_ops.reference import reference_forward
        assert dynamixer_ops.unavailable_backends()["cpu"] == "hidden by the test"
        args = (torch.randn(6, 48), torch.randn(6), torch.randn(49, 21), torch.randn(49), 2)
        x = torch.randn(3, 7, 48, requires_grad=True)
        y = dynamixer_ops.dynamic_mix(x, *args)
        y.sum().backward()
        assert torch.allclose(y, reference_forward(x, *args), rtol=1e-5, atol=1e-5) and x.grad is not None
        print(torch.ops.dynamixer_ops.dynamic_mix.default._schema)
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip() == str(OP._schema)


def test_native_library_has_no_python_dependency():
    """A C++ program loads the library without libpython: it must not need libpython or libtorch_python."""
    with open(deploy.native_library_path(), "rb") as f:
        data = f.read()
    for needle in (b"libtorch_python", b"libpython", b"PyInit_", b"PyModule_Create"):
        assert needle not in data, f"{deploy.native_library_path()} refers to {needle.decode()}"


def test_native_kernel_refuses_a_python_backend_clearly():
    """The library's own (Python-free) kernel runs the native backends only; in Python the registry's kernel runs,
    so call the library's kernel through its dispatch key."""
    x = torch.randn(1, 2, 7, 48)
    args = (x, torch.randn(6, 48), torch.randn(6), torch.randn(49, 21), torch.randn(49), 2)
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    y = OP.redispatch(keys, *args, "cpu")
    assert_close_rel(y, deploy.decompositions()[OP](*args, "cpu"), TOL, "native kernel")
    with pytest.raises(RuntimeError, match="backend 'triton' is implemented in Python.*backend='auto' or 'cpu'"):
        OP.redispatch(keys, *args, "triton")


# ---------------------------------------------------------------------------------------------------------------
# torch.export

def test_export_dynamic_batch_keeps_the_op(mixer, exported_mixer):
    assert _op_count(exported_mixer.graph_module) == 2
    module = exported_mixer.module()
    for batch in BATCHES:
        x = _input(batch)
        assert_close_rel(module(x), mixer(x), TOL, f"exported module, batch {batch}")


@pytest.mark.parametrize("leading", [(3,), (2, 3), (2, 3, 2)], ids=["N", "A,B", "A,B,E"])
def test_export_dynamic_leading_dims_of_the_op(leading, seed):
    """Every leading dim of the op's x dynamic at once; run at other sizes than traced."""
    L, C, S, d = 7, 48, 2, 3
    mixer = Mixer(L, C, S, d)
    args = (mixer.compress.weight, mixer.compress.bias, mixer.generate.weight, mixer.generate.bias, S)

    class Op(torch.nn.Module):
        def forward(self, x):
            return dynamic_mix(x, *args)

    dims = {i: torch.export.Dim(f"lead{i}", min=1, max=64) for i in range(len(leading))}
    ep = torch.export.export(Op(), (torch.randn(*leading, L, C),), dynamic_shapes={"x": dims})
    assert _op_count(ep.graph_module) == 1
    for sizes in ((1,) * len(leading), tuple(n + 2 for n in leading)):
        x = torch.randn(*sizes, L, C)
        assert_close_rel(ep.module()(x), Op()(x), TOL, f"exported op, leading dims {sizes}")


def test_run_decompositions_keeps_the_op_or_decomposes_it_on_request(mixer, exported_mixer):
    """Default: the op survives (it is opaque to the core-ATen table). With deploy.decompositions(): ATen only."""
    kept = exported_mixer.run_decompositions()
    assert _op_count(kept.graph_module) == 2
    table = torch.export.default_decompositions()
    table.update(deploy.decompositions())
    decomposed = exported_mixer.run_decompositions(table)
    targets = {str(node.target) for node in decomposed.graph_module.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "dynamixer_ops" in t], targets
    assert "aten._softmax.default" in targets
    for batch in BATCHES:
        x = _input(batch)
        assert_close_rel(kept.module()(x), mixer(x), TOL, f"run_decompositions(), batch {batch}")
        assert_close_rel(decomposed.module()(x), mixer(x), TOL, f"decomposed program, batch {batch}")


# ---------------------------------------------------------------------------------------------------------------
# ONNX

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _onnx_ops(model) -> set:
    ops = set()
    graphs = [model.graph] + [f for f in model.functions]
    for graph in graphs:
        ops |= {(node.domain or "", node.op_type) for node in graph.node}
    return ops


def _run_onnx(program, batches, make_input, reference):
    model = program.model_proto
    domains = {op[0] for op in _onnx_ops(model)}
    assert domains == {""}, f"non-standard ONNX domains in the graph: {domains - {''}}"
    assert not model.functions, [f.name for f in model.functions]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in batches:
        x = make_input(batch)
        (got,) = session.run(None, {name: x.numpy()})
        assert_close_rel(torch.from_numpy(got), reference(x), TOL, f"onnxruntime, batch {batch}")
    return model


def test_onnx_export_of_the_op_with_a_dynamic_batch(mixer):
    """No argument about the op: torch.onnx.export traces its decomposition into standard ONNX ops."""
    program = torch.onnx.export(mixer, (_input(TRACE_BATCH),), dynamo=True, dynamic_shapes=_batch_dim())
    model = _run_onnx(program, BATCHES, _input, mixer)
    op_types = {t for _, t in _onnx_ops(model)}
    assert {"Softmax", "MatMul"} <= op_types, op_types
    opset = {o.domain: o.version for o in model.opset_import}[""]
    assert opset >= 18, opset      # torch.onnx's default opset (20 with torch 2.14.1); printed with -s
    print(f"ONNX opset {opset}, ops {sorted(op_types)}")
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value, "the batch axis is not dynamic"


def test_onnx_export_of_a_decomposed_exported_program(mixer, exported_mixer):
    """An ExportedProgram (which keeps the op) goes to ONNX after run_decompositions(deploy.decompositions())."""
    program = torch.onnx.export(exported_mixer.run_decompositions(deploy.decompositions()), dynamo=True)
    _run_onnx(program, BATCHES, _input, mixer)


def test_onnx_export_of_dynamixer_s(dynamixer_s_56, dynamixer_s_onnx):
    model, (program, _) = dynamixer_s_56, dynamixer_s_onnx

    def image(batch):
        return torch.randn(batch, 3, 56, 56)

    with torch.no_grad():
        _run_onnx(program, BATCHES, image, model)


# ---------------------------------------------------------------------------------------------------------------
# AOTInductor, run by a C++ program without Python

def _write_raw(path, t):
    with open(path, "wb") as f:
        np.asarray([t.dim(), *t.shape], dtype=np.int64).tofile(f)
        t.contiguous().numpy().astype(np.float32).tofile(f)


def _read_raw(path):
    with open(path, "rb") as f:
        ndim = int(np.fromfile(f, dtype=np.int64, count=1)[0])
        shape = np.fromfile(f, dtype=np.int64, count=ndim)
        return torch.from_numpy(np.fromfile(f, dtype=np.float32).reshape(shape))


def _build_runner(out_dir) -> str:
    from torch.utils import cpp_extension
    exe = os.path.join(out_dir, "aoti_runner")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [os.environ.get("CXX", "c++"), "-std=c++20", "-O1", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           os.path.join(ROOT, "examples", "aoti_runner.cpp"), "-o", exe]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    for lib in cpp_extension.library_paths():
        cmd += [f"-L{lib}", f"-Wl,-rpath,{lib}"]
    # --no-as-needed: the package's model library needs libtorch.so loaded, though the runner calls nothing in it
    cmd += ["-Wl,--no-as-needed", "-ltorch", "-ltorch_cpu", "-lc10", "-ldl"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"building the C++ runner failed:\n{' '.join(cmd)}\n{done.stderr[-4000:]}"
    return exe


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the C++ runner loads the library with dlopen")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler to build the runner")
def test_aoti_package_runs_in_cpp_without_python(tmp_path):
    """One DynaMixerBlock (L = 7, C/S = 24, d = 3; mix_h on a transposed view), exported with a dynamic batch,
    compiled by AOTInductor, then run at batch 1 and 5 by examples/aoti_runner.cpp: a C++ program that links
    libtorch and dlopens the native library. The runner checks that no libpython is in its process."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package
    torch.manual_seed(0)
    block = DynaMixerBlock(48, resolution=7, num_head=2, reduced_dim=3).eval()
    ep = torch.export.export(block, (_input(TRACE_BATCH),), dynamic_shapes=_batch_dim())
    assert _op_count(ep.graph_module) == 2
    package = aoti_compile_and_package(ep, package_path=str(tmp_path / "block.pt2"))
    exe = _build_runner(str(tmp_path))

    inputs = {batch: _input(batch) for batch in BATCHES}
    argv = [exe, deploy.native_library_path(), package]
    for batch, x in inputs.items():
        _write_raw(tmp_path / f"in{batch}.bin", x)
        argv += [str(tmp_path / f"in{batch}.bin"), str(tmp_path / f"out{batch}.bin")]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"the C++ runner failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}"
    assert "without Python" in done.stdout

    in_process = aoti_load_package(package)
    with torch.no_grad():
        for batch, x in inputs.items():
            expected = block(x)
            assert_close_rel(_read_raw(tmp_path / f"out{batch}.bin"), expected, TOL, f"C++ runner, batch {batch}")
            assert_close_rel(in_process(x), expected, TOL, f"aoti_load_package, batch {batch}")
