"""InplaceABN on one CUDA GPU, in one script of under 8 minutes: time, memory, syncs, compile.

    python benchmarks/cuda_check.py                 # on a machine with a CUDA GPU
    python benchmarks/cuda_check.py --dry-run       # on any machine: validates, runs no CUDA

Sections (each row: time per training step from torch.cuda.Event, forward + backward, median of
the timed steps; torch.cuda.max_memory_allocated over one step after warm-up):

1. sync: forward + backward of each norm under torch.cuda.set_sync_debug_mode("error"), on the
   layer stack and on resnet50 (the optimizer step stays outside: it is not the layer's).
2. stack: BatchNormAct vs ABN vs InplaceABN on the stack of ``leanstep layers``.
3. resnet50 at the seed's batch (128, 224 px): the three norms in fp32, and ABN vs InplaceABN
   under float16 (with GradScaler) and bfloat16 autocast.
4. seed: one row per group of the seed suite (leanstep/suites/seed.toml: its InplaceABN case,
   else its first; rows whose optional package is missing are reported as skipped), with the
   seed's published ms and MiB beside ours.
5. compile: eager vs torch.compile for ABN and InplaceABN on the stack and resnet50; compile
   time apart, and dynamo's graph and graph-break counts.

A time budget (``--budget-s``, default 450 s) is watched between rows: rows that would start
after it are reported as skipped, so the script ends in time on a slower GPU. It prints one
table and writes every row as JSON (``--output``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from leanstep.bench.cases import Case, build_model, make_step  # noqa: E402
from leanstep.bench.layer_bench import build_stack  # noqa: E402
from leanstep.bench.specs import MissingPackageError  # noqa: E402
from leanstep.bench.step import TrainStep  # noqa: E402
from leanstep.bench.suite import load_suite  # noqa: E402
from leanstep.bench.validate import validate_case  # noqa: E402

NORMS = ("bn", "abn", "inplace_abn")
STACK = {"batch_size": 64, "image_size": 128}
RESNET = {"model": "resnet50", "batch_size": 128, "image_size": 224}
SEED_SUITE = "seed"  # the shipped suite of that name (leanstep/suites/seed.toml)
WARMUP, ITERS, SEED_ITERS = 3, 10, 5
MIB = 2**20


@dataclasses.dataclass
class Row:
    """One measurement to make: a section, a label and how to build its training step."""

    section: str
    label: str
    build: str  # "stack" or "case"
    norm: str = "inplace_abn"
    case: Case | None = None
    precision: str | None = None  # None: the case's own (fp32 for the stack)
    compile: bool = False
    sync_check: bool = False
    reference_ms: float | None = None
    reference_mib: float | None = None
    skip: str | None = None
    group: str | None = None  # the seed suite's group, for seed rows


def _case(model: str, norm: str, batch_size: int, image_size: int, precision: str = "fp32",
          compile: bool = False) -> Case:
    return Case(suite="cuda_check", group="", name=f"{model} {norm}", model=model,
                options={"norm": norm, "activation": "leaky_relu"}, batch_size=batch_size,
                image_size=image_size, device="cuda", precision=precision, compile=compile)


def _seed_rows() -> list[Row]:
    """One case per group of the seed suite (its InplaceABN case where it has one, else its
    first), at the seed's batch and image size."""
    groups: dict[str, Case] = {}
    for case in load_suite(SEED_SUITE).cases:
        chosen = groups.get(case.group)
        if chosen is None or (case.options.get("norm") == "inplace_abn"
                              and chosen.options.get("norm") != "inplace_abn"):
            groups[case.group] = case
    rows = []
    for case in groups.values():
        reference = case.reference
        ms = reference.get("reference_ms")
        if ms is None and "reference_fwd_ms" in reference:
            ms = reference["reference_fwd_ms"] + reference.get("reference_bwd_ms", 0.0)
        row = Row("seed", f"{case.group}: {case.name}", "case",
                  case=dataclasses.replace(case, runs=1, iters=SEED_ITERS),
                  reference_ms=ms, reference_mib=reference.get("reference_mib"),
                  group=case.group)
        try:
            validate_case(row.case, require_device=False)
        except MissingPackageError as error:
            row.skip = f"skipped: {error}"
        rows.append(row)
    return rows


