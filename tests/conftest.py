import os

import torch

# Triton kernels run on the CPU through the interpreter where no GPU is visible. This must be decided before
# any module that defines a Triton kernel is imported (dynamixer_ops imports them).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import _hypothesis_profiles  # noqa: E402,F401  (registers --hypothesis-profile=long / quick before hypothesis reads it)

import dynamixer_ops.ops  # noqa: E402

# Every output buffer a kernel receives starts as NaN, so an element it forgets to write fails the comparison.
dynamixer_ops.ops.POISON_OUTPUTS = True


@pytest.fixture
def seed(request):
    """A fresh seed per test (new inputs every run), printed on failure so that a failure can be replayed."""
    fixed = os.environ.get("DYNAMIXER_SEED")
    value = int(fixed) if fixed is not None else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value} (replay with DYNAMIXER_SEED={value})")
    return value


@pytest.fixture(scope="session")
def dynamixer_s_56():
    """DynaMixer-S at 56 px (mixing lengths 8 and 4), 10 classes, in eval mode: the small DynaMixer-S of the
    deployment tests."""
    from dynamixer_ops.models import dynamixer_s
    torch.manual_seed(0)
    return dynamixer_s(num_classes=10, img_size=56).eval()


@pytest.fixture(scope="session")
def dynamixer_s_onnx(dynamixer_s_56, tmp_path_factory):
    """:func:`dynamixer_s_56` exported once per session by ``torch.onnx.export`` with a dynamic batch (traced at
    batch 2) and saved: onnxruntime (test_export.py) and OpenVINO (test_openvino.py) run the one file.
    ``(program, path)``."""
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(dynamixer_s_56, (torch.randn(2, 3, 56, 56),), dynamo=True,
                                dynamic_shapes={"x": {0: batch}})
    path = tmp_path_factory.mktemp("onnx") / "dynamixer_s.onnx"
    program.save(str(path))
    return program, str(path)
