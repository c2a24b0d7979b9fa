"""Drop-in for the PyTorch ecosystem: whatever a user does to a model (LoRA, quantization, hooks, pruning,
parametrizations, torch.fx, TorchScript, torch.func, forward-mode AD, double backward, FLOP counting, the meta device,
torch.compile, DDP, FSDP2, activation checkpointing), the converted network gives the upstream network's answer:
outputs and gradients within 1e-4 (quantized: 1e-3 of upstream quantized the same way), on every backend this machine
runs. What users do to a model is one table (``TRANSFORMS``) run by one test in both orders (transform, then convert;
convert, then transform), each row asserting which path runs: the plain case must run the fused op (so that "always
fall back" cannot pass), a transform that needs no fallback must keep it, and the cases that cannot fuse must not."""
from __future__ import annotations

import copy
import os
import warnings
from typing import Callable, NamedTuple

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils._python_dispatch import TorchDispatchMode

import dynamixer_ops
from dynamixer_ops import nn as dnn
from dynamixer_ops import inference, upstream
from helpers import count_calls
from dynamixer_ops.testing import MODEL_TOLERANCE, assert_close_rel, relative_error
from test_modules import randomize_, small_network

BACKENDS = dynamixer_ops.available_backends("cpu")
# Rows whose fused path is never taken (the layer runs the upstream code or the op's decomposition): the backend
# only has to be accepted, so the Triton interpreter (slow) is left out of them.
NOT_FUSED_BACKENDS = [b for b in BACKENDS if b != "triton"]
FUSED_OP = torch.ops.dynamixer_ops.dynamic_mix.default
N_MIXERS = 6                 # small_network(): three blocks of two mixers
TOL = MODEL_TOLERANCE[torch.float32]       # the pass rule's float32 network tolerance


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


# ---- the plain case runs the fused op (the battery's first row); the rule is checked at call time ----

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

def test_activation_is_a_softmax_module_that_fuses(seed):
    eager, fused = pair("cpu")
    for m in fused.modules():
        if isinstance(m, dnn.DynaMixerOp):
            assert type(m.activation) is nn.Softmax and m.activation.dim == -2 and m.fallback_reason() is None
    assert set(fused.state_dict()) == set(eager.state_dict())
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


# ---- the battery: what users do to a model, one row each, against the upstream network with the same transform ----

class TemperatureSoftmax(nn.Softmax):
    """A user's own activation: an nn.Softmax subclass (so only an exact-type check can tell it apart)."""

    def forward(self, logits):
        return (logits / 0.5).softmax(self.dim)


def mixers(net):
    """Every DynaMixerOp, upstream or fused (by class name, as convert() finds them)."""
    return [m for m in net.modules() if type(m).__name__ == "DynaMixerOp"]


def first_mixer(net):
    return mixers(net)[0]


def each_mixer(change):
    def apply(net):
        for m in mixers(net):
            change(m)
        return net
    return apply


def first_mixer_part(part, change):
    def apply(net):
        change(getattr(first_mixer(net), part) if part else first_mixer(net))
        return net
    return apply


HANDLES = []                # hooks the rows register, removed after each test (global hooks outlive a model)


def logging_hooks(module):
    """A pre-hook and a hook that log what they see in the root's ``hook_log`` and change the output (so it must
    be used)."""
    log = []

    def pre(mod, args):
        log.append(("pre", tuple(args[0].shape)))

    def post(mod, args, out):
        log.append(("post", tuple(out.shape)))
        return out * 1.5
    HANDLES.extend([module.register_forward_pre_hook(pre), module.register_forward_hook(post)])
    return log


def hooked(part):
    def apply(net):
        net.hook_log = logging_hooks(getattr(first_mixer(net), part) if part else first_mixer(net))
        return net
    return apply


def same_hook_calls_and_fused_again(fused, eager):
    # the training step's forward: the last two entries (fused_calls ran the fused network once more before it)
    steps = fused.hook_log[-2:], eager.hook_log[-2:]
    assert steps[0] == steps[1] and [kind for kind, _ in steps[1]] == ["pre", "post"], steps
    for h in HANDLES:
        h.remove()
    assert fused_calls(fused, image()) == N_MIXERS, "removing the hooks must bring the fused path back"


