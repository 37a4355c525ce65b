"""The benchmark suite (`make bench`): every benchmark in turn, then BENCHMARKS.md.

Each benchmark writes benchmarks/results/<name>.json; the table in BENCHMARKS.md is built from
those files, with the machine each was measured on. The first run trains the digits preset
model into benchmarks/.cache/ and fits its flow priors; later runs reuse them.

    python benchmarks/suite.py [--only peer_samplers,memory] [--report-only] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

from common import HERE, RESULTS, add_common_arguments, machine, print_rows, set_up_process, write_result

from difftime.io import atomic_write_bytes

# Order matters only for the first run: sampler_overhead trains the cached model, peer_samplers fits its priors.
BENCHMARKS = ("train_step", "sampler_overhead", "likelihood", "peer_samplers", "memory", "metrics")
# Reported in BENCHMARKS.md from their results file, but run on their own (too long for `make bench`).
REPORTED = ("mnist_frontier", "likelihood_tolerance", "study_ranks")
REPORT = HERE.parent / "BENCHMARKS.md"
# What the allocator setting of `difftime.allocator` rests on (measured once, by hand; not rerun here).
ALLOCATOR_NOTE = (
    "It was chosen by measurement on the digits U-Net at one thread: a forward pass plus VJP wrapped in a "
    "function (everything freed at its return) cost 1.15x the same calls in a loop that keeps its last output "
    "(a loaded machine, tol 1e-3 solves), and a PF-ODE solve's time per call went from 1.10x that loop to "
    "1.03x with the setting (idle machine, tol 1e-4). On the 28x28 U-Net, whose activations are larger, it "
    "changed nothing measurable."
)


def _fmt(x: float, se: float | None = None) -> str:
    value = f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return value if se is None else f"{value} +- {se:.2g}"


def report(suite: dict) -> str:
    """BENCHMARKS.md from results/*.json."""
    found = {name: json.loads((RESULTS / f"{name}.json").read_text())
             for name in (*BENCHMARKS, *REPORTED) if (RESULTS / f"{name}.json").is_file()}
    m = suite["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`python benchmarks/suite.py`), which took {suite['wall_s'] / 60:.1f} min on "
        f"{m['date']}: {m['cpu']}, {m['cores']} cores, {m['threads']} torch thread(s), torch {m['torch']}, "
        f"diffusers {m['diffusers']}, Python {m['python']}, {m['platform']}; load average "
        f"{', '.join(map(str, m['load_average']))} at the start (the machine was shared).",
        "",
        "Every row is measured side by side, in one process and one run, on the same network and data. "
        "The ratio is ours / peer, and lower is better for every measure (times, FD, memory).",
        "",
        "| benchmark | measure | ours | peer | ratio | units |",
        "|---|---|---|---|---|---|",
    ]
    for record in found.values():
        for r in record["rows"]:
            ours, peer = _fmt(r["ours"], r.get("ours_se")), _fmt(r["peer"], r.get("peer_se"))
            lines.append(f"| {r['benchmark']} | {r['measure']} | {ours} ({r['ours_is']}) | {peer} ({r['peer_is']}) | "
                         f"{r['ratio']:.4g} | {r['units']} |")
    if "peer_samplers" in found:
        from peer_samplers import section

        lines += ["", section(found["peer_samplers"], "python benchmarks/suite.py --only peer_samplers").rstrip()]
    if "mnist_frontier" in found:
        lines += ["", "## The 28x28 frontier", "",
                  "The 28x28 rows come from `benchmarks/mnist_frontier.py` (about two hours at one thread, so not "
                  "part of `make bench`); its report, with the selection table of every method family, the grid "
                  "optimization costs and sample grids, is [docs/mnist-frontier](docs/mnist-frontier/report.md)."]
    for name in ("likelihood_tolerance", "study_ranks"):
        if name in found:
            lines += ["", importlib.import_module(name).section(found[name]).rstrip()]
    lines += ["", "## Runs", "", "The allocator column is the process setting of `difftime.allocator` "
              "(the `difftime` command applies it too). " + ALLOCATOR_NOTE, "",
              "| benchmark | finished | wall | threads | allocator | load average |",
              "|---|---|---|---|---|---|"]
    for name, record in found.items():
        rm = record["machine"]
        lines.append(f"| [`{name}`](benchmarks/{name}.py) | {rm['date']} | {record['wall_s'] / 60:.1f} min | "
                     f"{rm['threads']} | {rm.get('malloc', 'C library defaults')} | "
                     f"{', '.join(map(str, rm['load_average']))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--only", help=f"comma list of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--report-only", action="store_true", help="rewrite BENCHMARKS.md from results/*.json")
    args = parser.parse_args()
    set_up_process(args)
    chosen = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}")
    suite_path = RESULTS / "suite.json"
    if args.report_only:
        suite = json.loads(suite_path.read_text())
    else:
        start, walls = time.perf_counter(), {}
        suite = {"machine": machine()}
        for name in chosen:
            print(f"== {name}", flush=True)
            module = importlib.import_module(name)
            sub = argparse.ArgumentParser()
            module.add_arguments(sub)
            t0 = time.perf_counter()
            result = module.run(sub.parse_args([]))
            walls[name] = time.perf_counter() - t0
            print_rows(result["rows"])
            write_result(name, result, walls[name])
        suite.update(wall_s=time.perf_counter() - start, benchmarks=chosen,
                     wall_s_by_benchmark={k: round(v, 1) for k, v in walls.items()})
        if args.only and suite_path.is_file():  # a partial rerun: the suite's record stays the full run's
            suite = json.loads(suite_path.read_text())
        else:
            atomic_write_bytes(suite_path, (json.dumps(suite, indent=2) + "\n").encode())
    atomic_write_bytes(REPORT, report(suite).encode())
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
