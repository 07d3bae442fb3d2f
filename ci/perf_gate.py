#!/usr/bin/env python3
"""CI performance gate (issue 4).

1. Load: alternated rounds (default 5 x 3 s) of the ``ka64`` scenario (wrk -t1
   -c64 keep-alive on ``/``) against Dispa and nginx, same worker count, same
   CPU pinning as perf/load/run.py.  Computes the MEDIAN OF PER-ROUND RATIOS
   Dispa/nginx for throughput and for proxy CPU per request and compares them
   with perf/baseline.json:
       rps ratio  <  baseline * (1 - tolerance)  -> regression
       cpu ratio  >  baseline * (1 + tolerance)  -> regression
2. Micro: if perf/micro holds pytest-benchmark tests, runs
   ``pytest perf/micro --benchmark-only --benchmark-json=...`` and checks each
   compiled-vs-pure speedup (pure median / compiled median) against the
   baseline's ``micro`` map (pairs are ``test_x_compiled``/``test_x_pure`` or
   ``test_x[compiled]``/``test_x[pure]``, other parameters kept in the key; the
   ids ``hotpath``/``rust``/``native``/``cython`` count as compiled and ``py``/``python``
   as pure).

Exit 0: no regression (missing baseline values are reported, not failed).
Exit 1: regression, or Dispa did not start (unless --allow-no-dispa).
Exit 2: the gate itself could not run (tools missing, bad arguments).

    python ci/perf_gate.py                          # the CI gate (< 1 min of load on 2 cores)
    python ci/perf_gate.py --inject-slowdown        # must FAIL: Dispa busy-waits 200 us/request
    python ci/perf_gate.py --update-baseline        # re-record perf/baseline.json
    python ci/perf_gate.py --dispa-cmd standin:haproxy --inject-slowdown   # failure demo without Dispa

See docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "perf" / "load"))
import harness as H  # noqa: E402

BASELINE = REPO / "perf" / "baseline.json"
MICRO_DIR = REPO / "perf" / "micro"
IMPLS = ("compiled", "pure")
# ids used for the two twins in perf/micro: compiled (Cython hot path, Rust) vs pure Python
IMPL_ALIASES = {"compiled": "compiled", "hotpath": "compiled", "rust": "compiled", "native": "compiled",
                "cython": "compiled", "pure": "pure", "py": "pure", "python": "pure"}


# --------------------------------------------------------------------------- load

def run_load(a) -> dict:
    env = {}
    if a.inject_slowdown is not None:
        env["DISPA_PERF_SLOWDOWN_US"] = str(a.inject_slowdown)
    cfg = H.Config(proxies=["dispa", "nginx"], scenarios=["ka64"], rounds=a.rounds, duration=a.duration,
                   workers=a.workers, dispa_cmd=a.dispa_cmd, dispa_env=env, warmup=1.0)
    doc = H.run_rounds(cfg)
    res: dict = {"doc": doc, "dispa_status": doc["proxies"].get("dispa", {}).get("status"),
                 "dispa_error": doc["proxies"].get("dispa", {}).get("error", "")}
    r = doc["ratios"].get("dispa", {}).get("vs_nginx", {}).get("ka64", {})
    res["rps_ratio"] = r.get("rps", {}).get("median")
    res["cpu_ratio"] = r.get("cpu_us_per_req", {}).get("median")
    res["rps_ratio_rounds"] = r.get("rps", {}).get("per_round", [])
    res["cpu_ratio_rounds"] = r.get("cpu_us_per_req", {}).get("per_round", [])
    for n in ("dispa", "nginx"):
        st = doc["summary"].get(n, {}).get("ka64", {})
        res[f"{n}_rps"] = st.get("rps", {}).get("median")
        res[f"{n}_cpu_us_per_req"] = st.get("cpu_us_per_req", {}).get("median")
        res[f"{n}_errors"] = st.get("errors", {}).get("max")
    return res


def merge_loads(l1: dict, l2: dict) -> dict:
    """Combine two gate runs: ratios = median over the per-round ratios of both."""
    import statistics
    out = dict(l2)
    if l2["dispa_status"] != "ok":
        return out
    out["rps_ratio_rounds"] = l1["rps_ratio_rounds"] + l2["rps_ratio_rounds"]
    out["cpu_ratio_rounds"] = l1["cpu_ratio_rounds"] + l2["cpu_ratio_rounds"]
    if out["rps_ratio_rounds"]:
        out["rps_ratio"] = statistics.median(out["rps_ratio_rounds"])
    if out["cpu_ratio_rounds"]:
        out["cpu_ratio"] = statistics.median(out["cpu_ratio_rounds"])
    out["dispa_errors"] = max(l1.get("dispa_errors") or 0, l2.get("dispa_errors") or 0)
    out["first_run"] = {k: v for k, v in l1.items() if k != "doc"}
    return out


# --------------------------------------------------------------------------- micro

def micro_tests_present() -> bool:
    return MICRO_DIR.is_dir() and any(any(MICRO_DIR.rglob(g)) for g in ("test_*.py", "*_test.py", "bench_*.py"))


def split_impl(fullname: str) -> tuple[str, str] | None:
    """'m.py::test_x_compiled' -> ('m.py::test_x', 'compiled');
    'm.py::test_x[pure-64]' -> ('m.py::test_x[64]', 'pure'); None if no impl marker."""
    m = re.match(r"^(.*?)(\[(.*)\])?$", fullname)
    base, params = m.group(1), m.group(3)
    if params is not None:
        toks = params.split("-")
        hits = [t for t in toks if t in IMPL_ALIASES]
        if len(hits) == 1:
            rest = [t for t in toks if t not in IMPL_ALIASES]
            return base + (f"[{'-'.join(rest)}]" if rest else ""), IMPL_ALIASES[hits[0]]
    for alias, impl in IMPL_ALIASES.items():
        if base.endswith("_" + alias):
            key = base[: -len(alias) - 1]
            return key + (f"[{params}]" if params is not None else ""), impl
    return None


def micro_ratios(bench_json: dict) -> dict[str, dict]:
    pairs: dict[str, dict] = {}
    for b in bench_json.get("benchmarks", []):
        name = b.get("fullname") or b.get("name")
        s = split_impl(name)
        if not s:
            continue
        key, impl = s
        pairs.setdefault(key, {})[impl] = b["stats"]["median"]
    out = {}
    for key, d in sorted(pairs.items()):
        if "compiled" in d and "pure" in d and d["compiled"] > 0:
            out[key] = {"speedup": d["pure"] / d["compiled"], "compiled_median_s": d["compiled"],
                        "pure_median_s": d["pure"]}
    return out


def run_micro(timeout: float) -> dict:
    if not micro_tests_present():
        return {"status": "skipped", "reason": "perf/micro has no benchmark tests"}
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        return {"status": "skipped", "reason": "pytest-benchmark not installed (pip install -e .[test])"}
    with tempfile.TemporaryDirectory() as td:
        out = os.path.join(td, "bench.json")
        # run from the repo root so pyproject's python_files (bench_*.py) applies; -o repeats it
        # for checkouts whose config lacks it
        cmd = [sys.executable, "-m", "pytest", str(MICRO_DIR.relative_to(REPO)), "--benchmark-only",
               "-o", "python_files=test_*.py bench_*.py *_test.py",
               f"--benchmark-json={out}", "-q", "-p", "no:cacheprovider", "--benchmark-disable-gc",
               "--benchmark-max-time=0.5"]
        H.log("micro: " + " ".join(cmd))
        try:
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "error", "reason": f"pytest perf/micro timed out after {timeout:.0f}s"}
        if p.returncode not in (0, 5) or not os.path.exists(out):  # 5 = no tests collected
            return {"status": "error", "reason": f"pytest rc={p.returncode}: {(p.stdout + p.stderr)[-800:]}"}
        if not os.path.exists(out):
            return {"status": "skipped", "reason": "no benchmarks collected"}
        data = json.load(open(out))
    return {"status": "ok", "ratios": micro_ratios(data), "benchmarks": len(data.get("benchmarks", []))}


# --------------------------------------------------------------------------- verdict

def compare(a, base: dict, load: dict | None, micro: dict | None) -> tuple[list[str], list[str]]:
    fails, notes = [], []
    tol = float(base.get("tolerance", 0.2))
    if load is not None:
        if load["dispa_status"] != "ok":
            msg = f"Dispa did not start/run: {load['dispa_status']}: {load['dispa_error'][:500]}"
            (notes if a.allow_no_dispa else fails).append(msg)
        else:
            for key, meas, worse_if_lower, label in (
                    ("ka64_rps_ratio_vs_nginx", load["rps_ratio"], True, "throughput Dispa/nginx"),
                    ("ka64_cpu_ratio_vs_nginx", load["cpu_ratio"], False, "CPU-per-request Dispa/nginx")):
                b = base.get(key)
                if meas is None:
                    fails.append(f"{label}: no measurement (see the table above)")
                    continue
                if b is None:
                    notes.append(f"{label} = {meas:.3f}: no baseline yet (run with --update-baseline)")
                    continue
                lim = b * (1 - tol) if worse_if_lower else b * (1 + tol)
                bad = meas < lim if worse_if_lower else meas > lim
                line = (f"{label} = {meas:.3f} (baseline {b:.3f}, tolerance {tol:.0%}, "
                        f"{'min' if worse_if_lower else 'max'} allowed {lim:.3f})")
                if bad:
                    fails.append("REGRESSION " + line)
                else:
                    notes.append("ok " + line)
                    better = meas > b * (1 + tol) if worse_if_lower else meas < b * (1 - tol)
                    if better:
                        notes.append(f"   {label} improved beyond tolerance: consider --update-baseline")
            if (load.get("dispa_errors") or 0) > 0:
                fails.append(f"Dispa answered with errors during ka64 (max {load['dispa_errors']} per round)")
    if micro is not None:
        if micro["status"] == "error":
            fails.append("micro benchmarks failed: " + micro["reason"])
        elif micro["status"] == "skipped":
            notes.append("micro benchmarks skipped: " + micro["reason"])
        else:
            mtol = float(base.get("micro_tolerance", 0.5))
            bm = base.get("micro") or {}
            for key, r in micro["ratios"].items():
                b = bm.get(key)
                if b is None:
                    notes.append(f"micro {key}: speedup {r['speedup']:.2f}x, no baseline yet")
                elif r["speedup"] < b * (1 - mtol):
                    fails.append(f"REGRESSION micro {key}: compiled/pure speedup {r['speedup']:.2f}x < "
                                 f"baseline {b:.2f}x * (1 - {mtol:.0%})")
                else:
                    notes.append(f"ok micro {key}: speedup {r['speedup']:.2f}x (baseline {b:.2f}x)")
            for key in bm:
                if key not in micro["ratios"]:
                    notes.append(f"micro {key}: in baseline but not measured (renamed or skipped?)")
    return fails, notes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--dispa-cmd", help="as in perf/load/run.py (template, or standin:nginx|standin:haproxy)")
    ap.add_argument("--inject-slowdown", type=int, nargs="?", const=200, default=None, metavar="US",
                    help="run Dispa with DISPA_PERF_SLOWDOWN_US=US (default 200): the gate must then fail")
    ap.add_argument("--baseline", default=str(BASELINE))
    ap.add_argument("--update-baseline", action="store_true", help="rewrite the baseline with this run's values")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--micro-timeout", type=float, default=150.0)
    ap.add_argument("--allow-no-dispa", action="store_true",
                    help="do not fail when Dispa cannot start (before the server exists)")
    ap.add_argument("--no-confirm", dest="confirm", action="store_false",
                    help="fail on the first run; by default a suspected load regression is re-measured once "
                         "and judged on the median over both runs' rounds")
    ap.add_argument("--json", help="write the gate's measurements and verdict here")
    a = ap.parse_args(argv)
    if a.update_baseline and a.inject_slowdown is not None:
        print("perf gate: refusing to record a baseline with an injected slowdown", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    import signal

    def _term(*_):  # CI timeouts send SIGTERM: unwind so the proxies and backend are stopped
        raise SystemExit(143)
    signal.signal(signal.SIGTERM, _term)
    try:
        base = json.load(open(a.baseline))
    except FileNotFoundError:
        base = {"tolerance": 0.2, "micro_tolerance": 0.5, "micro": {}}
    load = micro = None
    try:
        if not a.skip_load:
            load = run_load(a)
            print(H.markdown(load["doc"]))
            print()
            lf, _ = compare(a, base, load, None)
            if lf and a.confirm and load["dispa_status"] == "ok" and not a.update_baseline:
                # noisy shared machine: confirm a suspected regression with a second set of
                # rounds and judge the median over all per-round ratios of both runs
                H.log(f"suspected regression ({'; '.join(lf)}); confirming with {a.rounds} more rounds")
                load = merge_loads(load, run_load(a))
                print(f"confirmation run: median over {len(load['rps_ratio_rounds'])} rounds")
        if not a.skip_micro:
            micro = run_micro(a.micro_timeout)
            mf, _ = compare(a, base, None, micro)
            if mf and a.confirm and micro["status"] == "ok" and not a.update_baseline:
                # sub-microsecond benchmarks on a shared machine swing by up to 2x: re-run once
                # and keep, per pair, the better of the two speedups
                H.log(f"suspected micro regression ({len(mf)}); re-running perf/micro once")
                m2 = run_micro(a.micro_timeout)
                if m2["status"] == "ok":
                    for k, r in m2["ratios"].items():
                        if k not in micro["ratios"] or r["speedup"] > micro["ratios"][k]["speedup"]:
                            micro["ratios"][k] = r
                    micro["confirmed"] = True
    except Exception as e:  # noqa: BLE001
        print(f"perf gate: could not run: {e}", file=sys.stderr)
        return 2
    fails, notes = compare(a, base, load, micro)
    if load is not None and load["dispa_status"] == "ok":
        print(f"ka64 per-round Dispa/nginx rps ratios: {[round(x, 3) for x in load['rps_ratio_rounds']]}")
        print(f"ka64 per-round Dispa/nginx CPU/req ratios: {[round(x, 3) for x in load['cpu_ratio_rounds']]}")
    for n in notes:
        print("perf gate: " + n)
    for f in fails:
        print("perf gate: " + f, file=sys.stderr)
    if a.json:
        slim = {k: v for k, v in (load or {}).items() if k != "doc"}
        json.dump({"load": slim, "load_doc": (load or {}).get("doc"), "micro": micro, "fails": fails,
                   "notes": notes, "inject_slowdown_us": a.inject_slowdown}, open(a.json, "w"), indent=1,
                  default=str)
    if a.update_baseline:
        if load is not None and load["dispa_status"] != "ok":
            print("perf gate: not updating the baseline: Dispa did not run", file=sys.stderr)
            return 1
        new = dict(base)
        new.setdefault("tolerance", 0.2)
        new.setdefault("micro_tolerance", 0.5)
        if load is not None:
            new["ka64_rps_ratio_vs_nginx"] = round(load["rps_ratio"], 4)
            new["ka64_cpu_ratio_vs_nginx"] = round(load["cpu_ratio"], 4)
            new["reference_ka64"] = {k: (round(load[k], 2) if isinstance(load[k], float) else load[k])
                                     for k in ("dispa_rps", "nginx_rps", "dispa_cpu_us_per_req",
                                               "nginx_cpu_us_per_req")}
        if micro is not None and micro["status"] == "ok":
            new["micro"] = {k: round(v["speedup"], 3) for k, v in micro["ratios"].items()}
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                    text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            commit = ""
        if load is not None:
            new["recorded"] = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "rounds": a.rounds,
                               "duration_s": a.duration, "workers": a.workers,
                               "dispa_cmd": a.dispa_cmd or "default", "cpus": len(os.sched_getaffinity(0))}
        if micro is not None and micro["status"] == "ok":
            new["recorded_micro"] = {"date": time.strftime("%Y-%m-%d"), "commit": commit,
                                     "benchmarks": micro["benchmarks"]}
        with open(a.baseline, "w") as f:
            json.dump(new, f, indent=2)
            f.write("\n")
        print(f"perf gate: baseline written to {a.baseline}")
        return 0
    el = time.monotonic() - t0
    if fails:
        print(f"perf gate: FAIL ({len(fails)} problem(s), {el:.0f} s)", file=sys.stderr)
        return 1
    print(f"perf gate: PASS ({el:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
