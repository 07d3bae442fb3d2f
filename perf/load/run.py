#!/usr/bin/env python3
"""Dispa load harness: Dispa vs nginx vs HAProxy on 127.0.0.1.

    python perf/load/run.py                       # 5 rounds x 5 s, all proxies, all scenarios
    python perf/load/run.py --quick --proxies nginx,haproxy --json /tmp/q.json
    python perf/load/run.py --scaling 1,2,4 --proxies dispa,nginx,haproxy
    python perf/load/run.py --dispa-cmd standin:nginx      # exercise the dispa slot

See perf/README.md and docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="alternated rounds (default 5; --quick 3)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per measurement (default 5; --quick 2)")
    ap.add_argument("--workers", type=int, default=1, help="workers/threads for every proxy (default 1)")
    ap.add_argument("--proxies", default="dispa,nginx,haproxy", help="comma list of dispa,nginx,haproxy")
    ap.add_argument("--scenarios", default=",".join(H.ALL_SCENARIOS), help="comma list of " + ",".join(H.ALL_SCENARIOS + H.EXTRA_SCENARIOS)
                    + " (default: all but " + ",".join(H.EXTRA_SCENARIOS) + ")")
    ap.add_argument("--json", help="write the full JSON document here")
    ap.add_argument("--markdown", help="also write the Markdown table here")
    ap.add_argument("--plots", help="write PNG plots into this directory (installs matplotlib if missing)")
    ap.add_argument("--quick", action="store_true",
                    help="3 rounds x 2 s, mem with 2,000 connections (about 90 s for nginx+haproxy on 2 cores)")
    ap.add_argument("--scaling", help="comma list of worker counts, e.g. 1,2,4: ka64 per worker count")
    ap.add_argument("--dispa-cmd", help="command template for Dispa ({config} {workers} {port} {backend_port} "
                                        "{python}); or standin:nginx / standin:haproxy. Default: dispa-server "
                                        "--config {config} --workers {workers} (or the same entry point via python)")
    ap.add_argument("--dispa-env", action="append", default=[], metavar="K=V", help="extra env for Dispa")
    ap.add_argument("--conns", type=int, default=64, help="wrk connections (default 64)")
    ap.add_argument("--lat-rate", type=float, default=2000, help="lat2k constant rate req/s (default 2000)")
    ap.add_argument("--lat-conns", type=int, default=16, help="pacer keep-alive connections (default 16)")
    ap.add_argument("--tracing-rate", type=float, default=0.01,
                    help="sampling_rate of the dispa-tracing-1pct variant (default 0.01; other values "
                         "show how its cost scales with the traces kept)")
    ap.add_argument("--no-awake", action="store_true",
                    help="lat2k: let the CPUs idle between requests (default: SCHED_IDLE spinners keep "
                         "them awake, harness.cpus_awake)")
    ap.add_argument("--mem-conns", type=int, default=None, help="idle connections for mem (default 10000; quick 2000)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir with configs and logs")
    ap.add_argument("--replot", metavar="JSON", help="no load: re-render the Markdown (and --plots) from a "
                                                      "previous --json document, keeping only --proxies")
    a = ap.parse_args(argv)
    if a.rounds is None:
        a.rounds = 3 if a.quick else 5
    if a.duration is None:
        a.duration = 2.0 if a.quick else 5.0
    if a.mem_conns is None:
        a.mem_conns = 2000 if a.quick else 10000
    return a


def make_config(a, workers: int, scenarios: list[str]) -> H.Config:
    env = dict(kv.split("=", 1) for kv in a.dispa_env)
    proxies = [p.strip() for p in a.proxies.split(",") if p.strip()]
    for p in proxies:
        if p not in H.KNOWN_PROXIES:
            raise SystemExit(f"unknown proxy {p!r}; known: {H.KNOWN_PROXIES}")
    for s in scenarios:
        if s not in H.ALL_SCENARIOS + H.EXTRA_SCENARIOS:
            raise SystemExit(f"unknown scenario {s!r}; known: {H.ALL_SCENARIOS + H.EXTRA_SCENARIOS}")
    return H.Config(proxies=proxies, scenarios=scenarios, rounds=a.rounds, duration=a.duration, workers=workers,
                    conns=a.conns, lat_rate=a.lat_rate, lat_conns=a.lat_conns, mem_conns=a.mem_conns,
                    dispa_cmd=a.dispa_cmd, dispa_env=env, keep_tmp=a.keep_tmp, awake=not a.no_awake,
                    tracing_rate=a.tracing_rate,
                    warmup=1.0 if a.quick else 2.0)


def main(argv=None) -> int:
    a = parse_args(argv)
    t0 = time.monotonic()
    import signal

    def _term(*_):
        raise SystemExit(143)
    signal.signal(signal.SIGTERM, _term)

    if a.replot:
        doc = json.load(open(a.replot))
        keep = set(p.strip() for p in a.proxies.split(",")) | {"direct"}
        for k in ("summary", "ratios"):
            doc[k] = {n: v for n, v in doc.get(k, {}).items() if n in keep}
        doc["proxies"] = {n: v for n, v in doc.get("proxies", {}).items() if n in keep}
        md = H.markdown(doc)
        print(md)
        if a.markdown:
            with open(a.markdown, "w") as f:
                f.write(md + "\n")
        if a.plots:
            for p in H.plots(doc, a.plots):
                H.log(f"plot {p}")
        return 0
    if a.scaling:
        ws = [int(w) for w in a.scaling.split(",")]
        doc = {"meta": {"mode": "scaling", "workers": ws}, "scaling": {}, "runs": {}}
        for w in ws:
            H.log(f"=== scaling: workers={w}")
            cfg = make_config(a, w, ["ka64"])
            d = H.run_rounds(cfg)
            doc["runs"][str(w)] = d
            doc["scaling"][str(w)] = {n: sc.get("ka64", {}) for n, sc in d["summary"].items()}
            doc["meta"].setdefault("layouts", {})[str(w)] = d["meta"]["layout"]
            doc["meta"]["config"] = d["meta"]["config"]
            doc["meta"]["started"] = doc["meta"].get("started", d["meta"]["started"])
        # the Markdown for a scaling run: the table of the last run + the scaling table
        last = doc["runs"][str(ws[-1])]
        md_doc = dict(last, scaling=doc["scaling"])
        md = H.markdown(md_doc)
        lay = "\n".join(f"- W={w}: proxy CPUs {l['proxy_cpus']}, load CPUs {l['load_cpus']}, backend workers "
                        f"{l['backend_workers']}, wrk threads {l['wrk_threads']} {l['note']}"
                        for w, l in doc["meta"]["layouts"].items())
        md += "\n\nCPU layouts:\n" + lay
        plot_doc = md_doc
    else:
        cfg = make_config(a, a.workers, [s.strip() for s in a.scenarios.split(",") if s.strip()])
        doc = H.run_rounds(cfg)
        md = H.markdown(doc)
        plot_doc = doc
    doc["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
    print(md)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        H.log(f"JSON written to {a.json}")
    if a.plots:
        for p in H.plots(plot_doc, a.plots):
            H.log(f"plot {p}")
    H.log(f"elapsed {doc['meta']['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
