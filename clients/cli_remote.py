"""`malora chat | complete | models | adapters`: the commands that talk to a running server.

They read MALORA_BASE_URL, MALORA_API_KEY and MALORA_ADMIN_KEY (or --base-url, --api-key, --admin-key),
print tables or plain text, and JSON with --json. A server error prints its message and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from .sdk import MaloraClient, RetryPolicy
from .types import MaloraError

CHAT_HELP = "Type a message and press Enter; /reset forgets the conversation, /exit (or Ctrl-D) quits."


def _write(text: str, end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _client(args: argparse.Namespace) -> MaloraClient:
    return MaloraClient(args.base_url, api_key=args.api_key, admin_key=args.admin_key, timeout=args.timeout,
                        retry=RetryPolicy(max_retries=args.retries))


def _remote(func: Callable[[MaloraClient, argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        try:
            with _client(args) as client:
                func(client, args)
        except MaloraError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 1
        return 0

    command.__doc__ = func.__doc__
    return command


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in (("temperature", args.temperature), ("seed", args.seed)) if v is not None}


def _chat(client: MaloraClient, args: argparse.Namespace) -> None:
    """Interactive, streamed chat; the history is resent every turn."""
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing for input())
        _write(f"chatting with {args.adapter or 'the base model'} at {client.base_url}. {CHAT_HELP}")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input(">>> " if interactive else "").strip()
        except EOFError:
            _write("")
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history.clear()
            _write("(conversation reset)")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for chunk in client.stream_chat(system + history, model=args.adapter, max_tokens=args.max_tokens,
                                            **_sampling(args)):
                reply.append(chunk.text)
                _write(chunk.text, end="")
        except MaloraError as exc:
            history.pop()
            _write("")
            sys.stderr.write(f"error: {exc}\n")
            continue
        _write("")
        history.append({"role": "assistant", "content": "".join(reply)})


def _complete(client: MaloraClient, args: argparse.Namespace) -> None:
    """One completion (or, with --chat, one chat turn) printed as text or JSON."""
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    kwargs = dict(model=args.adapter, max_tokens=args.max_tokens, **_sampling(args))
    messages = [{"role": "user", "content": prompt}]
    if args.stream and not args.json:
        chunks = client.stream_chat(messages, **kwargs) if args.chat else client.stream_complete(prompt, **kwargs)
        for chunk in chunks:
            _write(chunk.text, end="")
        _write("")
        return
    result = client.chat(messages, **kwargs) if args.chat else client.complete(prompt, **kwargs)
    _write(json.dumps(asdict(result), indent=2) if args.json else result.text)


def _models(client: MaloraClient, args: argparse.Namespace) -> None:
    """The base model and every adapter served, as `model` ids."""
    models = client.models()
    if args.json:
        _write(json.dumps([asdict(m) for m in models], indent=2))
        return
    rows = [(m.id, "adapter" if m.is_adapter else "base", (m.adapter or {}).get("state"), m.parent, m.max_model_len)
            for m in models]
    _write(table(rows, ["ID", "KIND", "STATE", "PARENT", "MAX LEN"]))


def _adapters_ls(client: MaloraClient, args: argparse.Namespace) -> None:
    """Every adapter with its state, version, slot and shape (admin key)."""
    listing = client.adapters()
    if args.json:
        _write(json.dumps(asdict(listing), indent=2))
        return
    rows = [(a.name, a.state, a.version, a.slot, "yes" if a.pinned else "", a.num_experts, a.rank, a.subspace_rank,
             a.top_k, a.path) for a in listing.adapters]
    _write(table(rows, ["NAME", "STATE", "VERSION", "SLOT", "PINNED", "EXPERTS", "RANK", "SUBSPACE", "TOP-K",
                        "PATH"]))
    if listing.stats:
        _write("  ".join(f"{k}={v}" for k, v in listing.stats.items()))


def _print_adapter(verb: str, adapter, as_json: bool) -> None:
    if as_json:
        _write(json.dumps(asdict(adapter), indent=2))
    else:
        version = f" version {adapter.version}" if adapter.version is not None else ""
        _write(f"{verb} {adapter.name}{version}: {adapter.state}")


def _adapters_load(client: MaloraClient, args: argparse.Namespace) -> None:
    _print_adapter("loaded", client.load_adapter(args.name, args.path, pinned=args.pin), args.json)


def _adapters_reload(client: MaloraClient, args: argparse.Namespace) -> None:
    _print_adapter("reloaded", client.reload_adapter(args.name, args.path, pinned=args.pin), args.json)


def _adapters_unload(client: MaloraClient, args: argparse.Namespace) -> None:
    _print_adapter("unloaded", client.unload_adapter(args.name), args.json)


def connection_parser() -> argparse.ArgumentParser:
    """Options every remote command takes (a parent parser)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("server")
    group.add_argument("--base-url", default=None, help="server URL, with or without /v1 [env MALORA_BASE_URL, "
                       "default http://127.0.0.1:8000]")
    group.add_argument("--api-key", default=None, help="[env MALORA_API_KEY]")
    group.add_argument("--admin-key", default=None, help="key of the adapter commands [env MALORA_ADMIN_KEY]")
    group.add_argument("--timeout", type=float, default=float(os.environ.get("MALORA_TIMEOUT", 600)),
                       help="seconds per request (default: 600)")
    group.add_argument("--retries", type=int, default=4, help="retries on 429/503 (default: 4)")
    return parent


