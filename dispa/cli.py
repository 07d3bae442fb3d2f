"""Command-line entry points: ``dispa-server`` (run the proxy) and ``dispa`` (tools).

``dispa-server [--config FILE] [--workers auto|N] [--check] [--log-level L] [--log-format F] [--demo]``
``dispa --version``, ``dispa config check FILE...``, ``dispa config schema``, ``dispa doctor``

Exit codes: 0 success; 1 runtime failure (e.g. a port in use); 2 invalid configuration or
usage; 3 workers crash-looping.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys

import dispa
from dispa import _native
from dispa.errors import ConfigError, StartupError

EXIT_USAGE = 2


def _version_text() -> str:
    info = _native.build_info()
    lines = [f"dispa {dispa.__version__} (Python {platform.python_version()})"]
    for part, label in (("hotpath", "Cython hot path (dispa._hotpath)"),
                        ("rust", "Rust structures (dispa._rust)")):
        entry = info[part]
        if entry["in_use"]:
            detail = ", ".join(f"{k} {v}" for k, v in entry.items() if k not in ("built", "in_use"))
            lines.append(f"  {label}: compiled, in use ({detail})")
        else:
            lines.append(f"  {label}: pure-Python twin in use ({entry.get('reason', 'not built')})")
    return "\n".join(lines)


def parse_workers(value: str) -> int | None:
    """``auto`` -> None (one per usable CPU); a positive integer -> itself."""
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid --workers value {value!r}: use 'auto' or a whole number from 1 to 1024") from None
    if not 1 <= n <= 1024:
        raise argparse.ArgumentTypeError(
            f"invalid --workers value {value!r}: use 'auto' or a whole number from 1 to 1024")
    return n


def _print_issues(issues) -> None:
    for issue in issues:
        print(f"error: {issue.format()}", file=sys.stderr)


# ---------------------------------------------------------------------- dispa-server
def server_main(argv=None) -> int:
    """``dispa-server``: run the master and its workers until stopped."""
    p = argparse.ArgumentParser(prog="dispa-server",
                                description="Run the Dispa reverse proxy (master + workers).")
    p.add_argument("--config", "-c", metavar="FILE", help="configuration file (TOML or YAML)")
    p.add_argument("--workers", "-w", type=parse_workers, default=argparse.SUPPRESS,
                   metavar="auto|N", help="worker processes (default: the config's, else auto)")
    p.add_argument("--check", action="store_true", help="validate the configuration and exit")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["json", "logfmt", "text"])
    p.add_argument("--demo", action="store_true",
                   help="serve 127.0.0.1:8080 in front of a built-in demo upstream")
    p.add_argument("--demo-bind", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help=argparse.SUPPRESS)
    p.add_argument("--demo-admin-port", type=int, default=8081, help=argparse.SUPPRESS)
    p.add_argument("--version", action="version", version=_version_text())
    args = p.parse_args(argv)
    workers = getattr(args, "workers", None)
    workers_given = hasattr(args, "workers")

    from dispa.config import load_config, load_config_text
    from dispa.observability import logs

    if args.check:
        if not args.config:
            p.error("--check needs --config FILE")
        try:
            load_config(args.config)
        except ConfigError as exc:
            _print_issues(exc.errors)
            return EXIT_USAGE
        print(f"{args.config}: OK")
        return 0

    demo = args.demo or not args.config
    # The master runs plain asyncio: it is the control plane (no hot path), and workers are
    # forked from it, so it must hold no libuv state for them to inherit. Workers run uvloop.
    runner = asyncio.run

    async def amain() -> int:
        from dispa.server.master import Master
        extra = {}
        if demo:
            from dispa.server.demo import DEMO_CONFIG, start_demo_upstream
            _, port = await start_demo_upstream()
            text = DEMO_CONFIG.format(bind=args.demo_bind, port=port,
                                      admin_port=args.demo_admin_port)
            loaded = load_config_text(text, fmt="toml", name="<demo>")
            extra = {"demo_upstream": f"127.0.0.1:{port}"}
            path = None
        else:
            loaded = load_config(args.config)
            path = args.config
        logs.configure(args.log_format or loaded.log_format,
                       args.log_level or loaded.log_level, process="master")
        if demo:
            print(f"Dispa demo: try  curl -i http://{args.demo_bind}/hello   "
                  f"(admin: http://127.0.0.1:{args.demo_admin_port}/admin/status)",
                  file=sys.stderr, flush=True)
        master = Master(path, workers=workers if workers_given else None,
                        log_level=args.log_level, loaded=loaded,
                        slowdown_us=int(os.environ.get("DISPA_PERF_SLOWDOWN_US", "0") or 0),
                        extra_status=extra)
        if workers_given and workers is None:
            master.workers_override = 0  # explicit auto
        return await master.run()

    try:
        return runner(amain())
    except ConfigError as exc:
        _print_issues(exc.errors)
        return EXIT_USAGE
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


# ---------------------------------------------------------------------- dispa
def main(argv=None) -> int:
    """``dispa``: version, config check/schema, doctor."""
    p = argparse.ArgumentParser(prog="dispa", description="Dispa tools.")
    p.add_argument("--version", action="store_true", help="print versions and the compiled parts in use")
    sub = p.add_subparsers(dest="cmd")
    cfg = sub.add_parser("config", help="configuration tools")
    csub = cfg.add_subparsers(dest="config_cmd")
    chk = csub.add_parser("check", help="validate configuration files")
    chk.add_argument("files", nargs="+", metavar="FILE")
    csub.add_parser("schema", help="print the JSON Schema of the configuration")
    sub.add_parser("doctor", help="print build and environment information")
    args = p.parse_args(argv)

    if args.version:
        print(_version_text())
        return 0
    if args.cmd == "config":
        from dispa.config import check_file, json_schema
        if args.config_cmd == "check":
            bad = 0
            for f in args.files:
                issues = check_file(f)
                if issues:
                    bad += 1
                    _print_issues(issues)
                    print(f"{f}: {len(issues)} error(s)", file=sys.stderr)
                else:
                    print(f"{f}: OK")
            return EXIT_USAGE if bad else 0
        if args.config_cmd == "schema":
            print(json.dumps(json_schema(), indent=2))
            return 0
        cfg.print_help()
        return EXIT_USAGE
    if args.cmd == "doctor":
        info = {"dispa": dispa.__version__, "python": sys.version.split()[0],
                "platform": platform.platform(), "build": _native.build_info()}
        try:
            import uvloop
            info["uvloop"] = uvloop.__version__
        except ImportError:
            info["uvloop"] = None
        print(json.dumps(info, indent=2))
        return 0
    p.print_help()
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
