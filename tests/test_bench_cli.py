"""dynamixer-bench (dynamixer_ops/bench/): argument errors, a quick run's JSON/PNG, WRONG backends, conventions."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dynamixer_ops import backends as registry
from dynamixer_ops import bench
from dynamixer_ops.ops import forward_flops
from dynamixer_ops.reference import reference_backward, reference_forward, upstream_mix
from dynamixer_ops.testing import (MODEL_SHAPES, assert_matches_reference, linear_init_inputs, reference_floors,
                                   reference_outputs)

# A tiny odd shape and few sequences, so that a whole run takes seconds on a busy CPU.
TINY = ["--device", "cpu", "--quick", "--shapes", "7,48,2,1", "--sequences", "5", "--warmup", "1",
        "--repeat", "4", "--rounds", "2"]


def run_main(argv, capsys):
    """(exit code, stdout, stderr) of bench.main(argv) in this process."""
    try:
        code = bench.main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_explains_every_option(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for option in ("--backends", "--shapes", "--batch", "--sequences", "--dtype", "--direction", "--device",
                   "--threads", "--warmup", "--repeat", "--rounds", "--json", "--plot", "--quick", "--model",
                   "--compile-mode", "--autocast", "--convert", "--img-size"):
        assert option in out
    for shape in MODEL_SHAPES:            # the presets and the conventions are documented in the help
        assert shape in out
    assert "GFLOP/s" in out and "IMAGES * L" in out


@pytest.mark.parametrize("argv, expected", [
    (["--shapes", "x9"], "unknown shape 'x9'"),
    (["--shapes", "32,190,8,2"], "C=190 is not divisible by S=8"),
    (["--shapes", "32,192,8"], "unknown shape '32,192,8'"),
    (["--backends", "eager", "nonesuch"], "unknown backend(s) nonesuch"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["--direction", "sideways"], "argument --direction: invalid choice: 'sideways'"),
    (["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["--batch", "2", "--sequences", "3"], "not allowed with argument"),
    (["--repeat", "-1"], "argument --repeat: must be > 0 ms"),
    (["--device", "tpu"], "argument --device"),
    (["--model", "dynamixer_s", "--direction", "bwd"], "with --model use fwd"),
    (["--model", "dynamixer_x"], "argument --model: invalid choice"),
    (["--autocast", "bfloat16"], "argument --autocast: only with --model"),
    (["--model", "dynamixer_s", "--autocast", "int8"], "argument --autocast: invalid choice: 'int8'"),
    (["--convert"], "argument --convert: only with --model"),
    (["--optimizer", "adamw"], "argument --optimizer: only with --model"),
    (["--require", "cpu:fwd>1.3"], "argument --require: 'cpu:fwd>1.3' is not BACKEND:DIR>=X"),
])
def test_argument_errors_exit_2_with_a_clear_message(argv, expected, capsys):
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert expected in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_exits_2(capsys):
    code, _, err = run_main(["--device", "cuda"], capsys)
    assert code == 2 and "no CUDA device is visible" in err


def test_plot_without_matplotlib_says_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # makes `import matplotlib` raise ImportError
    code, _, err = run_main([*TINY, "--plot", str(tmp_path / "p.png")], capsys)
    assert code == 2 and "pip install matplotlib" in err


def test_module_entry_point_exits_2_on_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "dynamixer_ops.bench", "--shapes", "q7"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "unknown shape 'q7'" in proc.stderr and "usage: dynamixer-bench" in proc.stderr


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick CPU run with --json (and --plot when matplotlib is there), shared by the checks below."""
    tmp = tmp_path_factory.mktemp("bench")
    argv = [*TINY, "--direction", "fwd", "bwd", "fwdbwd", "--json", str(tmp / "r.json"), "--plain"]
    try:
        import matplotlib  # noqa: F401
        argv += ["--plot", str(tmp / "r.png")]
    except ImportError:
        pass
    assert bench.main(argv) == 0
    with open(tmp / "r.json") as f:
        text = f.read()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"JSON holds {c}"))
    return tmp, report


