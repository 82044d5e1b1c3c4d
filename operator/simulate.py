"""`baton simulate`: replay a request trace through the autoscaling policy and a queueing
model of the pools, and compare with the smallest static fleet that meets the same targets
and with the oracle, a fleet that follows the load exactly.

    baton simulate --model examples/traces/model.yaml --trace examples/traces/surges.csv \\
        --out surges.json --plot surges.png [--profile profile.json] [--startup-seconds 90]

The JSON holds, for the autoscaled run: ttft_slo_attainment and itl_slo_attainment (shares
of all requests within the Model's targets), worst_window_ttft_attainment and
worst_window_itl_attainment (the lowest share among the requests arriving in any 5-minute
window: baton.operator.autoscaler.windows), gpu_hours and cost (from costPerHour); "static"
with the same keys (plus the fleet) for the smallest fixed fleet meeting both whole-trace
attainment targets in the same simulator; "oracle" with the GPU hours and cost of a fleet
that follows the load exactly with the same start-up time and scale-down window (a lower
bound: baton.operator.autoscaler.oracle); gpu_hours_vs_static and gpu_hours_vs_oracle. The
plot shows load, replicas per role and pool (static and oracle fleets drawn over them),
p95 latency over the last minute, and attainment over the last 5 minutes with the worst
window marked. The model of the pools is described in baton.operator.autoscaler.simulator.
Replica start-up defaults to the Model's autoscaling.startupSeconds (at least 30 s).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from baton.operator.autoscaler.family import FAMILY_PROFILE, FamilyMember, family_member
from baton.operator.autoscaler.headroom import feasibility, trace_load
from baton.operator.autoscaler.oracle import OracleFleet
from baton.operator.autoscaler.policy import ROLES
from baton.operator.autoscaler.profile import load_profile
from baton.operator.autoscaler.simulator import MIN_STARTUP_SECONDS, RunResult, Simulator, Trace
from baton.operator.autoscaler.windows import WINDOW_SECONDS
from baton.operator.spec import SpecError, load_model_file

__all__ = ["main", "simulate", "simulate_member", "simulate_family", "family_table", "plot",
           "Simulation", "meets_bars", "WORST_WINDOW_BAR", "ORACLE_BAR"]

WORST_WINDOW_BAR = 0.90
"""A feasible trace keeps at least this share within each target in its worst 5 minutes ..."""
ORACLE_BAR = 1.15
"""... and uses at most this many times the oracle's GPU hours."""


@dataclass
class Simulation:
    """What `baton simulate` computed: the report (the JSON) and the runs it drew from."""

    report: dict
    run: RunResult
    static: RunResult
    oracle: OracleFleet


