"""``embedpipe emulator``: serve the Gemini-compatible emulator in the foreground, alone or
behind a played gateway (:mod:`pipeline.emulator`)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from pipeline.commands.common import consoles, notice
from pipeline.outcome import EXIT_USAGE

NAME = "emulator"
HELP = "serve the Gemini-compatible emulator (for offline runs and tests)"
EXAMPLE = "embedpipe emulator --port 8765 --latency-ms 100 --rpm 3000"


def arguments(emu: argparse.ArgumentParser) -> None:
    emu.add_argument("--host", default="127.0.0.1", help="address to listen on")
    emu.add_argument("--port", type=int, default=8765, help="port to listen on")
    emu.add_argument("--api-key", default=None, help="require this key (default: none)")
    emu.add_argument("--auth", choices=("google", "bearer", "raw", "any"), default="any",
                     help="how the key must be sent: x-goog-api-key, Authorization: Bearer, "
                          "a raw Authorization header, or any of them")
    emu.add_argument("--latency-ms", type=float, default=0.0, help="added to every call")
    emu.add_argument("--per-item-ms", type=float, default=0.0,
                     help="added per item of a batch call")
    emu.add_argument("--jitter-ms", type=float, default=0.0, help="random extra latency, up to")
    emu.add_argument("--rpm", type=int, default=None, help="requests/min quota (items count)")
    emu.add_argument("--tpm", type=int, default=None, help="input tokens/min quota")
    emu.add_argument("--rpd", type=int, default=None, help="requests/day quota (items count)")
    emu.add_argument("--window-s", type=float, default=60.0, help="length of the quota 'minute'")
    emu.add_argument("--day-s", type=float, default=86_400.0, help="length of the quota 'day'")
    for fault in ("error-429", "error-500", "error-503", "reset", "stall", "truncate"):
        emu.add_argument(f"--{fault}", type=float, default=0.0, metavar="RATE",
                         help=f"share of calls answered with: {fault}")
    emu.add_argument("--stall-s", type=float, default=30.0,
                     help="how long a stalled call hangs before its answer")
    emu.add_argument("--seed", type=int, default=None, help="seed of the fault draws")
    emu.add_argument("--batch-delay-s", type=float, default=1.0,
                     help="Batch API: seconds from submission to results")
    emu.add_argument("--batch-outcome", choices=("succeed", "fail", "expire"),
                     default="succeed", help="Batch API: how every job ends")
    emu.add_argument("--batch-error-rate", type=float, default=0.0, metavar="RATE",
                     help="Batch API: share of requests answered with a transient error")
    emu.add_argument("--upload-mb-per-s", type=float, default=None, metavar="MB_S",
                     help="Files API: how fast uploads come in (default: as fast as they can)")
    emu.add_argument("--download-mb-per-s", type=float, default=None, metavar="MB_S",
                     help="Files API: how fast downloads go out (default: as fast as they can)")
    gw = emu.add_argument_group(
        "playing a gateway", "serve as an OpenAI-style gateway (new-api / one-api) in front of "
        "the emulator: only embedContent and batchEmbedContents are routed, errors come in "
        "OpenAI's shape without retry information; --api-key and --auth are the gateway token's")
    gw.add_argument("--gateway", choices=("new-api", "plain"), default=None,
                    help="new-api: its answers to unrouted paths (500 on the Batch API's "
                         "create, an HTML page on uploads, 404 elsewhere); plain: 404 to all")
    gw.add_argument("--balance-tokens", type=int, default=None, metavar="N",
                    help="the account's balance: after N input tokens, 403 "
                         "insufficient_user_quota")
    gw.add_argument("--rate-limit", type=float, default=0.0, metavar="RATE",
                    help="share of embed calls refused by the gateway's own limit (429, no "
                         "retry information)")
    gw.add_argument("--rate-limit-body", choices=("sentence", "empty"), default="sentence",
                    help="that 429's body: new-api's fixed sentence, or nothing")
    gw.add_argument("--no-channel", action="append", default=[], metavar="MODEL",
                    help="a model no channel serves (503 model_not_found; repeatable)")


def main(args: argparse.Namespace) -> int:
    from pipeline.emulator.server import Emulator, EmulatorOptions

    options = EmulatorOptions(
        api_key=args.api_key, auth=args.auth, latency_ms=args.latency_ms,
        per_item_ms=args.per_item_ms, jitter_ms=args.jitter_ms, rpm=args.rpm, tpm=args.tpm,
        rpd=args.rpd, window_s=args.window_s, day_s=args.day_s, error_429=args.error_429,
        error_500=args.error_500,
        error_503=args.error_503, reset=args.reset, stall=args.stall, stall_s=args.stall_s,
        truncate=args.truncate, seed=args.seed, batch_delay_s=args.batch_delay_s,
        batch_outcome=args.batch_outcome, batch_error_rate=args.batch_error_rate,
        upload_mb_per_s=args.upload_mb_per_s, download_mb_per_s=args.download_mb_per_s)
    gateway = None
    if args.gateway:
        from pipeline.emulator.gateway import GatewayOptions

        # The key and auth style are the gateway's token then; the emulator behind it is open.
        gateway = GatewayOptions(flavour=args.gateway, token=args.api_key, auth=args.auth,
                                 balance_tokens=args.balance_tokens, rate_limit=args.rate_limit,
                                 rate_limit_body=args.rate_limit_body,
                                 no_channel=tuple(args.no_channel), seed=args.seed)
        options = replace(options, api_key=None, auth="any")
    try:
        Emulator(options, host=args.host, port=args.port, gateway=gateway).serve_forever(
            lambda url: consoles.err.print(f"emulator on {url} (Ctrl-C to stop)"))
    except OSError as exc:
        notice("error", f"cannot listen on {args.host}:{args.port}: "
                        f"{exc.strerror or exc} (another process has the port? try --port)")
        return EXIT_USAGE
    return 0