def global_hook(net):
    if not HANDLES:         # global: one registration covers both networks
        HANDLES.append(nn.modules.module.register_module_forward_pre_hook(lambda m, a: None))
    return net


def lora(net):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(net, peft.LoraConfig(r=4, target_modules=["compress", "generate"],
                                                    init_lora_weights=False))


def torchao_int8(net):
    torchao = pytest.importorskip("torchao.quantization")
    torchao.quantize_(net, torchao.Int8WeightOnlyConfig())
    return net


def quantize_dynamic(net):
    return torch.ao.quantization.quantize_dynamic(net, {nn.Linear})


def every_linear_quantized(fused, eager):
    def quantized(net):
        return sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in net.modules())
    assert quantized(fused) == quantized(eager) == sum(isinstance(m, nn.Linear) for m in small_network().modules())


def pruned(net):
    prune.l1_unstructured(first_mixer(net).generate, "weight", amount=0.3)
    return net


def output_follows_a_new_mask(fused, eager):
    for net in (eager, fused):             # a new mask after the first forward: the output must follow it
        first_mixer(net).generate.weight_mask[::3] = 0
    x = image()
    with torch.no_grad():
        assert_close_rel(fused(x), eager(x), TOL, "pruned, mask changed")


class Pick(nn.Module):
    """One output of a feature extractor's dict."""

    def __init__(self, extractor, key):
        super().__init__()
        self.extractor, self.key = extractor, key

    def forward(self, x):
        return self.extractor(x)[self.key]


def feature_extractor(net):
    from torchvision.models.feature_extraction import create_feature_extractor
    return Pick(create_feature_extractor(net, return_nodes={"head": "logits"}), "logits")


def every_layer_fuses_and_every_linear_kept(fused, eager):
    assert all(m.fuses() for m in fused.modules() if isinstance(m, (dnn.DynaMixerOp, dnn.DynaMixerBlock)))
    assert not any(type(m) is not nn.Linear and isinstance(m, nn.Linear) for m in fused.modules()), \
        "convert() changed the class of a Linear"


class Row(NamedTuple):
    apply: Callable[[nn.Module], nn.Module]     # the transform: changes the model in place or returns the new one
    fused: int                                  # fused-op calls per forward when convert() came first
    fused_if_transformed_first: int | None = None   # ... when the transform came first (None: the same)
    tol: float = TOL
    train: bool = True                          # outputs and every gradient; False: outputs under no_grad
    changes: float | None = None                # the transform changes the output by more than this (else moot)
    check: Callable | None = None               # further assertions on (fused, eager) after the step
    needs: str | None = None                    # a module to import, else skip


