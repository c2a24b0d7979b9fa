"""Line and function coverage of the native code (csrc/) from a run of a build compiled with gcc's --coverage.

    python tools/native_coverage.py --title TITLE --sources CSRC --check PREFIX... --report FILE [--lacking ISA]...
                                    BUILD_DIR...

Runs gcov (JSON output) on every .gcda under the build directories, keeps the source files under CSRC (the csrc/
directory the build compiled), and prints a table: lines executed of the executable lines, functions executed (a
function of the source; each instruction set's copy of mix_cpu_kernels.inc, namespace isa_<name>, counts as one of
its own) and template instantiations executed. FILE gets the full report: the functions and instantiations never
executed, then every source line with its count (gcov's notation: ##### for a line never executed, - for one without
code).

Exits 1 when a function of a file under a --check prefix (the kernels: csrc/cpu/, csrc/cuda/) never ran in any of
its instantiations, except the code of the instruction sets named by --lacking (this run cannot execute them; listed
by name every run). A function is an instruction set's code when its qualified name has a namespace isa_<set> (the
set's copy of mix_cpu_kernels.inc, compiled for it) or isa_<set>_<what> (host code compiled for every CPU but reached
only from that set's path, e.g. isa_avx512bf16_setup); the lambdas inside a function carry its name. Code that
several sets reach goes in the lowest one's namespace: a CPU that has a set has every set below it. Every other
function is common code, which every run must execute. An instantiation that never ran (a register tile of one
particular size, say) runs the same source lines as one that did: reported, not fatal. The build must use
-fno-early-inlining: gcc's early inliner otherwise folds small functions into their callers before they are
instrumented, and they vanish from the report.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import subprocess
import sys

# isa_<set>:: or isa_<set>_<what>:: (set names have no underscore: avx512bf16, avx512, avx2, generic).
ISA_NAMESPACE = re.compile(r"\bisa_([a-z0-9]+)(?:_\w+)?::")


def gcov_json(gcda: str) -> list[dict]:
    """gcov's JSON for one object (its .gcno beside the .gcda): one dict per data file."""
    obj_dir, name = os.path.split(os.path.abspath(gcda))
    stem = name[:-len(".gcda")]
    out = subprocess.run(["gcov", "--json-format", "--stdout", "--object-directory", obj_dir, stem + ".o"],
                         cwd=obj_dir, capture_output=True, check=True).stdout
    docs = []
    for chunk in out.splitlines():          # one JSON document per line (per source file gcov was given)
        chunk = chunk.strip()
        if chunk:
            docs.append(json.loads(gzip.decompress(chunk) if chunk[:2] == b"\x1f\x8b" else chunk))
    return docs


def source_key(path: str, cwd: str, sources: str) -> str | None:
    """csrc/... for a file under `sources` (the csrc directory), else None."""
    full = os.path.realpath(os.path.join(cwd, path))
    root = os.path.realpath(sources)
    if not full.startswith(root + os.sep):
        return None
    return "/".join(["csrc", *os.path.relpath(full, root).split(os.sep)])


