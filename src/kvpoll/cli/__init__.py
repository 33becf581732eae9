"""The ``kvpoll`` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import kvpoll
from kvpoll.bench.stats import WARM_UP_ROUNDS, WARM_UP_SECONDS
from kvpoll.errors import KvpollError

__all__ = ["main"]

EXIT_OK, EXIT_FOUND, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_PIPE = 128 + 13  # like a program killed by SIGPIPE: the reader went away

DESCRIPTION = """\
Move tensors between disaggregated LLM workers, with a transfer status that
only moves forward: every step is checked against one declared table."""

EPILOG = """\
exit status: 0 success; 1 the command found a problem (a violation, a failed
case, a mismatch); 2 bad usage or unreadable input; 3 an internal error of
kvpoll (a bug: please report it with the traceback); 130 interrupted.
Run 'kvpoll COMMAND --help' for a command's options."""


def _options(pairs: list[str]) -> dict[str, object]:
    """``--option KEY=VALUE`` pairs; VALUE is read as a variable's value is (TOML, else text)."""
    from kvpoll.transports.options import parse_text

    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise KvpollError(f"--option takes KEY=VALUE, not {pair!r}")
        options[key.strip()] = parse_text(raw)
    return options


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvpoll.config import load_config
    from kvpoll.processes import worker_context

    if not args.heartbeat > 0:
        raise KvpollError("--heartbeat must be positive")
    config = load_config(args.config)
    transport = args.transport or config.transport
    options = {**config.options(transport), **_options(args.option)}
    # the workers' imports start now, beside this process's own
    worker_context("kvpoll.demo.workers")
    from kvpoll.demo import DemoError, run_demo

    try:
        return run_demo(
            tokens=args.tokens,
            capacity=args.capacity,
            hidden=args.hidden,
            dtype=args.dtype,
            transport=transport,
            options=options,
            destinations=args.destinations,
            heartbeat=args.heartbeat,
            misses=3,
            failure=not args.no_failure,
            seed=args.seed,
            json_out=args.json,
            out=sys.stdout,
            log=sys.stderr,
            paged=args.paged,
            page_size=args.page_size,
        )
    except DemoError as exc:
        print(f"kvpoll demo: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _cmd_soak(args: argparse.Namespace) -> int:
    from kvpoll.config import load_config
    from kvpoll.soak import format_report, run_soak

    if not args.minutes > 0:
        raise KvpollError("--minutes must be positive")
    if args.receivers < 1 or args.in_flight < 1 or args.tokens < 2:
        raise KvpollError("--receivers and --in-flight must be >= 1, --tokens >= 2")
    config = load_config(args.config)
    transport = args.transport or config.transport
    options = {**config.options(transport), **_options(args.option)}
    report = run_soak(
        args.minutes,
        transport=transport,
        options=options,
        receivers=args.receivers,
        in_flight=args.in_flight,
        tokens=args.tokens,
        kill_every=args.kill_every,
        log=sys.stderr,
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(report) | {"ok": report.ok}, indent=2))
    else:
        print(format_report(report))
    return EXIT_OK if report.ok else EXIT_FOUND


def _cmd_config_show(args: argparse.Namespace) -> int:
    from kvpoll.cli.config_show import render, render_json
    from kvpoll.config import load_config

    config = load_config(args.config, report_unknown=False)
    (render_json if args.json else render)(config, sys.stdout)
    for line in config.unknown_variables:
        print(f"kvpoll config show: {line}", file=sys.stderr)
    return EXIT_FOUND if config.unknown_variables else EXIT_OK


def _cmd_walkthrough(args: argparse.Namespace) -> int:
    from kvpoll.cli.walkthrough import walkthrough

    return walkthrough(sys.stdout, capacity=args.capacity, tokens=tuple(args.tokens))


def _cmd_diagram(args: argparse.Namespace) -> int:
    from kvpoll.statemachine.diagram import mermaid

    text = mermaid()
    if args.markdown:
        text = f"```mermaid\n{text}```\n"
    sys.stdout.write(text)
    return EXIT_OK