def _sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int | None) -> None:
    parser.add_argument("--adapter", "--model", dest="adapter", default=None,
                        help="adapter name (or model id); default: the base model")
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)


def add_remote_commands(sub: argparse._SubParsersAction) -> None:
    parent = connection_parser()
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print JSON (for scripts)")

    chat = sub.add_parser("chat", parents=[parent], help="interactive streamed chat with a server",
                          description=CHAT_HELP)
    _sampling_arguments(chat, None)
    chat.add_argument("--system", default=None, help="a system message")
    chat.set_defaults(func=_remote(_chat))

    complete = sub.add_parser("complete", parents=[parent, json_flag], help="one completion from a server")
    complete.add_argument("prompt", help="the prompt ('-': read stdin)")
    _sampling_arguments(complete, 64)
    complete.add_argument("--chat", action="store_true", help="send it as a chat message")
    complete.add_argument("--stream", action="store_true", help="print tokens as they come")
    complete.set_defaults(func=_remote(_complete))

    models = sub.add_parser("models", parents=[parent, json_flag], help="models and adapters a server serves")
    models.set_defaults(func=_remote(_models))

    adapters = sub.add_parser("adapters", help="manage a server's adapters (admin key)")
    adapters_sub = adapters.add_subparsers(dest="action", required=True)
    ls = adapters_sub.add_parser("ls", parents=[parent, json_flag], help="list adapters and their states")
    ls.set_defaults(func=_remote(_adapters_ls))
    load = adapters_sub.add_parser("load", parents=[parent, json_flag], help="load an adapter directory")
    load.add_argument("name")
    load.add_argument("path", help="adapter directory on the server, inside an --adapter-root")
    load.add_argument("--pin", action="store_true", help="keep it in a slot, never evicted")
    load.set_defaults(func=_remote(_adapters_load))
    reload = adapters_sub.add_parser("reload", parents=[parent, json_flag], help="load a new version in place")
    reload.add_argument("name")
    reload.add_argument("--path", default=None, help="directory of the new version (default: the current one)")
    reload.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None)
    reload.set_defaults(func=_remote(_adapters_reload))
    unload = adapters_sub.add_parser("unload", parents=[parent, json_flag], help="unload an adapter")
    unload.add_argument("name")
    unload.set_defaults(func=_remote(_adapters_unload))