# One row per transform; a row's path is asserted (fused-op calls seen by the dispatcher), so a transform that loses
# the fused path without need, or a layer that always falls back, fails here.
TRANSFORMS = {
    "nothing": Row(lambda net: net, N_MIXERS, check=every_layer_fuses_and_every_linear_kept),
    "activation nn.Softmax(dim=2) (the same softmax)": Row(each_mixer(lambda m: setattr(m, "activation",
                                                                                        nn.Softmax(dim=2))), N_MIXERS),
    "activation nn.Softmax subclass": Row(each_mixer(lambda m: setattr(m, "activation", TemperatureSoftmax(dim=-2))),
                                          0, changes=1e-3),
    "activation softmax over the target token": Row(each_mixer(lambda m: setattr(m, "activation", nn.Softmax(-1))),
                                                    0, changes=1e-3),
    "activation sigmoid": Row(each_mixer(lambda m: setattr(m, "activation", nn.Sigmoid())), 0, changes=1e-3),
    "hooks on compress": Row(hooked("compress"), N_MIXERS - 1, check=same_hook_calls_and_fused_again),
    "hooks on generate": Row(hooked("generate"), N_MIXERS - 1, check=same_hook_calls_and_fused_again),
    # the block runs the upstream forward, which calls the hooked mixer as a module: the mixer itself still fuses
    "hooks on the mixer": Row(hooked(None), N_MIXERS, check=same_hook_calls_and_fused_again),
    "global module hook": Row(global_hook, 0),
    "LoRA (peft) on compress and generate": Row(lora, 0, changes=1e-3, needs="peft"),
    "torchao int8 weight-only": Row(torchao_int8, 0, tol=1e-3, train=False, changes=1e-4, needs="torchao"),
    "quantize_dynamic": Row(quantize_dynamic, 0, tol=1e-3, train=False, changes=1e-4, check=every_linear_quantized),
    "prune.l1_unstructured on a generate": Row(pruned, N_MIXERS - 1, check=output_follows_a_new_mask),
    "spectral_norm parametrization on a generate (train mode)": Row(first_mixer_part(
        "generate", torch.nn.utils.parametrizations.spectral_norm), N_MIXERS - 1, changes=1e-3),
    "weight_norm parametrization on a compress": Row(first_mixer_part(
        "compress", torch.nn.utils.parametrizations.weight_norm), N_MIXERS - 1),
    # Traced / scripted first, the model holds no DynaMixerOp for convert() to find: it runs the upstream code.
    "torch.fx.symbolic_trace": Row(torch.fx.symbolic_trace, N_MIXERS, 0),
    "torchvision create_feature_extractor": Row(feature_extractor, N_MIXERS, 0, needs="torchvision"),
    "torch.jit.script": Row(torch.jit.script, N_MIXERS, 0),
    "torch.fx.symbolic_trace, then torch.jit.script": Row(lambda net: torch.jit.script(torch.fx.symbolic_trace(net)),
                                                          N_MIXERS, 0),
}
ORDERS = ("transform, then convert", "convert, then transform")


def battery_cases():
    """(row, order, backend, fused-op calls expected). A row runs every backend in the first order in which it fuses
    (the Triton interpreter, slow, only there); its other order, and a row that runs the upstream code (where the
    backend is only accepted), run the first backend."""
    for name, row in TRANSFORMS.items():
        every_backend_ran = False
        for order in ORDERS if name != "nothing" else ORDERS[:1]:
            fused = row.fused if order == ORDERS[1] or row.fused_if_transformed_first is None \
                else row.fused_if_transformed_first
            backends = BACKENDS if fused and not every_backend_ran else BACKENDS[:1]
            every_backend_ran = every_backend_ran or len(backends) == len(BACKENDS)
            for backend in backends:
                yield pytest.param(name, order, backend, fused, id=f"{name}-{order}-{backend}")


@pytest.fixture
def remove_hooks():
    yield
    while HANDLES:
        HANDLES.pop().remove()


@pytest.mark.parametrize("name, order, backend, expected_fused_calls", list(battery_cases()))
def test_transform_gives_the_upstream_answer(name, order, backend, expected_fused_calls, seed, remove_hooks):
    row = TRANSFORMS[name]
    if row.needs:
        pytest.importorskip(row.needs)
    base = randomize_(small_network())
    x = image()
    before = base(x).detach()
    seed_for_the_transform = torch.randint(1 << 30, ()).item()   # LoRA's and spectral_norm's draws: the same in both

    def transform(net):
        torch.manual_seed(seed_for_the_transform)
        return row.apply(net)

    eager = transform(copy.deepcopy(base))
    if order == ORDERS[0]:
        fused = transform(copy.deepcopy(base))
        state = {k: v.clone() for k, v in fused.state_dict().items() if type(v) in (torch.Tensor, nn.Parameter)}
        fused = dynamixer_ops.convert(fused, backend=backend)
        after = fused.state_dict()
        assert all(torch.equal(after[k], v) for k, v in state.items()), "convert() changed the model's state"
    else:
        fused = transform(dynamixer_ops.convert(copy.deepcopy(base), backend=backend))
    if row.changes is not None:
        with torch.no_grad():
            assert relative_error(eager(x), before) > row.changes, "the transform must change the output here"
    assert fused_calls(fused, x) == expected_fused_calls
    if row.train:
        assert_same_training_step(fused, eager, x, f"{name}, {order}, {backend}", row.tol)
    else:
        with torch.no_grad():
            assert_close_rel(fused(x), eager(x), row.tol, f"{name}, {order}, {backend}")
    if row.check is not None:
        row.check(fused, eager)


