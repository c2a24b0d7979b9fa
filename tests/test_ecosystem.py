"""Drop-in for the PyTorch ecosystem: whatever a user does to a model (LoRA, quantization, hooks, pruning,
torch.func, forward-mode AD, double backward, FLOP counting, the meta device, torch.compile, DDP, FSDP2, activation
checkpointing), the converted network gives the upstream network's answer: outputs and gradients within 1e-4
(quantized: 1e-3 of upstream quantized the same way), on every backend this machine runs. The plain case must still
run the fused op (so that "always fall back" cannot pass) and the cases that cannot fuse must not."""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dynamixer_ops
from dynamixer_ops import nn as dnn
from dynamixer_ops import upstream
from dynamixer_ops.testing import MODEL_TOLERANCE, assert_close_rel, relative_error
from test_modules import randomize_, small_network

BACKENDS = dynamixer_ops.available_backends("cpu")
# Rows whose fused path is never taken (the layer runs the upstream code or the op's decomposition): the backend
# only has to be accepted, so the Triton interpreter (slow) is left out of them.
NOT_FUSED_BACKENDS = [b for b in BACKENDS if b != "triton"]
FUSED_OP = torch.ops.dynamixer_ops.dynamic_mix.default
N_MIXERS = 6                 # small_network(): three blocks of two mixers
TOL = MODEL_TOLERANCE[torch.float32]     # a network's outputs and gradients (dynamixer_ops.testing)


class OpLog(TorchDispatchMode):
    """Every op the dispatcher runs while active."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def pair(backend: str, **kwargs):
    """An upstream network with fresh random weights and its converted copy."""
    eager = randomize_(small_network(**kwargs))
    return eager, dynamixer_ops.convert(copy.deepcopy(eager), backend=backend)


def image(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 2, 28, 28)


def assert_same_training_step(fused, eager, x, what, tol=TOL, params=None):
    """Same output, same input gradient and same gradient for every (or the named) trainable parameter."""
    outs, grads = [], []
    for net in (fused, eager):
        xi = x.clone().requires_grad_()
        out = net(xi)
        out.backward(torch.ones_like(out) / out.numel() ** 0.5 + out.detach())
        named = [(n.removeprefix("_orig_mod."), p) for n, p in net.named_parameters()     # torch.compile's prefix
                 if p.requires_grad and (params is None or params(n))]
        outs.append(out.detach())
        grads.append({"input": xi.grad, **{n: p.grad for n, p in named}})
    assert_close_rel(outs[0], outs[1], tol, f"{what}: output")
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 1
    for name, g in grads[1].items():
        assert grads[0][name] is not None, f"{what}: {name} got no gradient"
        assert_close_rel(grads[0][name], g, tol, f"{what}: grad of {name}")


def fused_calls(model, *args) -> int:
    with OpLog() as log:
        model(*args)
    return log.ops.count(FUSED_OP)


@pytest.fixture(autouse=True)
def _quiet_fallback_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DynaMixerOp runs the upstream")
        yield


# ---- the plain case runs the fused op; the rule is checked at call time ----

@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_network_runs_the_fused_op_for_every_mixer(backend, seed):
    eager, fused = pair(backend)
    x = image()
    assert fused_calls(fused, x) == N_MIXERS
    assert all(m.fuses() for m in fused.modules() if isinstance(m, (dnn.DynaMixerOp, dnn.DynaMixerBlock)))
    assert_same_training_step(fused, eager, x, f"plain {backend}")
    assert not any(type(m) is not nn.Linear and isinstance(m, nn.Linear) for m in fused.modules()), \
        "convert() changed the class of a Linear"


def test_fallback_warns_once_naming_the_reason(seed):
    _, fused = pair("cpu")
    fused.network[0][0].attn.mix_h.compress.register_forward_hook(lambda *args: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused(image())
        fused(image())
    messages = [str(w.message) for w in caught if "DynaMixerOp runs the upstream" in str(w.message)]
    assert len(messages) <= 1 and all("compress has hooks" in m for m in messages)


# ---- the mixer's activation: part of the layer, as upstream ----

class TemperatureSoftmax(nn.Softmax):
    """A user's own activation: an nn.Softmax subclass (so only an exact-type check can tell it apart)."""

    def forward(self, logits):
        return (logits / 0.5).softmax(self.dim)


ACTIVATIONS = {
    "temperature softmax (nn.Softmax subclass)": lambda: TemperatureSoftmax(dim=-2),
    "softmax over the target token": lambda: nn.Softmax(dim=-1),
    "sigmoid": lambda: nn.Sigmoid(),
}


