"""The `report`, `gate` and `dashboard` sub-commands (added to `mmaudit` through
`audit.cli.COMMAND_MODULES`). Heavy imports happen inside the handlers."""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

from audit.errors import InputError

__all__ = ["add_commands", "cmd_report", "cmd_gate", "cmd_dashboard", "DASHBOARD_APP", "ERR_NO_STREAMLIT"]

DASHBOARD_APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
ERR_NO_STREAMLIT = "the dashboard needs streamlit and plotly (pip install 'mmaudit[dashboard]')"


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65535, got {value}")
    return value


def add_commands(sub) -> None:
    r = sub.add_parser("report", help="HTML, PDF or JSON audit report of a run",
                       description="Write RUN_DIR/report.<format> (or --out): a verdict on the cover (the "
                                   "policy's, else the worst finding), identity, data and its data card, protocol, "
                                   "fairness, safety, interpretability, privacy, mitigations, targets, the worst "
                                   "examples (runs recorded with --log-samples), limitations, SHA-256 manifest, the "
                                   "EU AI Act / NIST AI RMF / Model Card mapping and a glossary of every metric.")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument("--format", choices=("html", "pdf", "json"), default="html")
    r.add_argument("--out", metavar="PATH", help="where to write (default RUN_DIR/report.<format>); an existing file "
                                              "is replaced only when it is an earlier mmaudit report")
    r.add_argument("--force", action="store_true", help="replace an existing --out file that is not an mmaudit "
                                                        "report (never the run's own files or the model/data folders)")
    r.add_argument("--policy", metavar="POLICY.yaml", help="targets to check and the system's declared identity")
    r.add_argument("--baseline", metavar="RUN_DIR", help="run to compare against (default: the parent run)")
    r.add_argument("--store", metavar="DB_PATH", help="store holding the parent run (default ~/.mmaudit/store.duckdb)")
    r.set_defaults(handler=cmd_report)

    g = sub.add_parser("gate", help="check a run against a policy; exit 0 pass, 1 fail, 2 bad input",
                       description="Thresholds per metric and allowed regressions against a baseline run, printed "
                                   "as one table per kind. A thresholds-only policy (docs/policy.example.yaml) needs "
                                   "no --baseline. A metric named in the policy but absent from the run fails unless "
                                   "its rule says 'optional: true'. Exit 0 pass, 1 fail, 2 bad input.")
    g.add_argument("run_dir", metavar="RUN_DIR")
    g.add_argument("--policy", required=True, metavar="POLICY.yaml")
    g.add_argument("--baseline", metavar="RUN_DIR", help="run the policy's regressions compare against")
    g.set_defaults(handler=cmd_gate)

    d = sub.add_parser("dashboard", help="interactive Streamlit dashboard over the store",
                       description="Serve the dashboard (headless Streamlit). It binds 127.0.0.1 unless --host says "
                                   "otherwise, and has no authentication: do not expose it to untrusted networks.")
    d.add_argument("--store", metavar="DB_PATH", help="DuckDB store (default ~/.mmaudit/store.duckdb)")
    d.add_argument("--port", type=_port, default=8501)
    d.add_argument("--host", default="127.0.0.1")
    d.set_defaults(handler=cmd_dashboard)


def cmd_report(args: argparse.Namespace) -> int:
    from audit.report import build_report

    path = build_report(args.run_dir, args.format, out=args.out, store=args.store, baseline=args.baseline,
                        policy=args.policy, force=args.force)
    print(f"wrote {path}")
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    from audit.gate import cmd_gate as impl

    return impl(args)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dashboard_command(*, store: str | Path, host: str, port: int) -> tuple[list[str], dict]:
    """The streamlit command line and environment `mmaudit dashboard` runs."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(DASHBOARD_APP), "--server.headless", "true",
           "--server.address", host, "--server.port", str(port), "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none", "--global.developmentMode", "false",
           "--client.showSidebarNavigation", "false", "--client.toolbarMode", "viewer"]
    env = {**os.environ, "MMAUDIT_STORE": str(Path(store).resolve())}
    return cmd, env


def cmd_dashboard(args: argparse.Namespace) -> int:
    from audit.store import default_store_path

    try:
        import plotly  # noqa: F401
        import streamlit  # noqa: F401
    except ImportError as exc:
        raise InputError(ERR_NO_STREAMLIT, where="mmaudit dashboard") from exc
    store = Path(args.store) if args.store else default_store_path()
    if store.exists() and not store.is_file():
        raise InputError("not a DuckDB store file", where=str(store))
    if not store.exists():
        print(f"mmaudit: {store} does not exist yet; the dashboard shows an empty store", file=sys.stderr)
    if not _is_loopback(args.host):
        print(f"mmaudit: warning: binding {args.host}; the dashboard has no authentication and anyone who can reach "
              "this address can read the store", file=sys.stderr)
    cmd, env = dashboard_command(store=store, host=args.host, port=args.port)
    print(f"dashboard on http://{args.host}:{args.port} (store {store}); Ctrl-C stops it", file=sys.stderr)
    return _supervise(cmd, env)


def _supervise(cmd: list[str], env: dict) -> int:
    """Run Streamlit as a child in its own process group and take it down with us: SIGTERM,
    SIGINT or SIGHUP to this process stops the whole group (otherwise the child is reparented
    to PID 1 and keeps serving after `kill <pid>`)."""
    import signal

    child = subprocess.Popen(cmd, env=env, start_new_session=True)
    stopping = {"sig": None}

    def forward(signum, frame):
        stopping["sig"] = signum
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        while True:
            try:
                code = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if child.poll() is None:  # the wait was interrupted some other way: never leave it behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    return 0 if stopping["sig"] is not None else code