def _optimized(net, backend):
    return dynamixer_ops.optimize(dynamixer_ops.convert(net, backend=backend))


@pytest.mark.parametrize("name, order", [pytest.param(name, order, id=f"{name}-{order}")
                                         for name in TRANSFORMS for order in ORDERS])
def test_transform_of_an_optimized_network_gives_the_upstream_answer(name, order, seed, remove_hooks, monkeypatch):
    """The battery on optimize(convert(upstream)), inference (eval, no_grad): the answer of the upstream network with
    the same transform, whichever path each block takes."""
    row = TRANSFORMS[name]
    if row.needs:
        pytest.importorskip(row.needs)
    backend = BACKENDS[0]
    base = randomize_(small_network()).eval()
    x = image()
    seed_for_the_transform = torch.randint(1 << 30, ()).item()

    def transform(net):
        torch.manual_seed(seed_for_the_transform)
        return row.apply(net)

    eager = transform(copy.deepcopy(base))
    if order == ORDERS[0]:
        ours = _optimized(transform(copy.deepcopy(base)), backend)
    else:
        ours = transform(_optimized(copy.deepcopy(base), backend))
    ran = count_calls(monkeypatch, inference, "_inference_forward")
    with torch.no_grad():
        assert_close_rel(ours(x), eager(x), row.tol, f"optimized: {name}, {order}")
    if name == "nothing":
        assert ran[0] == N_MIXERS // 2, "the seed's blocks took their own forward"