def _open_input(name: str) -> TextIO:
    if name == "-":
        return sys.stdin
    return Path(name).open(encoding="utf-8", errors="replace")


def _cmd_check_trace(args: argparse.Namespace) -> int:
    from kvpoll.statemachine.trace import TraceChecker

    checker = TraceChecker(codes=args.codes, allow_skips=args.allow_skips)
    try:
        stream = _open_input(args.file)
    except OSError as exc:
        print(f"kvpoll check-trace: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    found = violations = lines = 0
    with stream if stream is not sys.stdin else _nullcontext(stream):
        for lines, text in enumerate(stream, start=1):
            for finding in checker.feed(lines, text):
                found += 1
                violations += not finding.malformed
                if args.json:
                    print(json.dumps(finding.to_json()))
                else:
                    print(finding)
    for finding in checker.finish(lines):
        found += 1
        violations += not finding.malformed
        print(json.dumps(finding.to_json()) if args.json else finding)
    summary = (
        f"{plural(lines, 'line')}, {plural(checker.rooms, 'room')}: "
        f"{plural(violations, 'violation')}, {plural(found - violations, 'malformed line')}"
    )
    print(summary, file=sys.stderr)
    return EXIT_FOUND if found else EXIT_OK


def plural(count: int, noun: str) -> str:
    """``1 line``, ``2 lines``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


class _nullcontext:  # noqa: N801 - a context manager that leaves stdin open
    def __init__(self, value: TextIO) -> None:
        self.value = value

    def __enter__(self) -> TextIO:
        return self.value

    def __exit__(self, *exc: object) -> None:
        return None


def _cmd_conformance(args: argparse.Namespace) -> int:
    from kvpoll.testing import implementation_by_name, load_cases, run_cases

    impl = implementation_by_name(args.implementation)
    cases = load_cases(Path(args.cases) if args.cases else None)
    results = run_cases(impl, cases)
    counts = {"passed": 0, "failed": 0, "unsupported": 0}
    for result in results:
        counts[result.outcome] += 1
        if result.outcome == "failed" or args.verbose:
            print(f"{result.outcome.upper():<11} {result.case_id}  {result.message}")
    print(
        f"{impl.name}: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['unsupported']} unsupported of {len(results)} cases"
    )
    return EXIT_FOUND if counts["failed"] else EXIT_OK


def _cmd_bench_statemachine(args: argparse.Namespace) -> int:
    from kvpoll.bench.statemachine import run

    def progress(msg: str) -> None:  # on stderr, so that --json output stays clean
        print(f"  ... {msg}", file=sys.stderr, flush=True)

    result = run(
        repeats=args.repeat,
        rooms=args.rooms,
        transitions_rooms=args.transitions_rooms,
        progress=progress,
    )
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(result.report())
    return EXIT_OK


def _cmd_bench_transfer(args: argparse.Namespace) -> int:
    from kvpoll.bench.transfer import paths_of, plot, run
    from kvpoll.transports import TransportUnavailable, resolve

    transports = sorted(set(args.transport or ["zmq"]))
    try:
        paths = paths_of(transports)
    except ValueError as exc:
        raise KvpollError(str(exc)) from exc
    for path in paths:
        if path in ("ucx", "nixl", "mooncake"):
            try:
                resolve(path)
            except TransportUnavailable as exc:
                raise KvpollError(str(exc)) from exc
    if args.paged:
        return _bench_paged(args, transports)
    bar = None
    if sys.stderr.isatty():  # progress is on stderr; --json output alone on stdout
        from tqdm import tqdm

        steps = len(args.sizes) * (args.repeat + 1) + (len(paths) if args.rooms else 0)
        bar = tqdm(total=steps, unit="step", leave=False)

    def progress(msg: str) -> None:
        if bar is not None:
            bar.set_description(msg)
            bar.update(1)
        else:
            print(f"  ... {msg}", file=sys.stderr, flush=True)

    try:
        result = run(
            sizes=[s << 20 for s in args.sizes],
            repeats=args.repeat,
            warm_up_rounds=args.warm_up,
            concurrent_rooms=args.rooms,
            latency_rooms=args.latency_rooms,
            transports=transports,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(result.to_json(), indent=2) if args.json else result.report())
    if args.plot:
        plot(result, args.plot)
        print(f"plot saved to {args.plot}", file=sys.stderr)
    return EXIT_OK


def _cmd_bench_sglang(args: argparse.Namespace) -> int:
    from kvpoll.bench.sglang_load import BACKENDS, available, run
    from kvpoll.bench.sglang_peer import Plan

    wanted = sorted(set(args.backend or BACKENDS), key=list(BACKENDS).index)
    here = available(wanted)
    if not here:
        raise KvpollError(
            "SGLang is not installed here: the benchmark drives its classes "
            "(make test's set-up installs sglang==0.5.23; see docs/sglang.md)"
        )
    missing = [b for b in wanted if b not in here]
    if args.backend and missing:
        raise KvpollError(f"not installed here: {', '.join(missing)} (its engine is missing)")
    for name in missing:
        print(f"  ... skipping {name}: its engine is not installed", file=sys.stderr)
    plan = Plan(
        backend="kvpoll",
        port=0,
        layers=args.layers,
        head_dim=64,
        requests=args.requests,
        pages=args.pages,
        latency=args.latency_requests,
        bulk_pages=args.bulk_pages,
        bulk_chunks=args.bulk_chunks,
        kill=not args.no_kill,
        deadline=args.deadline,
    )

    def progress(msg: str) -> None:
        print(f"  ... {msg}", file=sys.stderr, flush=True)

    result = run(plan, here, args.repeat, progress)
    print(json.dumps(result.to_json(), indent=2) if args.json else result.report())
    return EXIT_FOUND if result.problems() else EXIT_OK


def _bench_paged(args: argparse.Namespace, transports: list[str]) -> int:
    from kvpoll.bench.paged import paged_paths, run_paged

    if args.plot:
        raise KvpollError("--plot draws the contiguous sizes; it does not go with --paged")

    def progress(msg: str) -> None:
        print(f"  ... {msg}", file=sys.stderr, flush=True)

    result = run_paged(
        paths=paged_paths(transports),
        repeats=args.repeat,
        warm_up_rounds=args.warm_up,
        progress=progress,
    )
    print(json.dumps(result.to_json(), indent=2) if args.json else result.report())
    return EXIT_OK


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _add_capacity(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--capacity",
        type=_positive,
        default=1024,
        help="rows of each receive buffer, a receiver's allocated_tokens (default: 1024)",
    )


def _add_tokens(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tokens",
        type=_positive,
        nargs="+",
        default=[500, 2000, 5000],
        metavar="N",
        help="tokens of each scenario's data (default: 500 2000 5000)",
    )


BACKEND_NAMES = (
    "kvpoll-zmq-shm",
    "kvpoll-zmq-tcp",
    "kvpoll-ucx",
    "kvpoll-nixl",
    "kvpoll-mooncake",
    "sglang-mooncake",
    "sglang-nixl",
)
"""``kvpoll bench sglang --backend`` (:data:`kvpoll.bench.sglang_load.BACKENDS`)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpoll",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kvpoll {kvpoll.__version__}")
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=None,
        help="log kvpoll's loggers at this level and above to stderr (default: warnings, "
        "without timestamps; see docs/logging.md)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = sub.add_parser(
        "demo",
        help="the main job: transfers between a sender and receiver processes",
        description="Start a receiver process per destination (the language model) and a "
        "sender process (the encoder), run the transfer scenarios (one chunk, a "
        "resume, several resumes, and the encoder dying mid-transfer) over the "
        "chosen transport, print every status step of both sides as it happens, "
        "verify the data bit for bit, and exit non-zero on any mismatch or "
        "illegal step.",
    )
    _add_tokens(p)
    _add_capacity(p)
    p.add_argument(
        "--hidden",
        type=_positive,
        default=4096,
        help="hidden size: elements per token (default: 4096)",
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float16", "float32"),
        help="element type (default: bfloat16)",
    )
    p.add_argument(
        "--transport",
        help="transport name: zmq, ucx, nixl, mooncake, loopback or a registered one "
        "(default: the configuration's, else zmq)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML configuration file (default: $KVPOLL_CONFIG, ./kvpoll.toml, "
        "~/.config/kvpoll/config.toml)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a transport option, e.g. --option shm=false or --option 'ucx={ TLS = \"tcp\" }' "
        "(repeatable; values are read as KVPOLL_* variables are: TOML, else text)",
    )
    p.add_argument(
        "--destinations",
        type=_positive,
        default=1,
        help="receiver processes, each a destination of the room with its own rank "
        "(a tensor-parallel rank), each getting all the data (default: 1)",
    )
    p.add_argument(
        "--heartbeat",
        type=float,
        default=0.5,
        help="seconds between heartbeats; 3 missed ones mean a dead peer (default: 0.5)",
    )
    p.add_argument(
        "--no-failure", action="store_true", help="skip the scenario where the encoder dies"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random data")
    p.add_argument(
        "--paged",
        action="store_true",
        help="use registered paged pools, as serving engines do: two buffers per token "
        "and an aux row per request; the encoder streams each room's pages in pieces, "
        "each language-model rank offers --capacity tokens of pages at a time",
    )
    p.add_argument(
        "--page-size",
        type=_positive,
        default=16,
        help="tokens per page with --paged (default: 16)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print a machine-readable summary on stdout (live steps go to stderr)",
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "soak",
        help="rooms between real processes for minutes, killing peers and injecting "
        "hostile traffic; report what was lost and what leaked",
        description="Run a sender process and receiver processes that move rooms for "
        "--minutes while receivers are killed (SIGKILL) and restarted in turn and a thread "
        "sends malformed frames, forged bootstraps and forged aborts to every endpoint. "
        "Every room must be delivered bit for bit, or end Failed at the sender when its "
        "receiver was killed; anything else is lost. Growth of file descriptors, memfds and "
        "memory of the processes that live through the run, and files left in /dev/shm, are "
        "leaks. Exit status 0 when nothing was lost or leaked, 1 otherwise.",
    )
    p.add_argument("--minutes", type=float, default=1.0, help="how long (default 1)")
    p.add_argument("--transport", default=None, help="default: the configuration's")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a transport option (repeatable)",
    )
    p.add_argument("--config", default=None, help="a kvpoll.toml to read")
    p.add_argument(
        "--receivers",
        type=int,
        default=3,
        help="receiver processes; all but the first are killed in turn (default 3)",
    )
    p.add_argument(
        "--in-flight", type=int, default=6, help="rooms open per receiver at once (default 6)"
    )
    p.add_argument("--tokens", type=int, default=256, help="tokens per room (default 256)")
    p.add_argument(
        "--kill-every", type=float, default=4.0, help="seconds between kills (default 4)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_soak)

    p = sub.add_parser(
        "walkthrough",
        help="the transfer scenarios, step by step, on the table",
        description="Walk the transfer scenarios (one chunk, a resume, several resumes, a "
        "failure) through TransferState, printing each transition, and show the old bugs "
        "(a reset on resume, a last chunk with no data) being rejected.",
    )
    _add_capacity(p)
    _add_tokens(p)
    p.set_defaults(func=_cmd_walkthrough)

    p = sub.add_parser(
        "diagram",
        help="print the state diagram (Mermaid) generated from the table",
        description="Print a Mermaid stateDiagram-v2 generated from spec/transitions.json.",
    )
    p.add_argument("--markdown", action="store_true", help="wrap it in a ```mermaid fence")
    p.set_defaults(func=_cmd_diagram)

    p = sub.add_parser(
        "check-trace",
        help="audit a JSON Lines log of observed statuses",
        description="Check a log of observed statuses against the table. Each line is a JSON "
        'object {"room": 7, "status": "Transferring", "sent_tokens": 1024}; status '
        "is a name or an integer code, sent_tokens is optional. Prints each "
        "violation (line, room, from -> to, the rule broken) and each unreadable "
        "line; exits 1 if there is any, 0 otherwise.",
    )
    p.add_argument("file", metavar="FILE", help="the log, or - for standard input")
    p.add_argument(
        "--codes",
        choices=("kvpoll", "sglang"),
        default="kvpoll",
        help="how to read integer statuses (default: kvpoll's, Failed=4; sglang: Failed=0)",
    )
    p.add_argument(
        "--allow-skips",
        action="store_true",
        help="accept a step that legal events reach in several moves (for logs sampled by polling)",
    )
    p.add_argument("--json", action="store_true", help="print findings as JSON Lines")
    p.set_defaults(func=_cmd_check_trace)

    p = sub.add_parser(
        "conformance",
        help="run the conformance suite against an implementation",
        description="Play spec/cases against an implementation.",
    )
    p.add_argument(
        "--implementation",
        default="kvpoll",
        metavar="NAME",
        help="kvpoll (default), transitions (the reference), or module:factory",
    )
    p.add_argument("--cases", metavar="DIR", help="a folder of case files (default: kvpoll's)")
    p.add_argument("-v", "--verbose", action="store_true", help="list every case")
    p.set_defaults(func=_cmd_conformance)

    p = sub.add_parser(
        "bench",
        help="measure speed and memory",
        description="Benchmarks; figures are medians [min-max] and ratios "
        "against baselines measured in the same run.",
    )
    bench = p.add_subparsers(dest="bench", metavar="WHAT", title="benchmarks")
    b = bench.add_parser(
        "statemachine",
        help="cost of enforcing the table",
        description="ns per validated transition against a bare dict lookup "
        "and transitions.Machine; memory per room; adding and "
        "removing rooms.",
    )
    b.add_argument("--repeat", type=_positive, default=5, help="repeats (default: 5)")
    b.add_argument(
        "--rooms", type=_positive, default=100_000, help="rooms in the registry (default: 100000)"
    )
    b.add_argument(
        "--transitions-rooms",
        type=_positive,
        default=20_000,
        help="models given to transitions.Machine.add_model (quadratic; default: 20000)",
    )
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=_cmd_bench_statemachine)
    b = bench.add_parser(
        "transfer",
        help="GiB/s of each transport path between two processes",
        description="Move tensors between two processes through kvpoll's "
        "transports (zmq shared memory and TCP; ucx, nixl, mooncake), beside a "
        "single-core copy, raw pyzmq and each engine used directly, all measured "
        "in the same run.",
    )
    b.add_argument(
        "--transport",
        action="append",
        choices=("zmq", "ucx", "nixl", "mooncake", "all"),
        default=None,
        help="a transport to measure, with its raw engine (repeatable; 'all': every "
        "one; default: zmq)",
    )
    b.add_argument("--plot", metavar="PNG", help="save a plot of GiB/s by size for every path")
    b.add_argument(
        "--sizes",
        type=_positive,
        nargs="+",
        default=[1, 16, 256],
        metavar="MIB",
        help="tensor sizes in MiB (default: 1 16 256)",
    )
    b.add_argument("--repeat", type=_positive, default=5, help="repeats (default: 5)")
    b.add_argument(
        "--warm-up",
        type=_positive,
        default=WARM_UP_ROUNDS,
        metavar="ROUNDS",
        help="untimed rounds of each measurement before its repeats, fewer once "
        f"{WARM_UP_SECONDS:g} s have passed (default: {WARM_UP_ROUNDS}; a new "
        "endpoint pair's first rooms run slower while the interpreter warms up)",
    )
    b.add_argument(
        "--rooms",
        type=int,
        default=2000,
        help="concurrent one-chunk rooms to push through one endpoint pair (twice: the "
        "second batch is the figure, the first is reported as cold), beside raw pyzmq "
        "round trips with as many in flight (default: 2000; 0 skips)",
    )
    b.add_argument(
        "--latency-rooms",
        type=int,
        default=200,
        help="4 KiB rooms timed one at a time per path, beside raw pyzmq round trips "
        "(default: 200; 0 skips)",
    )
    b.add_argument(
        "--paged",
        action="store_true",
        help="measure paged rooms instead: a 16-layer KV pool (K and V, pages of 16 "
        "tokens, 4096 tokens per room, pages scattered on both sides) over each "
        "transport, beside each engine's own batch call",
    )
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=_cmd_bench_transfer)
    b = bench.add_parser(
        "sglang",
        help="kvpoll under SGLang's own classes, beside SGLang's own backends",
        description="Drive SGLang 0.5.23's prefill and decode classes in the scheduler's "
        "order, in two processes, over every kvpoll transport and SGLang's own mooncake "
        "(TCP) and nixl (DRAM, UCX on loopback) backends, alternated repeat by repeat: "
        "one-page latency, requests/s with every request in flight, GB/s of one large "
        "request in chunks, seconds from killing the prefill to Failed on the decode. "
        "Every page is compared, every status walk and both sides' final statuses "
        "checked. Exit status 1 when any request did not complete, disagreed, moved "
        "wrong bytes or stepped backwards.",
    )
    b.add_argument(
        "--backend",
        action="append",
        choices=sorted(BACKEND_NAMES),
        default=None,
        help="a backend to run (repeatable; default: every one installed here)",
    )
    b.add_argument("--repeat", type=_positive, default=3, help="repeats (default: 3)")
    b.add_argument(
        "--requests",
        type=_positive,
        default=500,
        help="requests in flight at once in the load phase (default: 500)",
    )
    b.add_argument(
        "--pages", type=_positive, default=64, help="scattered pages per request (default: 64)"
    )
    b.add_argument(
        "--layers",
        type=_positive,
        default=2,
        help="layers of the KV pool (K and V each; pages of 16 tokens, 2 heads of 64: "
        "2 layers make 16 KiB pages, 8 make 64 KiB; default: 2)",
    )
    b.add_argument(
        "--latency-requests",
        type=_positive,
        default=50,
        help="one-page requests timed one after another (default: 50)",
    )
    b.add_argument(
        "--bulk-pages", type=_positive, default=256, help="pages of the bulk request (default: 256)"
    )
    b.add_argument(
        "--bulk-chunks",
        type=_positive,
        default=4,
        help="chunks the bulk request is sent in (default: 4)",
    )
    b.add_argument("--no-kill", action="store_true", help="skip the phase that kills the prefill")
    b.add_argument(
        "--deadline",
        type=_positive,
        default=300,
        help="seconds one phase may take before its unfinished requests count (default: 300)",
    )
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=_cmd_bench_sglang)
    p.set_defaults(func=None, group_parser=p)

    p = sub.add_parser(
        "config",
        help="the effective configuration",
        description="Configuration: the transport a cluster uses and its options, from a "
        "TOML file and KVPOLL_* environment variables.",
    )
    group = p.add_subparsers(dest="config_command", metavar="WHAT", title="commands")
    c = group.add_parser(
        "show",
        help="print the effective configuration and where each value came from",
        description="Print the effective configuration as TOML, each value commented "
        "with its source (default, file PATH, env VARIABLE).",
    )
    c.add_argument(
        "--config",
        metavar="FILE",
        help="read this file instead of $KVPOLL_CONFIG / ./kvpoll.toml / "
        "~/.config/kvpoll/config.toml",
    )
    c.add_argument("--json", action="store_true", help="print values and sources as JSON")
    c.set_defaults(func=_cmd_config_show)
    p.set_defaults(func=None, group_parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kvpoll`` command; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level is not None:
        logging.basicConfig(
            level=args.log_level.upper(),
            format="%(asctime)s %(name)s %(levelname)s: %(message)s",
            stream=sys.stderr,
        )
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.func is None:
        args.group_parser.print_help()
        return EXIT_USAGE
    try:
        code: int = args.func(args)
        sys.stdout.flush()
    except KvpollError as exc:
        print(f"kvpoll {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `kvpoll ... | head`: stop quietly, as other commands do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE
    except Exception:
        traceback.print_exc()
        print(
            f"kvpoll {args.command}: internal error (a bug in kvpoll {kvpoll.__version__}); "
            "please report it with the traceback above",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    return code


if __name__ == "__main__":
    sys.exit(main())