def collect(build_dirs: list[str], source_root: str):
    """{file: {line: count}}, {file: {function: (first line, count)}}, {file: absolute path of its source}."""
    lines: dict[str, dict[int, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
    functions: dict[str, dict[str, list]] = collections.defaultdict(dict)
    sources: dict[str, str] = {}
    gcdas = [os.path.join(root, f) for d in build_dirs for root, _, files in os.walk(d) for f in files
             if f.endswith(".gcda")]
    if not gcdas:
        sys.exit(f"native_coverage: no .gcda under {' '.join(build_dirs)} (built with --coverage? the process ran?)")
    for gcda in gcdas:
        for doc in gcov_json(gcda):
            cwd = doc.get("current_working_directory", os.path.dirname(gcda))
            for f in doc["files"]:
                key = source_key(f["file"], cwd, source_root)
                if key is None:
                    continue
                sources.setdefault(key, os.path.normpath(os.path.join(cwd, f["file"])))
                for ln in f["lines"]:
                    lines[key][ln["line_number"]] += ln["count"]
                for fn in f["functions"]:
                    entry = functions[key].setdefault(fn["demangled_name"], [fn["start_line"], 0])
                    entry[1] += fn["execution_count"]
    return lines, functions, sources


def isa_of(function: str) -> str:
    """The instruction set whose code `function` (a demangled name) is, or "" for common code: read from the
    namespaces of its qualified name (a lambda's include its function's), not from its parameters' types."""
    qualified = function.replace("(anonymous namespace)", "").split("(", 1)[0]
    found = ISA_NAMESPACE.search(qualified)
    return found.group(1) if found else ""


def judge(lines, functions, check: list[str], lacking: list[str]):
    """The coverage rule on collect()'s counts. Returns the table's rows (file, lines executed, executable lines,
    functions executed, functions, instantiations executed, instantiations), the functions that fail the run
    ("file:line name", under a --check prefix), {set: its functions not checked} for the sets in `lacking`, and how
    many functions outside the --check prefixes never ran."""
    missed, skipped_isa, unchecked = [], collections.defaultdict(list), 0
    rows = []
    for key in sorted(lines):
        executable = len(lines[key])
        executed = sum(1 for c in lines[key].values() if c)
        fns = functions.get(key, {})
        # A function of the source: its first line and its instruction set; its instantiations' counts.
        groups: dict[tuple, list] = {}
        for name, (line, count) in fns.items():
            group = groups.setdefault((line, isa_of(name)), [0, name])
            group[0] += count
        rows.append((key, executed, executable, sum(1 for c, _ in groups.values() if c), len(groups),
                     sum(1 for _, c in fns.values() if c), len(fns)))
        for (line, isa), (count, name) in sorted(groups.items()):
            if count:
                continue
            if isa and isa in lacking:
                skipped_isa[isa].append(f"{key}:{line} {name}")
            elif not any(key.startswith(prefix) for prefix in check):
                unchecked += 1
            else:
                missed.append(f"{key}:{line} {name}")
    return rows, missed, dict(skipped_isa), unchecked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build_dirs", nargs="+")
    parser.add_argument("--title", required=True)
    parser.add_argument("--sources", required=True, help="the csrc/ directory the build compiled")
    parser.add_argument("--check", action="append", default=[], metavar="PREFIX",
                        help="every function of the files under this prefix (csrc/...) must run (repeatable)")
    parser.add_argument("--report", required=True, help="the full report's file")
    parser.add_argument("--lacking", action="append", default=[], metavar="ISA",
                        help="an instruction set this run cannot execute: its code is not checked (repeatable)")
    args = parser.parse_args()
    lines, functions, sources = collect(args.build_dirs, args.sources)

    rows, missed, skipped_isa, unchecked = judge(lines, functions, args.check, args.lacking)

    print(f"coverage of {args.title}")
    width = max(len(r[0]) for r in rows)
    print(f"  {'file':<{width}}  {'lines executed':>18}  {'functions executed':>18}  {'instantiations':>14}")
    total = ["total", 0, 0, 0, 0, 0, 0]
    for row in rows + [total]:
        key, executed, executable, fn_run, fn_total, inst_run, inst_total = row
        pct = 100.0 * executed / executable if executable else 100.0
        print(f"  {key:<{width}}  {f'{executed}/{executable} ({pct:.0f}%)':>18}  {f'{fn_run}/{fn_total}':>18}"
              f"  {f'{inst_run}/{inst_total}':>14}")
        if row is not total:
            total[1:] = [t + r for t, r in zip(total[1:], row[1:])]
    print(f"  full report (every line's count): {args.report}")
    for isa, names in skipped_isa.items():
        print(f"  NOT CHECKED: no {isa} in this run; its {len(names)} functions never ran under the sanitizers "
              f"(a bug in them passes this run):")
        for n in names:
            print(f"    {n}")
    if unchecked:
        print(f"  {unchecked} functions outside {', '.join(args.check)} never executed (the contract's error "
              f"paths): listed in the full report")

    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    with open(args.report, "w") as out:
        out.write(f"coverage of {args.title}\n\nfunctions (template instantiations) never executed:\n")
        for key in sorted(functions):
            for name, (line, count) in sorted(functions[key].items(), key=lambda kv: kv[1][0]):
                if not count:
                    out.write(f"  {key}:{line} {name}\n")
        for key in sorted(lines):
            out.write(f"\n=== {key} ===\n")
            try:
                with open(sources[key], errors="replace") as src:
                    text = src.read().splitlines()
            except OSError:
                text = []
            counts = lines[key]
            for i, line in enumerate(text, 1):
                mark = "-" if i not in counts else (str(counts[i]) if counts[i] else "#####")
                out.write(f"{mark:>9}:{i:5}:{line}\n")

    if missed:
        print(f"native_coverage: {len(missed)} functions of {args.title} never executed:", file=sys.stderr)
        for n in missed:
            print(f"  {n}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