def test_quick_run_writes_valid_json(quick_run):
    _, report = quick_run
    assert report["mode"] == "op" and report["command"].startswith("dynamixer-bench")
    assert report["machine"]["cpu"] and report["machine"]["cpu_count"] >= 1
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["dynamixer_ops"]
    roofline = report["roofline"]
    assert roofline["copy_GBps"] > 0 and roofline["gemm_GFLOPs"] > 0
    # the machine's best GEMM rate: every candidate measured (torch.mm, oneDNN) or computed (FMA peak) is stated
    assert roofline["gemm_GFLOPs"] == pytest.approx(max(roofline["gemm_candidates"].values()), rel=1e-3)
    assert roofline["gemm"] in roofline["gemm_candidates"]
    assert report["shapes"] == [{"name": "custom", "L": 7, "C": 48, "S": 2, "d": 1}]
    rows = report["results"]
    assert {r["direction"] for r in rows} == {"fwd", "bwd", "fwdbwd"}
    eager = [r for r in rows if r["backend"] == "eager"]
    assert len(eager) == 3 and all(r["status"] == "ok" for r in eager)
    for r in rows:
        assert r["sequences"] == 5 and r["bytes"] > 0 and r["flops"] > 0
        if r["status"] != "ok":
            assert "median_ms" not in r and r["message"]
            continue
        assert 0 <= r["error"] <= r["tolerance"]
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["samples"] >= 2
        for key in ("GBps", "GFLOPs", "roofline_pct"):
            assert r[key] > 0
        assert r["GBps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
        assert r["GFLOPs"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e9)


def test_speedups_are_ratios_of_the_reported_times(quick_run):
    _, report = quick_run
    rows = report["results"]
    checked = 0
    for direction in ("fwd", "bwd", "fwdbwd"):
        eager = next(r for r in rows if r["backend"] == "eager" and r["direction"] == direction)
        for r in rows:
            if r["direction"] != direction:
                continue
            if r.get("median_ms") is None:
                assert r["speedup_vs_eager"] is None
                continue
            assert r["speedup_vs_eager"] == pytest.approx(eager["median_ms"] / r["median_ms"], rel=1e-12)
            assert r["speedup_vs_compile"] is None      # --quick leaves compile out
            checked += 1
    assert checked >= 3


def test_quick_run_writes_a_png(quick_run):
    pytest.importorskip("matplotlib")
    tmp, _ = quick_run
    data = (tmp / "r.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plain_table_without_rich(quick_run, monkeypatch, capsys):
    _, report = quick_run
    for mod in ("rich", "rich.console", "rich.table"):
        monkeypatch.setitem(sys.modules, mod, None)
    bench.print_table(report)
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:4] == ["shape", "N", "dir", "backend"]
    assert "eager" in out and "1.00x" in out


@pytest.fixture
def broken_backends():
    """Two deliberately wrong backends: one with a NaN forward, one with a correct forward and wrong grads."""
    def nan_forward(x, cw, cb, gw, gb, S, y):
        y.fill_(float("nan"))

    def good_forward(x, cw, cb, gw, gb, S, y):
        y.copy_(reference_forward(x, cw, cb, gw, gb, S))

    def bad_backward(dy, x, cw, cb, gw, gb, S, *grads):
        for out, value in zip(grads, reference_backward(dy, x, cw, cb, gw, gb, S)):
            out.copy_(value * 1.5)

    names = ["test_nan_forward", "test_bad_grads"]
    for name, fwd in zip(names, (nan_forward, good_forward)):
        registry.register_backend(registry.Backend(
            name=name, forward=fwd, backward=bad_backward, devices=("cpu",), dtypes=(torch.float32,),
            priority={"cpu": 1000}, auto=lambda device_type: False))
    try:
        yield names
    finally:
        for name in names:
            registry.unregister_backend(name)


def test_wrong_backend_is_reported_and_not_timed(broken_backends, tmp_path, capsys):
    path = tmp_path / "w.json"
    code, out, _ = run_main([*TINY, "--backends", "eager", *broken_backends, "--direction", "fwd", "fwdbwd",
                             "--json", str(path), "--plain"], capsys)
    assert code == 0
    rows = {(r["backend"], r["direction"]): r for r in json.loads(path.read_text())["results"]}
    nan_fwd, bad_grads = broken_backends
    for direction in ("fwd", "fwdbwd"):
        r = rows[(nan_fwd, direction)]
        assert r["status"] == "WRONG" and "NaN" in r["message"] and "median_ms" not in r
        assert r["speedup_vs_eager"] is None
    assert rows[(bad_grads, "fwd")]["status"] == "ok" and rows[(bad_grads, "fwd")]["median_ms"] > 0
    r = rows[(bad_grads, "fwdbwd")]
    assert r["status"] == "WRONG" and r["error"] == pytest.approx(0.5, rel=1e-3) and "median_ms" not in r
    assert "> tolerance" in r["message"]
    assert rows[("eager", "fwdbwd")]["status"] == "ok"
    assert "WRONG" in out


def test_require_passes_fails_and_sets_the_exit_code(broken_backends, capsys):
    argv = [*TINY, "--backends", "eager", *broken_backends, "--direction", "fwd", "fwdbwd", "--plain"]
    code, out, _ = run_main([*argv, "--require", "eager:fwd>=1.0", "test_bad_grads:fwd>=0.0001"], capsys)
    assert code == 0
    assert "PASS eager fwd >= 1x eager at 7,48,2,1 N=5: 1.00x" in out
    code, out, _ = run_main([*argv, "--require", "eager:fwd>=1.0", "test_bad_grads:fwdbwd>=0.0001"], capsys)
    assert code == 3 and "FAIL test_bad_grads fwdbwd >= 0.0001x eager at 7,48,2,1 N=5: WRONG" in out
    code, out, _ = run_main([*argv, "--require", "eager:bwd>=1.0"], capsys)
    assert code == 3 and "FAIL eager bwd >= 1x eager: not run" in out


def test_raising_backend_is_reported_as_error(tmp_path, capsys):
    def boom(*args):
        raise RuntimeError("kernel exploded")

    registry.register_backend(registry.Backend(name="test_raises", forward=boom, backward=boom, devices=("cpu",),
                                               dtypes=(torch.float32,), priority={}, auto=lambda t: False))
    try:
        path = tmp_path / "e.json"
        code, out, _ = run_main([*TINY, "--backends", "eager", "test_raises", "--json", str(path), "--plain"],
                                capsys)
    finally:
        registry.unregister_backend("test_raises")
    assert code == 0
    rows = [r for r in json.loads(path.read_text())["results"] if r["backend"] == "test_raises"]
    assert rows and all(r["status"] == "ERROR" and "kernel exploded" in r["message"] for r in rows)
    assert "kernel exploded" in out


def test_unavailable_backend_is_skipped_with_the_reason(capsys):
    unavailable = {**registry.unavailable_backends()}
    name = next((n for n in unavailable if n in registry.registered_backends() or n in registry.load_errors()), None)
    if name is None:
        pytest.skip("every known backend runs here")
    code, out, err = run_main([*TINY, "--backends", "eager", name, "--direction", "fwd", "--plain"], capsys)
    assert code == 0 and f"skipping {name}" in err and "SKIPPED" in out


def test_sequences_follow_images_times_L():
    args = bench.build_parser().parse_args(["--device", "cpu", "--batch", "3", "--shapes", "s1", "s2"])
    _, _, shapes = bench.finish_args(bench.build_parser(), args)
    assert [args.batch * s.L for s in shapes] == [96, 48]


def test_flop_convention_matches_torch_flop_counter():
    """The formula counts exactly the GEMM FLOPs of the upstream eager step: fwd = F, backward = 2F."""
    from torch.utils.flop_counter import FlopCounterMode
    shape = bench.Shape("custom", 7, 48, 2, 3)
    N = 5
    inputs, dy = linear_init_inputs(N, *shape.dims, torch.float32, torch.device("cpu"))
    leaves = [t.requires_grad_() for t in inputs]
    with FlopCounterMode(display=False) as fwd_counter:
        y = upstream_mix(*leaves, shape.S)
    with FlopCounterMode(display=False) as bwd_counter:
        torch.autograd.grad(y, leaves, dy)
    assert bench.work("fwd", N, shape, torch.float32)[1] == fwd_counter.get_total_flops()
    assert bench.work("bwd", N, shape, torch.float32)[1] == bwd_counter.get_total_flops()
    assert bench.work("fwdbwd", N, shape, torch.float32)[1] == 3 * fwd_counter.get_total_flops()
    # s1 at 256 sequences (the CPU acceptance shape), by hand: reduce 50.3M + generate 268.4M + apply 100.7M
    assert forward_flops(256, *bench.parse_shape("s1").dims) == 50_331_648 + 268_435_456 + 100_663_296


def test_bytes_convention():
    shape = bench.parse_shape("s2")
    X = 10 * 16 * 384 * 2
    W = (32 * 384 + 32 + 256 * 32 + 256) * 2
    assert bench.work("fwd", 10, shape, torch.bfloat16)[0] == 2 * X + W
    assert bench.work("bwd", 10, shape, torch.bfloat16)[0] == 3 * X + 2 * W
    assert bench.work("fwdbwd", 10, shape, torch.bfloat16)[0] == 5 * X + 3 * W


def test_model_mode_without_the_models_module_says_so(monkeypatch, capsys):
    import dynamixer_ops
    monkeypatch.setitem(sys.modules, "dynamixer_ops.models", None)     # None in sys.modules: ImportError
    monkeypatch.delattr(dynamixer_ops, "models", raising=False)         # else `from . import models` finds it
    code, _, err = run_main(["--device", "cpu", "--model", "dynamixer_s", "--batch", "1", "--backends", "eager"],
                            capsys)
    assert code == 1 and "needs dynamixer_ops.models" in err


def _has_models():
    try:
        from dynamixer_ops import models, upstream  # noqa: F401
        return hasattr(models, "create") and hasattr(upstream, "eager_model")
    except ImportError:
        return False


@pytest.mark.skipif(not _has_models(), reason="dynamixer_ops.models / dynamixer_ops.upstream not merged yet")
@pytest.mark.parametrize("convert", [False, True], ids=["models", "convert"])
def test_model_mode_times_images_per_second(convert, tmp_path, capsys):
    path = tmp_path / "m.json"
    code, out, _ = run_main(["--device", "cpu", "--model", "dynamixer_s", "--batch", "1", "--direction", "fwd",
                             "--backends", "eager", "reference", "--warmup", "1", "--repeat", "1", "--rounds", "2",
                             "--json", str(path), "--plain"] + (["--convert"] if convert else []), capsys)
    assert code == 0
    report = json.loads(path.read_text())
    assert report["settings"]["convert"] is convert and ("convert(upstream)" in report["title"]) is convert
    rows = {r["backend"]: r for r in report["results"]}
    assert rows["eager"]["images_per_s"] > 0 and rows["eager"]["speedup_vs_eager"] == 1.0
    ref = rows["reference"]
    assert ref["status"] == "ok", ref["message"]
    assert ref["error"] <= ref["tolerance"]
    assert ref["speedup_vs_eager"] == pytest.approx(rows["eager"]["median_ms"] / ref["median_ms"], rel=1e-12)


def _make_results_module():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "make_results.py")
    spec = importlib.util.spec_from_file_location("make_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_results_keeps_the_latest_per_configuration_and_the_history(quick_run):
    make_results = _make_results_module()
    _, report = quick_run
    text = make_results.update(make_results.HEADER, report)
    cpu_at, gpu_at, history_at = (text.index(h) for h in ("## Latest on CPU", "## Latest on GPU", "## History"))
    shown = make_results.shown_command(report["command"])                # output files by name only
    assert os.path.dirname(report["command"].split("--json ")[-1].split()[0]) and "/" not in shown.split("--json ")[-1]
    assert gpu_at < cpu_at < text.index(shown) < history_at              # a CPU run lands under CPU only
    assert "_No GPU run recorded yet._" in text and "_No CPU run recorded yet._" not in text
    assert make_results.update(text, report) == text                   # filing the same JSON again: no change
    # a later run of the same configuration (only the output options differ) replaces it; the old one moves to
    # the top of the history
    rerun = dict(report, created_utc="2999-01-01T00:00:00Z", command=report["command"] + " --plain --json x.json")
    again = make_results.update(text, rerun)
    latest, history = again[:again.index("## History")], again[again.index("## History"):]
    assert "2999-01-01T00:00:00Z" in latest and report["created_utc"] not in latest
    assert report["created_utc"] in history and "2999-01-01T00:00:00Z" not in history
    other = dict(report, command=report["command"] + " --rounds 3")         # another configuration: its own
    assert make_results.update(text, other).count("<!-- /dynamixer-bench ") == 2
    fake_gpu = dict(report, settings=dict(report["settings"], device="cuda:0"))
    with pytest.raises(ValueError, match="records no GPU"):            # GPU tables only from GPU runs
        make_results.update(text, fake_gpu)


def test_progress_bar_only_on_a_terminal():
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, shows_bar in ((Terminal(), True), (io.StringIO(), False)):
        console = bench.Console(stream)
        console.progress(3, 12, "s1 fwd cpu")
        console("a message")          # printed above the bar, which is redrawn
        console.done()
        out = stream.getvalue()
        assert "a message\n" in out
        assert ("[######" in out and "3/12 s1 fwd cpu" in out) == shows_bar, repr(out)
        assert out.endswith("\r") == shows_bar     # the bar is erased at the end: the table starts on a clean line


@pytest.mark.parametrize("scale", [0.0, 1e-7, 1e-3], ids=["exact", "rounding", "wrong"])
def test_check_gives_the_test_suites_verdict(scale):
    """bench.check and the tests' assert_matches_reference judge the same outputs alike, also where an exact
    gradient cancels (one sequence: the bias gradients sum few terms), since both apply dynamixer_ops.testing's
    floors."""
    shape, tol = bench.Shape("custom", 7, 48, 2, 2), 1e-5
    inputs, dy = linear_init_inputs(1, *shape.dims, torch.float32, torch.device("cpu"), seed=3)
    ref_y, ref_grads = reference_outputs(inputs, shape.S, dy)
    g = torch.Generator().manual_seed(0)
    noisy = [(t + scale * t.abs().max() * torch.randn(t.shape, generator=g, dtype=t.dtype)).float()
             for t in (ref_y, *ref_grads)]
    err = bench.check(lambda: (noisy[0], noisy[1:]), "fwdbwd", ref_y, ref_grads,
                      reference_floors(inputs, shape.S, dy))
    try:
        assert_matches_reference(noisy[0], noisy[1:], inputs, shape.S, dy, tol)
        passed = True
    except AssertionError:
        passed = False
    assert (err <= tol) == passed
    assert passed == (scale < 1e-3)


@pytest.mark.skipif(not _has_models(), reason="dynamixer_ops.models / dynamixer_ops.upstream not merged yet")
def test_model_mode_rows_of_our_paths_against_the_rivals(tmp_path, capsys):
    """Our inference path beside the eager rows, at a tiny image size: checked, timed, GFLOP/s, % GEMM, the best
    rival; inference-only paths skip the training step, saying why."""
    path = tmp_path / "m.json"
    code, out, _ = run_main(["--device", "cpu", "--model", "dynamixer_s", "--img-size", "14", "--batch", "1",
                             "--backends", "eager", "cpu", "cpu+optimize", "--warmup", "1", "--repeat", "1",
                             "--rounds", "1", "--quick", "--threads", "1", "--json", str(path), "--plain"], capsys)
    assert code == 0
    report = json.loads(path.read_text())
    rows = {(r["backend"], r["mode"]): r for r in report["results"]}
    for name in ("eager", "cpu", "cpu+optimize"):
        r = rows[name, "inference"]
        assert r["status"] == "ok" and r["error"] <= r["tolerance"], r
        assert r["GFLOPs"] > 0 and r["gemm_peak_pct"] > 0 and r["best_rival"] == "eager"
        assert r["speedup_vs_best_rival"] == pytest.approx(r["speedup_vs_eager"], rel=1e-12)
    assert rows["cpu+optimize", "train_step"]["status"] == "SKIPPED"
    assert rows["cpu", "train_step"]["status"] == "ok"
    assert report["work"]["flops_per_image"]["train_step"] > 2 * report["work"]["flops_per_image"]["inference"] > 0
    assert "best rival eager" in out and "% GEMM" in out


def _has_openvino():
    try:
        import openvino  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _has_openvino(), reason="needs openvino")
