"""OpenVINO: ``openvino.convert_model`` of models that use the op, by every route (the model traced by OpenVINO or,
with ``dynamo=True``, exported by it; an ExportedProgram; an ExportedProgram decomposed by
``deploy.decompositions()``; an ONNX file), each run by OpenVINO at batch 1 and 3 through one graph with a dynamic
batch and compared with eager PyTorch (float32, 1e-5 relative); and, with OpenVINO imported, every other tracer
still keeps the op."""
from __future__ import annotations

import pytest
import torch

from dynamixer_ops import convert, deploy, optimize
from dynamixer_ops.testing import assert_close_rel, relative_error
from test_export import Mixer      # the bare op at odd shapes, along H and W

ov = pytest.importorskip("openvino")

TOL = 1e-5
TRACE_BATCH = 2
BATCHES = (1, 3)        # both through the one converted graph, traced or exported at batch 2
OP = torch.ops.dynamixer_ops.dynamic_mix.default


def _seed_network():
    """The seed repository's network (its code verbatim, tests/seed_dynamixer.py), small, converted: mixing lengths
    7 and 3, d = 1 and 8."""
    from test_forks import seed_network
    return convert(seed_network()).eval()


MODELS = {       # name: (the model, or the session fixture that holds it; its input's shape without the batch)
    "op": (Mixer, (7, 7, 48)),
    "dynamixer_s": ("dynamixer_s_56", (3, 56, 56)),
    "seed": (_seed_network, (3, 49, 49)),
    "seed+optimize": (lambda: optimize(_seed_network()), (3, 49, 49)),
}


class Case:
    """A model, its eager outputs at each batch and its ExportedProgram (dynamic batch), built once per module."""

    def __init__(self, name, request):
        torch.manual_seed(0)
        factory, self.shape = MODELS[name]
        self.model = (request.getfixturevalue(factory) if isinstance(factory, str) else factory()).eval()
        with torch.no_grad():
            self.expected = {batch: self.model(self.input(batch)) for batch in BATCHES}
        self._program = None

    def input(self, batch):
        return torch.randn(batch, *self.shape, generator=torch.Generator().manual_seed(batch))

    def export(self):
        if self._program is None:
            batch = torch.export.Dim("batch", min=1, max=64)
            self._program = torch.export.export(self.model, (self.input(TRACE_BATCH),),
                                                dynamic_shapes={"x": {0: batch}})
        return self._program


@pytest.fixture(scope="module")
def cases(request):
    made = {}

    def case(name) -> Case:
        if name not in made:
            made[name] = Case(name, request)
        return made[name]
    return case


def _check(converted, case, route):
    assert converted.inputs[0].partial_shape[0].is_dynamic, f"{route}: the batch axis is not dynamic"
    compiled = ov.compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for batch in BATCHES:
        got = torch.from_numpy(compiled(case.input(batch).numpy())[0])
        assert_close_rel(got, case.expected[batch], TOL, f"{route}, batch {batch}")
        print(f"{route}, batch {batch}: relative error {relative_error(got, case.expected[batch]):.1e}")   # -s


@pytest.mark.parametrize("name", MODELS)
def test_convert_model_traces_the_op_as_its_decomposition(cases, name):
    """``openvino.convert_model(model, example_input=x)``: OpenVINO traces the model (torch.jit.trace), and the op is
    traced as its decomposition, with no argument about it."""
    case = cases(name)
    _check(ov.convert_model(case.model, example_input=case.input(TRACE_BATCH)), case, "convert_model(model)")


@pytest.mark.parametrize("name", MODELS)
def test_convert_model_of_an_exported_program(cases, name):
    """``openvino.convert_model(torch.export.export(model, ...))``: the program keeps the op; OpenVINO's own
    run_decompositions records its decomposition."""
    case = cases(name)
    ep = case.export()
    assert any(node.target is OP for node in ep.graph.nodes)
    _check(ov.convert_model(ep), case, "convert_model(ExportedProgram)")
    assert any(node.target is OP for node in ep.graph.nodes), "converting changed the user's program"


def test_convert_model_with_dynamo(cases):
    """``openvino.convert_model(model, example_input=x, dynamo=True)``: OpenVINO exports the model itself (then
    lowers the program as above)."""
    case = cases("op")
    converted = ov.convert_model(case.model, example_input=case.input(TRACE_BATCH), dynamo=True,
                                 input=[ov.PartialShape([-1, *case.shape])])
    _check(converted, case, "convert_model(model, dynamo=True)")


@pytest.mark.parametrize("name", ["dynamixer_s", "seed"])
def test_convert_model_of_a_decomposed_exported_program(cases, name):
    case = cases(name)
    table = torch.export.default_decompositions()
    table.update(deploy.decompositions())
    _check(ov.convert_model(case.export().run_decompositions(table)), case, "convert_model(decomposed program)")


@pytest.mark.parametrize("name", ["dynamixer_s", "seed"])
def test_convert_model_of_an_onnx_file(cases, name, request, tmp_path):
    """``torch.onnx.export(model, ..., dynamo=True)`` to a file (DynaMixer-S: the file onnxruntime runs in
    test_export.py), then ``openvino.convert_model(path)``."""
    pytest.importorskip("onnxscript")
    case = cases(name)
    if name == "dynamixer_s":
        path = request.getfixturevalue("dynamixer_s_onnx")[1]
    else:
        batch = torch.export.Dim("batch", min=1, max=64)
        program = torch.onnx.export(case.model, (case.input(TRACE_BATCH),), dynamo=True,
                                    dynamic_shapes={"x": {0: batch}})
        path = str(tmp_path / "model.onnx")
        program.save(path)
    _check(ov.convert_model(path), case, "convert_model(ONNX file)")


def test_other_tracers_keep_the_op_while_openvino_is_imported(cases):
    """Only OpenVINO's conversion decomposes the op: torch.jit.trace, torch.export and its run_decompositions() keep
    it in a process that has imported openvino."""
    case = cases("op")
    x = case.input(TRACE_BATCH)
    traced = torch.jit.trace(case.model, (x,))
    assert "dynamixer_ops::dynamic_mix" in str(traced.inlined_graph)
    ep = case.export()
    for program in (ep, ep.run_decompositions()):
        assert sum(node.target is OP for node in program.graph.nodes) == 2
    with torch.no_grad():
        assert_close_rel(traced(x), case.model(x), TOL, "torch.jit.trace")