@pytest.mark.parametrize("activation", ["softmax", "user's own"])
def test_mixing_matrices_are_what_the_layer_applies_and_keep_the_fused_forward(activation, seed):
    eager = randomize_(small_network())
    if activation != "softmax":
        for m in mixers(eager):
            m.activation = TemperatureSoftmax(dim=-2)
    fused = dynamixer_ops.convert(copy.deepcopy(eager), backend="cpu")
    seen = []
    for m in mixers(eager):                 # the documented fallback: a hook on the upstream layer's activation
        m.activation.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    x = image()
    eager(x)
    block_inputs = []
    handles = [b.register_forward_pre_hook(lambda mod, args: block_inputs.append(args[0]))
               for b in fused.modules() if isinstance(b, dnn.DynaMixerBlock)]
    assert fused_calls(fused, x) == (N_MIXERS if activation == "softmax" else 0), "a block hook keeps the fused path"
    for h in handles:
        h.remove()
    blocks = [b for b in fused.modules() if isinstance(b, dnn.DynaMixerBlock)]
    for i, (block, h) in enumerate(zip(blocks, block_inputs)):
        B, H, W, C = h.shape
        with torch.no_grad():
            P_h = block.mix_h.mixing_matrices(h.transpose(1, 2))          # (B, W, S, H, H): leading dims kept
            P_w = block.mix_w.mixing_matrices(h)
        S = block.mix_h.num_head
        assert P_h.shape == (B, W, S, H, H) and P_w.shape == (B, H, S, W, W)
        # upstream: mix_h on (B*W, H, C), then mix_w on (B*H, W, C); seen holds their (N, S, L, L)
        assert_close_rel(P_h.flatten(0, 1), seen[2 * i], TOL, f"block {i} mix_h mixing matrices")
        assert_close_rel(P_w.flatten(0, 1), seen[2 * i + 1], TOL, f"block {i} mix_w mixing matrices")
        with torch.no_grad():               # and they are what the fused op applies
            mixed = block.mix_w.fused_mix(h) if activation == "softmax" else block.mix_w.mix(h)
        applied = torch.einsum("bhsij,bhisc->bhjsc", P_w, h.unflatten(-1, (S, C // S))).flatten(-2)
        assert_close_rel(mixed, applied, TOL, f"block {i} mix_w applies its mixing matrices")


def test_mixing_matrices_example_writes_a_png(tmp_path):
    import subprocess
    import sys
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "mixing_matrices.py")
    out = tmp_path / "maps.png"
    result = subprocess.run([sys.executable, example, "--img-size", "28", "--segments", "2", "--out", str(out)],
                            env=dict(os.environ, MPLBACKEND="Agg"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


# ---- FX and TorchScript of the models: the fused op stays in the graph ----

def mixer_count(model) -> int:
    return sum(isinstance(m, dnn.DynaMixerOp) for m in model.modules())


@pytest.fixture(scope="module")
def model_and_upstream():
    """models.dynamixer_<variant> at 28 px and the upstream network with its weights (built once per module: the
    tests below only trace or script them)."""
    from dynamixer_ops import models
    built = {}

    def get(variant):
        if variant not in built:
            torch.manual_seed(0)
            model = getattr(models, f"dynamixer_{variant}")(img_size=28, num_classes=10).eval()
            reference = upstream.eager_model(variant, img_size=28, num_classes=10).eval()
            reference.load_state_dict(model.state_dict())
            built[variant] = model, reference
        return built[variant]
    return get


# M and L (seconds each to build and script) with the heavy timm suite's switch, which scripts all three at 224.
SCRIPTED_VARIANTS = ["s", "m", "l"] if os.environ.get("DYNAMIXER_TIMM_SUITE") == "all" else ["s"]


@pytest.mark.parametrize("variant", SCRIPTED_VARIANTS)
def test_torchscript_models_call_the_fused_op(variant, model_and_upstream):
    model, reference = model_and_upstream(variant)
    scripted = torch.jit.script(model)
    assert str(scripted.inlined_graph).count("dynamixer_ops::dynamic_mix") == mixer_count(model)
    x = torch.randn(2, 3, 28, 28)
    assert fused_calls(scripted, x) == mixer_count(model)
    with torch.no_grad():
        assert_close_rel(scripted(x), reference(x), TOL, f"scripted dynamixer_{variant}")


def test_fx_symbolic_trace_and_feature_extractor_of_a_model_keep_the_fused_op(model_and_upstream):
    create_feature_extractor = pytest.importorskip("torchvision.models.feature_extraction").create_feature_extractor
    model, reference = model_and_upstream("s")
    x = torch.randn(2, 3, 28, 28)
    traced = torch.fx.symbolic_trace(model)
    calls = [n for n in traced.graph.nodes if n.op == "call_function" and n.target is dnn.fused_dynamic_mix]
    assert len(calls) == mixer_count(model)
    extractor = create_feature_extractor(model, return_nodes={"norm": "tokens", "head": "logits"})
    with torch.no_grad():
        ref_tokens = reference.forward_features(x)
        assert_close_rel(traced(x), reference(x), TOL, "symbolic_trace of dynamixer_s")
        features = extractor(x)
        assert_close_rel(features["tokens"], ref_tokens, TOL, "create_feature_extractor of dynamixer_s: tokens")
        assert_close_rel(features["logits"], reference(x), TOL, "create_feature_extractor of dynamixer_s: logits")
    assert fused_calls(traced, x) == fused_calls(extractor, x) == mixer_count(model)


def test_torchscript_saved_model_loads_and_runs_in_a_fresh_process(tmp_path, seed):
    import subprocess
    import sys
    eager, fused = pair("auto")
    x = image()
    torch.jit.save(torch.jit.script(fused), tmp_path / "model.pt")
    with torch.no_grad():
        torch.save({"x": x, "y": eager(x)}, tmp_path / "io.pt")
    program = (
        "import sys, torch, dynamixer_ops\n"      # the import registers the op's kernels
        "m = torch.jit.load(sys.argv[1])\n"
        "io = torch.load(sys.argv[2])\n"
        "y = m(io['x'])\n"
        "err = ((y - io['y']).norm() / io['y'].norm()).item()\n"
        "assert 'dynamixer_ops::dynamic_mix' in str(m.inlined_graph), 'the fused op is not in the loaded graph'\n"
        "assert err <= 1e-4, err\n"
        "print('ok', err)\n")
    result = subprocess.run([sys.executable, "-c", program, str(tmp_path / "model.pt"), str(tmp_path / "io.pt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stdout + result.stderr[-3000:]


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