@pytest.mark.parametrize("order", ["transform, then convert", "convert, then transform"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("backend", NOT_FUSED_BACKENDS)
def test_replaced_activation_is_used(backend, name, order, seed):
    eager = randomize_(small_network())
    x = image()
    before = eager(x).detach()

    def replace(net):
        for m in net.modules():
            if type(m).__name__ == "DynaMixerOp":
                m.activation = ACTIVATIONS[name]()
        return net

    replace(eager)
    assert relative_error(eager(x), before) > 1e-3, "the activation must change the output for this test to mean it"
    if order == "transform, then convert":
        fused = dynamixer_ops.convert(replace(copy.deepcopy(eager)), backend=backend)
    else:
        fused = replace(dynamixer_ops.convert(copy.deepcopy(eager), backend=backend))
    assert fused_calls(fused, x) == 0
    assert all(not m.fuses() for m in fused.modules() if isinstance(m, dnn.DynaMixerOp))
    assert_same_training_step(fused, eager, x, f"{name}, {order}, {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_activation_is_a_softmax_module_that_fuses(backend, seed):
    eager, fused = pair(backend)
    for m in fused.modules():
        if isinstance(m, dnn.DynaMixerOp):
            assert type(m.activation) is nn.Softmax and m.activation.dim == -2 and m.fallback_reason() is None
    assert set(fused.state_dict()) == set(eager.state_dict())
    for m in fused.modules():                # dim=2 is the same softmax on the 4-D logits: still fused
        if isinstance(m, dnn.DynaMixerOp):
            m.activation = nn.Softmax(dim=2)
    assert fused_calls(fused, image()) == N_MIXERS


@pytest.mark.parametrize("when", ["before convert", "after convert"])
@pytest.mark.parametrize("backend", NOT_FUSED_BACKENDS)
def test_hook_on_activation_sees_the_mixing_matrices(backend, when, seed):
    eager = randomize_(small_network())
    fused = copy.deepcopy(eager)
    seen = {"eager": [], "fused": []}

    def hook_all(net, key):
        for m in net.modules():
            if type(m).__name__ == "DynaMixerOp":
                m.activation.register_forward_hook(lambda mod, args, out: seen[key].append(out.detach()))

    hook_all(eager, "eager")
    if when == "before convert":
        hook_all(fused, "fused")
        fused = dynamixer_ops.convert(fused, backend=backend)
    else:
        fused = dynamixer_ops.convert(fused, backend=backend)
        hook_all(fused, "fused")
    x = image()
    assert fused_calls(fused, x) == 0
    assert_same_training_step(fused, eager, x, f"hooked activation {when}, {backend}")
    # fused: the logged forward, then the training step's; eager: the training step's
    assert len(seen["fused"]) == 2 * N_MIXERS and len(seen["eager"]) == N_MIXERS
    for got, ref in zip(seen["fused"][N_MIXERS:], seen["eager"]):
        assert got.shape == ref.shape and got.dim() == 4                # (B, S, L, L)
        assert_close_rel(got, ref, TOL, f"mixing matrices seen by the hook {when}")


# ---- what users do to the Linears: LoRA, quantization, hooks, pruning ----

@pytest.mark.parametrize("backend", NOT_FUSED_BACKENDS)
def test_lora_adapters_on_compress_and_generate(backend, seed):
    peft = pytest.importorskip("peft")
    eager, fused = pair(backend)
    config = peft.LoraConfig(r=4, target_modules=["compress", "generate"], init_lora_weights=False)
    eager, fused = peft.get_peft_model(eager, config), peft.get_peft_model(fused, config)
    fused.load_state_dict(eager.state_dict())
    x = image()
    with torch.no_grad(), eager.disable_adapter():
        without = eager(x)
    assert relative_error(eager(x), without) > 1e-3, "the adapters must change the output for this test to mean it"
    assert fused_calls(fused, x) == 0
    assert_same_training_step(fused, eager, x, f"LoRA {backend}", params=lambda n: "lora_" in n)


@pytest.mark.parametrize("backend", NOT_FUSED_BACKENDS)
def test_torchao_int8_weight_only(backend, seed):
    torchao = pytest.importorskip("torchao.quantization")
    eager, fused = pair(backend)
    x = image()
    float_out = eager(x).detach()
    for net in (eager, fused):
        torchao.quantize_(net, torchao.Int8WeightOnlyConfig())
    with torch.no_grad():
        ref = eager(x)
        assert relative_error(ref, float_out) > 1e-4, "quantization must change the output for this test to mean it"
        assert_close_rel(fused(x), ref, 1e-3, f"torchao int8 {backend}")


@pytest.mark.parametrize("backend", NOT_FUSED_BACKENDS)
def test_dynamic_quantization_quantizes_every_linear(backend, seed):
    eager, fused = pair(backend)
    eager, fused = (torch.ao.quantization.quantize_dynamic(net, {nn.Linear}) for net in (eager, fused))

    def quantized(net):
        return sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in net.modules())

    assert quantized(fused) == quantized(eager) == sum(isinstance(m, nn.Linear) for m in small_network().modules())
    x = image()
    with torch.no_grad():
        assert_close_rel(fused(x), eager(x), 1e-3, f"quantize_dynamic {backend}")


@pytest.mark.parametrize("where", ["compress", "generate", "mixer", "global"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_are_called_as_upstream_and_their_results_used(backend, where, seed):
    eager, fused = pair(backend)
    logs = []
    handles = []
    for net in (eager, fused):
        log = []
        logs.append(log)
        op = net.network[0][0].attn.mix_h
        target = {"compress": op.compress, "generate": op.generate, "mixer": op}.get(where)

        def pre(module, args, log=log):
            log.append(("pre", tuple(args[0].shape)))

        def post(module, args, out, log=log):
            log.append(("post", tuple(out.shape)))
            return out * 1.5            # a hook that changes the output: the network must use it

        if target is None:
            if net is fused:            # global hooks apply to both networks at once: register them once
                handles += [nn.modules.module.register_module_forward_pre_hook(lambda m, a: None)]
            continue
        handles += [target.register_forward_pre_hook(pre), target.register_forward_hook(post)]
    try:
        x = image()
        if where == "global":
            assert fused_calls(fused, x) == 0
            assert_same_training_step(fused, eager, x, f"global hook {backend}")
            return
        assert_same_training_step(fused, eager, x, f"hook on {where} {backend}")
        assert logs[0] == logs[1] and len(logs[1]) == 2, (logs[0], logs[1])
    finally:
        for h in handles:
            h.remove()
    assert fused_calls(fused, x) == N_MIXERS, "removing the hooks must bring the fused path back"


@pytest.mark.parametrize("backend", NOT_FUSED_BACKENDS)
def test_pruning_follows_the_mask(backend, seed):
    import torch.nn.utils.prune as prune
    eager, fused = pair(backend)
    for net in (eager, fused):
        prune.l1_unstructured(net.network[0][0].attn.mix_h.generate, "weight", amount=0.3)
    x = image()
    assert_same_training_step(fused, eager, x, f"pruned {backend}")
    for net in (eager, fused):             # a new mask after the first forward: the output must follow it
        net.network[0][0].attn.mix_h.generate.weight_mask[::3] = 0
    with torch.no_grad():
        assert_close_rel(fused(x), eager(x), TOL, f"pruned, mask changed {backend}")


# ---- torch.func, forward-mode AD, double backward ----

@pytest.mark.parametrize("backend", NOT_FUSED_BACKENDS)
def test_jvp_and_forward_ad(backend, seed):
    eager, fused = pair(backend)
    x, t = image(), image()
    _, ref = torch.func.jvp(eager, (x,), (t,))
    _, got = torch.func.jvp(fused, (x,), (t,))
    assert_close_rel(got, ref, TOL, f"jvp {backend}")
    fwAD = torch.autograd.forward_ad
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(fused(fwAD.make_dual(x, t))).tangent
    assert tangent is not None
    assert_close_rel(tangent, ref, TOL, f"forward AD {backend}")


@pytest.mark.parametrize("backend", NOT_FUSED_BACKENDS)
def test_per_sample_gradients(backend, seed):
    eager, fused = pair(backend)
    x = image(3)
    results = []
    for net in (eager, fused):
        params = {k: v.detach() for k, v in net.named_parameters()}

        def loss(p, xi, net=net):
            return torch.func.functional_call(net, p, (xi.unsqueeze(0),)).square().sum()

        results.append(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x))
    for name, ref in results[0].items():
        assert results[1][name].shape == ref.shape
        assert_close_rel(results[1][name], ref, TOL, f"per-sample grad of {name} {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_of_the_network_runs_the_fused_op(backend, seed):
    eager, fused = pair(backend)
    x = torch.randn(3, 2, 2, 28, 28)
    with OpLog() as log:
        got = torch.func.vmap(fused)(x)
    assert log.ops.count(FUSED_OP) == N_MIXERS, "vmapped x is just more sequences for the fused op"
    assert_close_rel(got, torch.func.vmap(eager)(x), TOL, f"vmap {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_double_backward(backend, seed):
    eager, fused = pair(backend)
    x = image()
    penalties = []
    for net in (eager, fused):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(net(xi).square().sum(), xi, create_graph=True)
        gx.square().sum().backward()
        penalties.append({n: p.grad for n, p in net.named_parameters()})
    for name, ref in penalties[0].items():
        assert_close_rel(penalties[1][name], ref, 1e-3, f"double backward: {name} {backend}")


# ---- counting, the meta device ----

def test_flop_counter_counts_the_op_as_upstream(seed):
    eager, fused = pair("cpu")
    counts = []
    for net in (eager, fused):
        xi = image().requires_grad_()
        with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            net(xi).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[1] == counts[0]


def test_flop_counter_dynamixer_s_is_the_papers_7_3_gmacs():
    from dynamixer_ops import models
    counts = []
    for build in (lambda: upstream.eager_model("s"), models.dynamixer_s):
        torch.manual_seed(0)
        net = build().eval()
        with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            net(torch.randn(1, 3, 224, 224))
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1]
    assert abs(counts[1] / 2e9 - 7.30) < 0.01, counts


def test_meta_device_build_and_run():
    with torch.device("meta"):
        eager = small_network()
        fused = dynamixer_ops.convert(copy.deepcopy(eager))
        built = dnn.DynaMixerBlock(24, resolution=7, num_head=2)
        x = torch.empty(2, 2, 28, 28)
        assert fused(x).shape == eager(x).shape == (2, 5)
        assert built(torch.empty(2, 7, 7, 24)).device.type == "meta"
    fused.to_empty(device="cpu")            # deferred init: materialise, then load real weights
    fused.load_state_dict(randomize_(small_network()).state_dict())
    assert fused_calls(fused, image()) == N_MIXERS


# ---- torch.compile of the whole network, fullgraph, no graph breaks ----

def test_compile_fullgraph_converted_network_no_graph_breaks_and_training_step(seed):
    eager, fused = pair("auto")
    x = image()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fused)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(fused, fullgraph=True)
    assert_same_training_step(compiled, eager, x, "compiled converted network")


@pytest.mark.parametrize("variant", ["s", "m", "l"])
def test_compile_models_no_graph_breaks(variant):
    from dynamixer_ops import models
    model = getattr(models, f"dynamixer_{variant}")(img_size=28, num_classes=10)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 28, 28))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_training_step_of_a_model_traces_the_fused_backward():
    """aot_eager: AOTAutograd traces forward and backward (as Inductor would) without Inductor's compile time; the
    backward graph must hold the fused backward op, not the differentiable fallback."""
    from dynamixer_ops import models
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    graphs = []

    def backend(gm, inputs):
        def keep(graph, graph_inputs):
            graphs.append({str(n.target) for n in graph.graph.nodes})
            return make_boxed_func(graph.forward)
        return aot_module_simplified(gm, inputs, fw_compiler=keep, bw_compiler=keep)

    torch.manual_seed(0)
    model = models.dynamixer_s(img_size=28, num_classes=10)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 28, 28)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    assert_same_training_step(compiled, reference, x, "compiled dynamixer_s")
    assert len(graphs) == 2
    assert "dynamixer_ops.dynamic_mix.default" in graphs[0]
    assert "dynamixer_ops.dynamic_mix_backward.default" in graphs[1]


