"""Development commands that need neither bash nor make (so they also work on Windows):

  python -m mongofeed.dev server build|start|stop|status|uri|metrics-url [--name N] [--port P]
      the local FerretDB test server under .cache/ferretdb/ (also bin/ferretdb)
  python -m mongofeed.dev test [PYTEST ARGS]
      the test suite against a private FerretDB, always stopped (make test, bin/run-tests)
  python -m mongofeed.dev demo
      FerretDB, the digits data, mongofeed serve and a small Keras model (make demo)
  python -m mongofeed.dev bench [BENCH ARGS]
      mongofeed bench against a private FerretDB, always stopped (make bench)
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import run, server

NOT_RUNNING_STATUS = 3
INTERRUPTED_STATUS = 130  # as a shell reports a Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not args or args[0] in ("-h", "--help", "help"):
        print(__doc__.strip(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    try:
        if command == "server":
            return _server(rest)
        if command == "test":
            return run.test(rest)
        if command == "bench":
            return run.bench(rest)
        if command == "demo" and not rest:
            return run.demo()
    except (server.ServerError, run.RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a server command; what it started is cleaned up already
        return INTERRUPTED_STATUS
    print(f"unknown command: {' '.join(args)}\n\n{__doc__.strip()}", file=sys.stderr)
    return 2


def _server(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=server.command(),
        description=f"The local FerretDB {server.FERRETDB_VERSION} test server (SQLite) under "
        ".cache/ferretdb/; each --name has its own run folder .cache/ferretdb/run/NAME.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="COMMAND")
    actions.add_parser("build", help="build .cache/ferretdb/bin/ferretdb (once; needs Go)")
    for action, about in (
        ("start", "start on 127.0.0.1, print its mongodb:// URI"),
        ("stop", "stop it (SIGTERM, then a kill after about 5 s)"),
        ("status", 'print "running ..." (exit 0) or "not running" (exit 3)'),
        ("uri", "print its MongoDB URI"),
        ("metrics-url", "print its Prometheus metrics URL"),
    ):
        subparser = actions.add_parser(action, help=about)
        subparser.add_argument("--name", default="default", help="which server (default: default)")
        if action == "start":
            subparser.add_argument("--port", type=int, default=0, help="0 (default): a free port")
    args = parser.parse_args(argv)

    if args.action == "build":
        server.build()
    elif args.action == "start":
        print(server.start(args.name, args.port).uri)
    elif args.action == "stop":
        stopped = server.stop(args.name)
        if stopped is None:
            print(f"FerretDB '{args.name}' is not running", file=sys.stderr)
        else:
            print(f"stopped FerretDB '{args.name}' (pid {stopped.pid})", file=sys.stderr)
    elif args.action == "status":
        found = server.running(args.name)
        if found is None:
            print("not running")
            return NOT_RUNNING_STATUS
        print(f"running (pid {found.pid}) {found.uri}")
    elif args.action == "uri":
        print(server.find(args.name).uri)
    else:
        print(server.find(args.name).metrics_url)
    return 0