def test_model_mode_openvino_rival_beside_the_fused_network_converted(tmp_path, capsys):
    """OpenVINO on the upstream network (a rival) and on the fused network (the op traced as its decomposition):
    both checked against the float64 upstream network and timed; inference only."""
    path = tmp_path / "m.json"
    code, _, _ = run_main(["--device", "cpu", "--model", "dynamixer_s", "--img-size", "14", "--batch", "1",
                           "--backends", "openvino", "cpu+openvino", "--warmup", "1", "--repeat", "1", "--rounds", "1",
                           "--quick", "--threads", "1", "--json", str(path), "--plain"], capsys)
    assert code == 0
    rows = {(r["backend"], r["mode"]): r for r in json.loads(path.read_text())["results"]}
    for name in ("openvino", "cpu+openvino"):
        r = rows[name, "inference"]
        assert r["status"] == "ok" and r["error"] <= r["tolerance"] and r["GFLOPs"] > 0, r
        assert r["best_rival"] == "openvino"
        assert rows[name, "train_step"]["status"] == "SKIPPED"


def test_model_mode_runtimes_skipped_with_the_reason(monkeypatch):
    """A runtime that is not installed, or a run in another dtype, skips the rival and our path, saying why."""
    from dynamixer_ops.bench import model
    monkeypatch.setattr(model._OpenVino, "missing", staticmethod(lambda: "needs openvino (hidden by the test)"))
    cpu = torch.device("cpu")
    _, skipped = model.resolve_variants(["openvino", "cpu+openvino"], cpu, torch.float32, True, None)
    assert skipped == {"openvino": "needs openvino (hidden by the test)",
                       "cpu+openvino": "needs openvino (hidden by the test)"}
    monkeypatch.setattr(model._OpenVino, "missing", staticmethod(lambda: None))
    _, skipped = model.resolve_variants(["openvino", "cpu+openvino", "cpu"], cpu, torch.bfloat16, True, None)
    assert set(skipped) == {"openvino", "cpu+openvino"} and "float32 only" in skipped["cpu+openvino"]