def plan() -> list[Row]:
    """Every row this script measures, in order (the cheap, decisive ones first)."""
    rows = [Row("sync", f"stack {norm}", "stack", norm=norm, sync_check=True) for norm in NORMS]
    rows += [Row("sync", f"resnet50 {norm}", "case", norm=norm, sync_check=True,
                 case=_case("resnet50", norm, 32, 224)) for norm in ("abn", "inplace_abn")]
    rows += [Row("stack", f"stack {norm}", "stack", norm=norm) for norm in NORMS]
    rows += [Row("resnet50", f"resnet50 {norm} fp32", "case", norm=norm,
                 case=_case(RESNET["model"], norm, RESNET["batch_size"], RESNET["image_size"]))
             for norm in NORMS]
    for precision in ("amp_fp16", "amp_bf16"):
        rows += [Row("resnet50", f"resnet50 {norm} {precision}", "case", norm=norm,
                     precision=precision,
                     case=_case(RESNET["model"], norm, RESNET["batch_size"],
                                RESNET["image_size"], precision))
                 for norm in ("abn", "inplace_abn")]
    rows += _seed_rows()
    for norm in ("abn", "inplace_abn"):
        for compiled in (False, True):
            mode = "compiled" if compiled else "eager"
            rows.append(Row("compile", f"stack {norm} {mode}", "stack", norm=norm,
                            compile=compiled))
    for norm in ("abn", "inplace_abn"):
        for compiled in (False, True):
            mode = "compiled" if compiled else "eager"
            rows.append(Row("compile", f"resnet50 {norm} {mode}", "case", norm=norm,
                            compile=compiled, case=_case("resnet50", norm, 64, 224,
                                                         compile=compiled)))
    return rows


def validate(rows: list[Row]) -> None:
    """Everything that can go wrong before CUDA is touched: cases, models (built on the meta
    device), norm/activation pairs."""
    for row in rows:
        if row.skip:
            continue
        if row.build == "stack":
            with torch.device("meta"):
                build_stack(row.norm, "leaky_relu")
        else:
            validate_case(row.case, require_device=False)


def _step(row: Row) -> TrainStep:
    if row.build == "stack":
        torch.manual_seed(0)
        return TrainStep(build_stack(row.norm, "leaky_relu"), batch_size=STACK["batch_size"],
                         image_size=STACK["image_size"], device="cuda",
                         precision=row.precision or "fp32", compile=row.compile)
    case = row.case
    if row.precision is not None:
        case = dataclasses.replace(case, precision=row.precision)
    return make_step(case, build_model(case))


