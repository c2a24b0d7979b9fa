"""The coverage rule of .ci/sanitize (tools/native_coverage.py): a function that never ran fails the run unless it is
the code of an instruction set the run cannot execute (a namespace isa_<set> or isa_<set>_<what>), which it names as
not checked instead; common code never excused. On made-up counts, and on a small program built with gcc's --coverage
as .ci/sanitize builds the kernels (gcov's real demangled names: lambdas, anonymous namespaces)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from cuda_emu_build import COVERAGE_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "native_coverage.py")
_spec = importlib.util.spec_from_file_location("native_coverage", TOOL)
native_coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(native_coverage)


@pytest.mark.parametrize("name, isa", [
    ("void dynamixer_ops::isa_avx2::forward_block(MixArgs<float> const&, long, long)", "avx2"),
    ("void dynamixer_ops::isa_avx512bf16::bf16_gemm<4>(long, unsigned int const*)", "avx512bf16"),
    ("dynamixer_ops::(anonymous namespace)::isa_avx512bf16_setup::dot_sizes(long, long, long, long, long, bool)",
     "avx512bf16"),
    ("dynamixer_ops::(anonymous namespace)::isa_avx512bf16_setup::dot_sizes(long, long, long, long, long, bool)"
     "::{lambda(long)#1}::operator()(long) const", "avx512bf16"),
    ("dynamixer_ops::(anonymous namespace)::pairs_along_rows(torch::stable::Tensor const&)", ""),
    ("dynamixer_ops::(anonymous namespace)::chosen_isa()", ""),
    # common code that takes an instruction set's type is still common code
    ("void dynamixer_ops::(anonymous namespace)::run(dynamixer_ops::isa_avx2::Tile const&)", ""),
])
def test_functions_belong_to_the_instruction_set_of_their_namespace(name, isa):
    assert native_coverage.isa_of(name) == isa


def test_only_the_lacking_sets_code_is_excused():
    """Made-up counts of one kernel file: which never-run functions fail, which are not checked, which only count."""
    lines = {"csrc/cpu/k.cpp": {1: 1, 2: 0}, "csrc/other.cpp": {1: 0}}
    functions = {
        "csrc/cpu/k.cpp": {
            "dmx::(anonymous namespace)::common(long)": [1, 3],
            "dmx::(anonymous namespace)::planted(long)": [2, 0],
            "void dmx::isa_avx2::tile<4>(long)": [5, 0],          # one line, one function per instruction set ...
            "void dmx::isa_avx2::tile<6>(long)": [5, 2],          # ... that ran in one of its instantiations
            "void dmx::isa_avx512::tile<4>(long)": [5, 0],
            "dmx::(anonymous namespace)::isa_avx512bf16_setup::sizes(long)": [9, 0],
            "dmx::(anonymous namespace)::isa_avx512bf16_setup::sizes(long)::{lambda(long)#1}::operator()(long) const":
                [10, 0],
        },
        "csrc/other.cpp": {"dmx::error_path()": [1, 0]},
    }
    rows, missed, not_checked, unchecked = native_coverage.judge(lines, functions, ["csrc/cpu/"],
                                                                 ["avx512", "avx512bf16"])
    assert missed == ["csrc/cpu/k.cpp:2 dmx::(anonymous namespace)::planted(long)"]
    assert not_checked == {
        "avx512": ["csrc/cpu/k.cpp:5 void dmx::isa_avx512::tile<4>(long)"],
        "avx512bf16": ["csrc/cpu/k.cpp:9 dmx::(anonymous namespace)::isa_avx512bf16_setup::sizes(long)",
                       "csrc/cpu/k.cpp:10 dmx::(anonymous namespace)::isa_avx512bf16_setup::sizes(long)::"
                       "{lambda(long)#1}::operator()(long) const"]}
    assert unchecked == 1
    assert rows[0] == ("csrc/cpu/k.cpp", 1, 2, 2, 6, 2, 7)
    # On a CPU with every set, the same counts fail for each never-run function of the kernel file.
    _, missed, not_checked, _ = native_coverage.judge(lines, functions, ["csrc/cpu/"], [])
    assert not not_checked and len(missed) == 4


# A common function the tests never reach (`planted`), and code of three instruction sets of which only avx2 runs.
PROGRAM = textwrap.dedent("""\
    namespace isa_avx2 { int kernel(int x) { return x + 1; } }
    namespace isa_avx512 { int kernel(int x) { return x + 2; } }
    namespace {
    namespace isa_avx512bf16_setup {
    int sizes(int n) {
      auto up = [](int v) { return (v + 15) / 16 * 16; };
      return up(n);
    }
    }  // namespace isa_avx512bf16_setup
    int common(int x) { return x - 1; }
    #ifdef PLANTED
    int planted(int x) { return x * 3; }
    #endif
    }  // namespace
    int main(int argc, char**) {
      int r = common(argc) + isa_avx2::kernel(argc);
      if (argc > 5) r += isa_avx512::kernel(argc) + isa_avx512bf16_setup::sizes(argc);
    #ifdef PLANTED
      if (argc > 5) r += planted(argc);
    #endif
      return r == 12345;
    }
    """)


@pytest.mark.skipif(shutil.which("g++") is None or shutil.which("gcov") is None, reason="needs g++ and gcov")
@pytest.mark.parametrize("planted", [True, False], ids=["planted", "clean"])
def test_sanitize_coverage_rule_on_a_gcc_build(tmp_path, planted):
    """The rule as .ci/sanitize runs it on an AVX2 CPU (--lacking avx512 --lacking avx512bf16): the never-run code
    of those two sets is named NOT CHECKED, each under its set, and passes; a never-run common function fails the
    run, by name; so does the lacking sets' code on a CPU that has them (no --lacking)."""
    src = tmp_path / "csrc" / "cpu" / "k.cpp"
    src.parent.mkdir(parents=True)
    src.write_text(PROGRAM)
    build = tmp_path / "build"
    build.mkdir()
    defines = ["-DPLANTED"] if planted else []
    subprocess.run(["g++", "-O0", *COVERAGE_FLAGS, *defines, "-c", str(src), "-o", str(build / "k.o")], check=True)
    subprocess.run(["g++", *COVERAGE_FLAGS, str(build / "k.o"), "-o", str(build / "k")], check=True)
    subprocess.run([str(build / "k")], check=True, cwd=tmp_path)

    def rule(*lacking):
        args = [a for isa in lacking for a in ("--lacking", isa)]
        return subprocess.run([sys.executable, TOOL, "--title", "k", "--sources", str(tmp_path / "csrc"), "--check",
                               "csrc/cpu/", "--report", str(tmp_path / "report.txt"), *args, str(build)],
                              capture_output=True, text=True)

    avx2 = rule("avx512", "avx512bf16")
    assert "NOT CHECKED: no avx512 in this run; its 1 functions" in avx2.stdout, avx2.stdout
    assert "NOT CHECKED: no avx512bf16 in this run; its 2 functions" in avx2.stdout, avx2.stdout
    for name in ("isa_avx512::kernel(int)", "isa_avx512bf16_setup::sizes(int)",
                 "isa_avx512bf16_setup::sizes(int)::{lambda(int)#1}::operator()(int) const"):
        assert name in avx2.stdout and name not in avx2.stderr
    if planted:
        assert avx2.returncode == 1
        assert "1 functions of k never executed" in avx2.stderr and "planted(int)" in avx2.stderr, avx2.stderr
    else:
        assert avx2.returncode == 0, avx2.stderr
    every_set = rule()
    assert every_set.returncode == 1 and "NOT CHECKED" not in every_set.stdout
    assert f"{4 if planted else 3} functions of k never executed" in every_set.stderr, every_set.stderr