# ---- distributed and memory-saving wrappers ----

@pytest.fixture
def process_group(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp(process_group, seed):
    eager, fused = pair("auto")
    ddp = [nn.parallel.DistributedDataParallel(net) for net in (eager, fused)]
    assert_same_training_step(ddp[1], ddp[0], image(), "DDP")


def test_fsdp2(process_group, seed):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh
    eager, fused = pair("auto")
    mesh = init_device_mesh("cpu", (1,))
    for net in (eager, fused):
        for stage in net.network:
            for block in stage if isinstance(stage, nn.Sequential) else ():
                fully_shard(block, mesh=mesh)
        fully_shard(net, mesh=mesh)
    x = image()
    outs = [net(x) for net in (eager, fused)]
    for out in outs:
        out.sum().backward()
    assert_close_rel(outs[1], outs[0], TOL, "FSDP2 output")
    for (name, p), (_, q) in zip(eager.named_parameters(), fused.named_parameters()):
        assert_close_rel(q.grad.full_tensor(), p.grad.full_tensor(), TOL, f"FSDP2 grad of {name}")


def test_activation_checkpointing(seed):
    eager, fused = pair("auto")

    class Checkpointed(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)

    plain = copy.deepcopy(fused)
    for net in (eager, fused):
        for stage in net.network:
            if isinstance(stage, nn.Sequential):
                for i in range(len(stage)):
                    stage[i] = Checkpointed(stage[i])
    assert_same_training_step(fused, eager, image(), "checkpointed")
    x = image()
    for net in (fused, plain):             # checkpointing recomputes the same ops: bit-equal gradients
        net.zero_grad()
        net(x).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert torch.equal(p.grad, q.grad), name