def _sync_check(step: TrainStep) -> str:
    """Forward + backward under sync debug mode "error": "ok" or the error's first line."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step.forward()
        if step.scaler is not None:
            loss = step.scaler.scale(loss)
        loss.backward()
    except RuntimeError as error:
        return "SYNC: " + str(error).splitlines()[0][:120]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return "ok"


def _dynamo_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    graphs = int(counters["stats"]["unique_graphs"])
    breaks = sum(counters["graph_break"].values())
    return graphs, breaks


def measure(row: Row) -> dict:
    """Run ``row`` on CUDA; returns its figures."""
    torch.cuda.empty_cache()
    result: dict = {}
    if row.compile:
        torch._dynamo.reset()
        from torch._dynamo.utils import counters

        counters.clear()
    built = time.perf_counter()
    step = _step(row)
    if row.compile:
        start = time.perf_counter()
        step()  # the first step compiles
        torch.cuda.synchronize()
        result["compile_s"] = time.perf_counter() - start
        result["graphs"], result["graph_breaks"] = _dynamo_counts()
    for _ in range(WARMUP):
        step()
    if row.sync_check:
        result["sync"] = _sync_check(step)
        step.optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    result["max_mib"] = torch.cuda.max_memory_allocated() / MIB
    iters = row.case.iters if row.section == "seed" else ITERS
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    result["step_ms"] = statistics.median(times)
    result["seconds"] = time.perf_counter() - built
    return result


def _format(rows: list[dict]) -> str:
    header = ("section", "row", "step ms", "max MiB", "seed ms", "seed MiB", "sync",
              "compile s", "graphs/breaks", "status")
    lines = [header]
    for row in rows:
        def number(key, digits=1, row=row):
            value = row.get(key)
            return "-" if value is None else f"{value:.{digits}f}"

        graphs = ("-" if row.get("graphs") is None
                  else f"{row['graphs']}/{row['graph_breaks']}"
                  + (" BREAKS" if row["graph_breaks"] else ""))
        lines.append((row["section"], row["label"], number("step_ms"), number("max_mib", 0),
                      number("reference_ms"), number("reference_mib", 0), row.get("sync", "-"),
                      number("compile_s"), graphs, row["status"]))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths,
                                                                          strict=True))
                     for line in lines)


def _ratios(rows: list[dict]) -> list[str]:
    """InplaceABN / ABN step time and memory for each pair measured side by side."""
    by_label = {row["label"]: row for row in rows if row.get("step_ms")}
    notes = []
    for label, row in by_label.items():
        if "inplace_abn" not in label:
            continue
        partner = by_label.get(label.replace("inplace_abn", "abn"))
        if partner:
            notes.append(f"{label}: time x{row['step_ms'] / partner['step_ms']:.3f}, "
                         f"memory x{row['max_mib'] / partner['max_mib']:.3f} vs abn")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="validate every row on the CPU and run nothing on CUDA")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file (default: results/cuda_check-<time>.json)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="start no row after this many seconds (default 450)")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        print(f"cuda_check: --budget-s {args.budget_s} must be a positive number of seconds",
              file=sys.stderr)
        return 2
    output = args.output or ROOT / "results" / f"cuda_check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    if output.exists() and output.is_dir():
        print(f"cuda_check: --output {output} is a directory; give a file name", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("cuda_check: no CUDA GPU here; use --dry-run to validate on the CPU",
              file=sys.stderr)
        return 2

    rows = plan()
    try:
        validate(rows)
    except ValueError as error:
        print(f"cuda_check: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results = []
    for row in rows:
        record = {key: value for key, value in dataclasses.asdict(row).items() if key != "case"}
        if row.case is not None:
            record["case"] = {"model": row.case.model, "options": row.case.options,
                              "batch_size": row.case.batch_size,
                              "image_size": row.case.image_size}
        if row.skip:
            record["status"] = row.skip
        elif args.dry_run:
            record["status"] = "validated (dry run)"
        elif time.perf_counter() - started > args.budget_s:
            record["status"] = f"skipped: past the {args.budget_s:g} s budget"
        else:
            try:
                record.update(measure(row))
                record["status"] = "ok"
            except torch.cuda.OutOfMemoryError:
                record["status"] = "out of memory"
            except Exception as error:  # a failed row is recorded, the others still run
                record["status"] = f"error: {type(error).__name__}: {str(error)[:160]}"
            finally:
                if row.compile:
                    torch._dynamo.reset()
        results.append(record)
        print(f"[{time.perf_counter() - started:6.1f} s] {row.section}: {row.label}: "
              f"{record['status']}", file=sys.stderr, flush=True)

    print(_format(results))
    for note in _ratios(results):
        print(note)
    environment = {"torch": torch.__version__, "dry_run": args.dry_run,
                   "seconds": time.perf_counter() - started}
    if not args.dry_run:
        environment["gpu"] = torch.cuda.get_device_name()
        environment["cuda"] = torch.version.cuda
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"environment": environment, "rows": results}, indent=1,
                                 default=str))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
