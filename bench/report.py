"""Turn the JSON of one device run (bench/device_run.py's $OUT) into the committed bench/results files.

    python bench/report.py /work/.device/<files_at>            # writes bench/results/device_run/*.json + .md

Copies every phase JSON to bench/results/device_run/<phase>.json and writes bench/results/device_run.md:
the environment (device, torch, torchao, triton, git commit, command), the smoke checks, the linear table
(median ms, speed-up vs BF16 and vs torchao tensorwise per shape), the GPT train-step table (tokens/s,
speed-ups, peak memory, FP8 GEMMs per step), the GPU test summary and the INT4 / monitor results.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, table  # noqa: E402
from device_run import PHASE_NAMES  # noqa: E402
from linear import render as linear_table  # noqa: E402


def _ratio(r: dict, base: str) -> str:
    value = r.get(f"speedup_vs_{base}")
    return f"{value:.2f}×" if value else ""


def train_table(result: dict) -> str:
    rows = []
    for variant, r in result["results"].items():
        if r.get("status") != "ok":
            rows.append([variant, r.get("status", "?"), "", "", "", "", ""])
            continue
        peak = "" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.1f}"
        rows.append(
            [
                variant,
                f"{r['tokens_per_s']:,.0f}",
                _ratio(r, "bf16-standard"),
                _ratio(r, "torchao-tensorwise"),
                f"{r['median_ms']:.1f}",
                peak,
                r["fp8_gemms_per_step"],
            ]
        )
    cfg = result["config"]
    head = (
        f"GPT {result['params'] / 1e6:.0f}M params, d={cfg['d_model']}, {cfg['layers']} layers, "
        f"seq {cfg['seq']}, batch {cfg['batch']}"
    )
    heads = ["variant", "tokens/s", "vs bf16", "vs torchao", "step ms", "peak GiB", "FP8 GEMMs/step"]
    return head + "\n\n" + table(heads, rows)


def section(name: str, record: dict) -> list[str]:
    lines = [f"## {name}: {record['status']}", ""]
    if record.get("reason"):
        lines += [record["reason"], ""]
    result = record.get("result")
    if record.get("command"):
        lines += [f"`{record['command']}` ({record.get('seconds')} s)", ""]
    if not result:
        if record["status"] not in ("ok", "skipped"):
            lines += ["```", record.get("output_tail", "")[-2000:], "```", ""]
        return lines
    if name == "smoke":
        rows = [
            [
                check,
                "ok" if r["ok"] else "FAILED",
                json.dumps({k: v for k, v in r.items() if k not in ("ok", "traceback")})[:200],
            ]
            for check, r in result["checks"].items()
        ]
        lines += ["```", table(["check", "status", "numbers"], rows), "```"]
    elif name.startswith("linear"):
        variants = list(result["results"][0]["variants"])
        lines += ["```", linear_table(result["results"], variants), "```"]
    elif name == "train_step":
        lines += ["```", train_table(result), "```"]
    elif name == "pytest_gpu":
        lines += [", ".join(f"{v} {k}" for k, v in result.items())]
    else:
        lines += [
            "```json",
            json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1, default=str)[:3000],
            "```",
        ]
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="the folder holding the phase JSONs of one device run")
    parser.add_argument("--dest", type=Path, default=RESULTS / "device_run")
    args = parser.parse_args(argv)
    records = {}
    for name in PHASE_NAMES:
        path = args.run_dir / f"{name}.json"
        if path.exists():
            records[name] = json.loads(path.read_text())
    if not records:
        print(f"report: no phase JSON in {args.run_dir}", file=sys.stderr)
        return 2
    args.dest.mkdir(parents=True, exist_ok=True)
    for name in records:
        shutil.copy(args.run_dir / f"{name}.json", args.dest / f"{name}.json")
    env = next(
        (
            r["result"]["environment"]
            for r in records.values()
            if isinstance(r.get("result"), dict) and "environment" in r["result"]
        ),
        {},
    )
    lines = [
        "# One device run (bench/device_run.sh)",
        "",
        "Ratios are from this one run (variants interleaved round-robin); compare nothing across runs.",
        "",
        *(
            f"- {k}: {env.get(k)}"
            for k in ("device", "capability", "torch", "cuda", "triton", "torchao", "git_commit", "time_utc")
        ),
        "",
    ]
    for name, record in records.items():
        lines += section(name, record)
    md = args.dest.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    print(f"wrote {md} and {len(records)} JSON files under {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