def test_model_mode_summary_without_the_eager_row():
    """A run that does not time the upstream eager network still gets its summary line."""
    from dynamixer_ops.bench.model import add_rival_ratios, summary
    rows = {"onnxruntime": {"backend": "onnxruntime", "mode": "inference", "median_ms": 2.0, "speedup_vs_eager": None},
            "cpu": {"backend": "cpu", "mode": "inference", "median_ms": 4.0, "speedup_vs_eager": None}}
    add_rival_ratios(rows)
    assert summary(list(rows.values())) == ["inference: best rival onnxruntime (eager not timed); best of ours cpu: "
                                            "0.50x the best rival, eager not timed"]


def test_model_mode_unknown_variant_is_named(capsys):
    code, _, err = run_main(["--device", "cpu", "--model", "dynamixer_s", "--backends", "eager", "cpu+fast"],
                            capsys)
    assert code == 2 and "cpu+fast" in err


@pytest.mark.skipif(os.environ.get("DYNAMIXER_BENCH_RIVALS") != "1",
                    reason="compiles the network five times and builds an AOTInductor package (about 10 minutes "
                           "on 2 busy cores): DYNAMIXER_BENCH_RIVALS=1")
def test_model_mode_every_rival_and_path(tmp_path, capsys):
    path = tmp_path / "m.json"
    variants = ["eager", "compile", "compile-freezing", "onnxruntime", "openvino", "cpu", "cpu+compile",
                "cpu+compile-freezing", "cpu+optimize", "cpu+aoti", "cpu+openvino"]
    code, _, _ = run_main(["--device", "cpu", "--model", "dynamixer_s", "--img-size", "14", "--batch", "2",
                           "--threads", "1", "--backends", *variants, "--warmup", "1", "--repeat", "1", "--rounds", "1",
                           "--json", str(path), "--plain"], capsys)
    assert code == 0
    rows = {(r["backend"], r["mode"]): r for r in json.loads(path.read_text())["results"]}
    for name in variants:
        assert rows[name, "inference"]["status"] == "ok", rows[name, "inference"]
    for name in ("eager", "compile", "cpu", "cpu+compile"):
        assert rows[name, "train_step"]["status"] == "ok", rows[name, "train_step"]