def simulate(model_path: str | Path, trace_path: str | Path,
             profile_path: str | Path | None = None,
             startup_seconds: float | None = None) -> Simulation:
    """Runs the autoscaled replay, the static search and the oracle. startup_seconds: None
    takes the Model's autoscaling.startupSeconds (at least MIN_STARTUP_SECONDS)."""
    model, _ = load_model_file(model_path)
    profile = load_profile(profile_path)
    trace = Trace.load_csv(trace_path)
    if startup_seconds is None:
        startup_seconds = max(MIN_STARTUP_SECONDS,
                              float(model.spec.autoscaling.startup_seconds))
    sim = Simulator(model.spec, profile, trace, startup_seconds=startup_seconds)
    started = time.perf_counter()
    initial = sim.initial_fleet()
    run = sim.run(initial, autoscale=True)
    fleet, static, static_ok = sim.search_static()
    oracle = sim.oracle()
    targets = model.spec.autoscaling.targets
    peak: dict[str, dict[str, int]] = {role: {} for role in ROLES}
    for replicas in [initial] + run.timeline["replicas"]:
        for role in ROLES:
            for pool, n in replicas[role].items():
                peak[role][pool] = max(peak[role].get(pool, 0), n)
    verdict = feasibility(model.spec, trace_load(
        trace.time_s, trace.prompt_tokens, trace.output_tokens, trace.duration,
        targets.inter_token_latency_seconds))
    report = {
        "model": f"{model.namespace}/{model.name}",
        "trace": Path(trace_path).name,
        "requests": int(len(trace.time_s)),
        "duration_s": trace.duration,
        "targets": {"time_to_first_token_seconds": targets.time_to_first_token_seconds,
                    "inter_token_latency_seconds": targets.inter_token_latency_seconds,
                    "attainment": targets.attainment},
        "profile": profile.to_dict(),
        "profile_source": str(profile_path) if profile_path else "default (H100 roofline "
                          "estimate, baton.operator.autoscaler.profile)",
        "startup_seconds": startup_seconds,
        "scale_down_stabilization_seconds":
            model.spec.autoscaling.scale_down_stabilization_seconds,
        **run.summary(),
        "worst_window_seconds": WINDOW_SECONDS,
        "meets_targets": bool(run.ttft_slo_attainment >= targets.attainment
                              and run.itl_slo_attainment >= targets.attainment),
        "gpu_hours_vs_static": round(run.gpu_hours / static.gpu_hours, 4),
        "gpu_hours_vs_oracle": round(run.gpu_hours / oracle.gpu_hours, 4),
        "decisions": run.decisions,
        "scale_events": run.scale_events,
        "feasibility": verdict.summary(),
        "initial_fleet": initial,
        "peak_fleet": peak,
        "static": {**static.summary(), "fleet": fleet, "meets_targets": static_ok},
        "oracle": oracle.summary(),
        "timeline": {
            "time_s": run.timeline["time"],
            "request_rate": [round(v, 3) for v in run.timeline["request_rate"]],
            "replicas": run.timeline["replicas"],
            "reason": run.timeline["reason"],
        },
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    return Simulation(report, run, static, oracle)


def meets_bars(entry: dict, attainment: float) -> bool:
    """Whether one trace's figures meet the family's bars: both attainments overall, the
    worst 5 minutes of each at WORST_WINDOW_BAR, GPU hours within ORACLE_BAR of the oracle."""
    return bool(entry["ttft_slo_attainment"] >= attainment
                and entry["itl_slo_attainment"] >= attainment
                and entry["worst_window_ttft_attainment"] >= WORST_WINDOW_BAR
                and entry["worst_window_itl_attainment"] >= WORST_WINDOW_BAR
                and entry["gpu_hours_vs_oracle"] <= ORACLE_BAR)


def simulate_member(member: FamilyMember, *, static: bool = False) -> dict:
    """One family member's figures: the autoscaled run, the oracle (and the smallest static
    fleet when `static`), scale events, and whether the spec can absorb its ramps."""
    spec = member.spec
    started = time.perf_counter()
    sim = Simulator(spec, FAMILY_PROFILE, member.trace,
                    startup_seconds=max(MIN_STARTUP_SECONDS,
                                        float(spec.autoscaling.startup_seconds)))
    run = sim.run(sim.initial_fleet(), autoscale=True)
    oracle = sim.oracle()
    verdict = member.feasibility()
    entry = {"name": member.name, "shape": member.describe(),
             "requests": int(len(member.trace.time_s)), "duration_s": member.trace.duration,
             **run.summary(), "oracle_gpu_hours": round(oracle.gpu_hours, 4),
             "gpu_hours_vs_oracle": round(run.gpu_hours / oracle.gpu_hours, 4),
             "decisions": run.decisions, "scale_events": run.scale_events,
             "feasible": verdict.feasible, "feasibility": verdict.reason,
             "ramp_rise": round(verdict.rise, 4), "ramp_allowed": round(verdict.allowed, 4)}
    if static:
        fleet, static_run, static_ok = sim.search_static()
        entry.update({"static_gpu_hours": round(static_run.gpu_hours, 4),
                      "static_fleet": fleet, "static_meets_targets": static_ok,
                      "gpu_hours_vs_static": round(run.gpu_hours / static_run.gpu_hours, 4)})
    entry["meets_bars"] = meets_bars(entry, spec.autoscaling.targets.attainment)
    entry["wall_seconds"] = round(time.perf_counter() - started, 2)
    return entry


def simulate_family(n: int, seed: int, *, static: bool = False, progress=None) -> dict:
    """Members 0..n-1 of the family drawn from `seed` (baton.operator.autoscaler.family),
    each simulated (simulate_member), and what holds over the family."""
    traces = []
    for index in range(n):
        entry = simulate_member(family_member(seed, index), static=static)
        traces.append(entry)
        if progress is not None:
            progress(entry)
    feasible = [e for e in traces if e["feasible"]]

    def lowest(key: str, entries: list[dict]) -> float | None:
        return min((e[key] for e in entries), default=None)
    summary = {
        "traces": n, "seed": seed, "feasible": len(feasible),
        "feasible_meeting_bars": sum(e["meets_bars"] for e in feasible),
        "infeasible": [{"name": e["name"], "why": e["feasibility"]}
                       for e in traces if not e["feasible"]],
        "bars": {"attainment": "the spec's (0.95)", "worst_window": WORST_WINDOW_BAR,
                 "gpu_hours_vs_oracle": ORACLE_BAR},
    }
    for label, entries in (("feasible", feasible), ("all", traces)):
        if not entries:
            continue
        group = summary[f"over_{label}"] = {
            key: lowest(key, entries) for key in (
                "ttft_slo_attainment", "itl_slo_attainment", "worst_window_ttft_attainment",
                "worst_window_itl_attainment")}
        group["max_gpu_hours_vs_oracle"] = max(e["gpu_hours_vs_oracle"] for e in entries)
        group["gpu_hours_vs_oracle"] = round(
            sum(e["gpu_hours"] for e in entries)
            / sum(e["oracle_gpu_hours"] for e in entries), 4)
        if static:
            group["gpu_hours_vs_static"] = round(
                sum(e["gpu_hours"] for e in entries)
                / sum(e["static_gpu_hours"] for e in entries), 4)
        group["scale_events"] = sum(e["scale_events"] for e in entries)
    return {"summary": summary, "traces": traces}


def family_table(report: dict) -> str:
    """A Markdown table of a family report: one row per trace, then the summary."""
    static = any("static_gpu_hours" in e for e in report["traces"])
    head = ["trace", "feasible", "requests", "TTFT", "TTFT worst 5 min", "ITL",
            "ITL worst 5 min", "GPU-h", "vs oracle"] + (["vs static"] if static else []) + [
            "scale events", "meets bars", "rise / allowed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in report["traces"]:
        row = [e["name"], "yes" if e["feasible"] else "no", str(e["requests"]),
               f"{e['ttft_slo_attainment']:.3f}", f"{e['worst_window_ttft_attainment']:.3f}",
               f"{e['itl_slo_attainment']:.3f}", f"{e['worst_window_itl_attainment']:.3f}",
               f"{e['gpu_hours']:.1f}", f"{e['gpu_hours_vs_oracle']:.2f}"]
        if static:
            row.append(f"{e['gpu_hours_vs_static']:.2f}")
        row += [str(e["scale_events"]), "yes" if e["meets_bars"] else "no",
                f"{e['ramp_rise']:.2f} / {e['ramp_allowed']:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    s = report["summary"]
    lines.append("")
    lines.append(f"{s['traces']} traces (seed {s['seed']}): {s['feasible']} feasible, "
                 f"{s['feasible_meeting_bars']} of them meet every bar.")
    for label in ("feasible", "all"):
        if f"over_{label}" in s:
            x = s[f"over_{label}"]
            lines.append(
                f"{label}: lowest TTFT {x['ttft_slo_attainment']:.3f} (worst 5 min "
                f"{x['worst_window_ttft_attainment']:.3f}), lowest ITL "
                f"{x['itl_slo_attainment']:.3f} (worst 5 min "
                f"{x['worst_window_itl_attainment']:.3f}); GPU-h vs oracle "
                f"{x['gpu_hours_vs_oracle']:.3f} overall, at most "
                f"{x['max_gpu_hours_vs_oracle']:.3f}"
                + (f"; vs static {x['gpu_hours_vs_static']:.3f}" if "gpu_hours_vs_static" in x
                   else "") + f"; {x['scale_events']} scale events")
    return "\n".join(lines) + "\n"


def plot(result: Simulation, path: str | Path) -> None:
    """Load; replicas per role and pool with the static (dashed) and oracle (dotted) fleets;
    p95 latency over the last minute against the targets; attainment over the last
    5 minutes with the worst window marked, the static fleet's beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    report, run = result.report, result.run
    tl = run.timeline
    minutes = [t / 60 for t in tl["time"]]
    # the fleet from t = 0 until the first decision
    fleet_minutes = [0.0] + minutes
    fleets = [report["initial_fleet"]] + tl["replicas"]
    fig, axes = plt.subplots(5, 1, figsize=(11, 15), sharex=True)
    ax = axes[0]
    ax.plot(minutes, tl["request_rate"], color="black", label="requests/s")
    ax.set_ylabel("requests/s")
    ax2 = ax.twinx()
    ax2.plot(minutes, [v / 1000 for v in tl["prompt_tokens_per_second"]], color="tab:gray",
             alpha=0.6, label="prompt ktokens/s")
    ax2.set_ylabel("prompt ktokens/s")
    ax.set_title(
        f"{report['model']} on {report['trace']}: autoscaled {report['gpu_hours']:.1f} GPU-h, "
        f"static {report['static']['gpu_hours']:.1f} "
        f"({100 * report['gpu_hours_vs_static']:.0f}%), oracle "
        f"{report['oracle']['gpu_hours']:.1f} ({100 * report['gpu_hours_vs_oracle']:.0f}%)\n"
        f"attainment TTFT {report['ttft_slo_attainment']:.3f} (worst 5 min "
        f"{report['worst_window_ttft_attainment']:.3f}), ITL "
        f"{report['itl_slo_attainment']:.3f} (worst 5 min "
        f"{report['worst_window_itl_attainment']:.3f})", fontsize=10)
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    oracle_minutes = np.arange(len(result.oracle.total("prefill"))) / 60
    for ax, role in zip(axes[1:3], ROLES):
        pools = list(report["static"]["fleet"][role])
        series = [[r[role][p] for r in fleets] for p in pools]
        ax.stackplot(fleet_minutes, *series, labels=[f"{role} {p}" for p in pools], step="post",
                     alpha=0.8)
        ax.axhline(sum(report["static"]["fleet"][role].values()), color="black",
                   linestyle="--", label=f"static fleet ({report['static']['fleet'][role]})")
        ax.plot(oracle_minutes, result.oracle.total(role), color="black", linestyle=":",
                linewidth=1.2, label="oracle fleet (follows the load exactly)")
        ax.set_ylabel(f"{role} replicas")
        ax.legend(loc="upper left", fontsize=8)
    ax = axes[3]
    targets = report["targets"]
    ttft = [v / targets["time_to_first_token_seconds"] if v is not None else None
            for v in tl["ttft_p95"]]
    gap = [v / targets["inter_token_latency_seconds"] if v is not None else None
           for v in tl["gap_p95"]]
    ax.plot(minutes, ttft, label="p95 TTFT / target (last minute)")
    ax.plot(minutes, gap, label="p95 mean token gap / ITL target (last minute)")
    ax.axhline(1.0, color="red", linestyle=":", label="target")
    ax.set_ylabel("latency / target")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[4]
    for key, label, color in (("ttft", "TTFT", "tab:blue"), ("itl", "ITL", "tab:orange")):
        ends, share = run.windows[key]
        ax.plot(ends / 60, share, color=color, label=f"{label} attainment, last 5 min")
        static_ends, static_share = result.static.windows[key]
        ax.plot(static_ends / 60, static_share, color=color, linestyle=":", alpha=0.7,
                label=f"{label}, static fleet")
        if np.any(~np.isnan(share)):
            i = int(np.nanargmin(share))
            ax.plot([ends[i] / 60], [share[i]], marker="v", color=color, markersize=9)
            ax.annotate(f"worst {label} {share[i]:.3f}", (ends[i] / 60, share[i]),
                        textcoords="offset points", xytext=(6, -12), fontsize=8, color=color)
    ax.axhline(targets["attainment"], color="red", linestyle=":",
               label=f"attainment target {targets['attainment']:g}")
    ax.axhline(0.9, color="gray", linestyle="--", linewidth=0.8, label="0.90")
    ax.set_ylabel("share within target")
    ax.set_xlabel("minutes")
    low = min([0.85] + [float(np.nanmin(w[1])) for r in (run, result.static)
                        for w in r.windows.values() if np.any(~np.isnan(w[1]))])
    ax.set_ylim(max(0.0, low - 0.02), 1.005)
    ax.legend(loc="lower left", fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="baton simulate",
        description="Replay a request trace (CSV time_s,prompt_tokens,output_tokens) through "
                    "the autoscaler and a queueing model of the Model's pools.")
    parser.add_argument("--model", help="Model YAML file")
    parser.add_argument("--trace", help="trace CSV")
    parser.add_argument("--family", type=int, metavar="N",
                        help="instead of --model/--trace: simulate N traces of the seeded "
                             "family (baton.operator.autoscaler.family)")
    parser.add_argument("--seed", type=int, default=0, help="the family's seed (default 0)")
    parser.add_argument("--static", action="store_true",
                        help="with --family: also search each trace's smallest static fleet")
    parser.add_argument("--table", help="with --family: where to write a Markdown table")
    parser.add_argument("--profile", help="replica profile JSON (default: the built-in H100 "
                                          "estimate)")
    parser.add_argument("--out", required=True, help="where to write the JSON report")
    parser.add_argument("--plot", help="where to write a PNG of load, replicas and latency")
    parser.add_argument("--startup-seconds", type=float, default=None,
                        help=f"replica start-up time (>= {MIN_STARTUP_SECONDS:g}; default: "
                             "the Model's autoscaling.startupSeconds, at least that)")
    args = parser.parse_args(argv)
    if args.family is not None:
        if args.model or args.trace or args.plot or args.startup_seconds is not None:
            parser.error("--family draws its own Models and traces: it takes no --model, "
                         "--trace, --plot or --startup-seconds")
        if args.family < 1:
            parser.error(f"--family must be >= 1, got {args.family}")
        return _family_main(args)
    if not args.model or not args.trace:
        parser.error("--model and --trace are required (or --family N)")
    try:
        result = simulate(args.model, args.trace, args.profile, args.startup_seconds)
    except (OSError, SpecError, ValueError) as e:
        print(f"baton simulate: {e}", file=sys.stderr)
        return 2
    report = result.report
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
    print(f"{report['trace']}: autoscaled TTFT {report['ttft_slo_attainment']:.4f} "
          f"(worst 5 min {report['worst_window_ttft_attainment']:.4f}) "
          f"ITL {report['itl_slo_attainment']:.4f} "
          f"(worst 5 min {report['worst_window_itl_attainment']:.4f}) "
          f"{report['gpu_hours']:.2f} GPU-h cost {report['cost']:.2f}; static "
          f"{report['static']['fleet']} {report['static']['gpu_hours']:.2f} GPU-h "
          f"({100 * report['gpu_hours_vs_static']:.1f}%); oracle "
          f"{report['oracle']['gpu_hours']:.2f} GPU-h "
          f"({100 * report['gpu_hours_vs_oracle']:.1f}%)")
    return 0



def _family_main(args) -> int:
    def progress(e: dict) -> None:
        print(f"{e['name']}: {'feasible' if e['feasible'] else 'infeasible'}; TTFT "
              f"{e['ttft_slo_attainment']:.3f} (worst 5 min "
              f"{e['worst_window_ttft_attainment']:.3f}) ITL {e['itl_slo_attainment']:.3f} "
              f"(worst 5 min {e['worst_window_itl_attainment']:.3f}) GPU-h "
              f"{e['gpu_hours_vs_oracle']:.2f}x oracle; {e['scale_events']} scale events"
              + ("" if e["feasible"] else f"; {e['feasibility']}"), flush=True)
    report = simulate_family(args.family, args.seed, static=args.static, progress=progress)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    table = family_table(report)
    if args.table:
        Path(args.table).write_text(table)
    print(table.split("\n\n", 1)[1], end="")
    return 0 if report["summary"]["feasible_meeting_bars"] == report["summary"]["feasible"] \
        else 1


if __name__ == "__main__":
    sys.exit(main())
