"""Server settings: command-line flags, each defaulting to a `MALORA_<FLAG>` environment variable."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from malora_runtime.config import EngineConfig

ENV_PREFIX = "MALORA_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    """The `model` id clients use for the base model; defaults to the engine's model name."""
    adapters: dict[str, Path] = field(default_factory=dict)
    """Adapters loaded at start, by the name clients use."""
    adapter_root: Path | None = None
    """Every adapter directory directly under it is loaded at start under its directory name."""
    api_keys: list[str] = field(default_factory=list)
    """When non-empty, every request must send `Authorization: Bearer <one of them>`."""
    open_health: bool = True
    """Health, readiness, version and metrics stay reachable without a key."""
    max_waiting: int = 256
    """Sequences admitted beyond max_num_seqs before new requests get 429."""
    max_body_bytes: int = 1 << 20
    shutdown_timeout: float = 30.0
    """Seconds in-flight requests get to finish after a stop signal."""
    log_level: str = "info"
    engine: EngineConfig = field(default_factory=EngineConfig)

    @property
    def max_admitted(self) -> int:
        return self.engine.max_num_seqs + self.max_waiting


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _adapter_spec(text: str) -> tuple[str, Path]:
    name, sep, directory = text.partition("=")
    if not sep or not name or not directory:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, Path(directory)


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="malora-serve",
        description="OpenAI-compatible server for one base model and many MALoRA adapters. "
        f"Every flag can also be set by an environment variable named {ENV_PREFIX}<FLAG>, "
        "for example MALORA_PORT=9000 or MALORA_API_KEY=secret.",
    )
    defaults = ServerSettings()
    engine = defaults.engine

    def add(flag: str, help_text: str, default=None, kind=str, **kwargs) -> None:
        name = _env_name(flag)
        raw = env.get(name)
        if kwargs.get("action") == "append":  # the environment's list is applied only when no flag is given
            raw = None
        if raw is not None:
            try:
                default = kind(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{name}={raw!r}: {exc}")
        shown = "" if default in (None, []) else f" (default: {default})"
        parser.add_argument(flag, type=kind, default=default, help=f"{help_text}{shown} [env {name}]", **kwargs)

    add("--host", "address to listen on", defaults.host)
    add("--port", "port to listen on", defaults.port, int)
    add("--model", "base model: HF directory or .gguf (default: SmolLM2-135M-Instruct)")
    add("--served-model-name", "model id of the base model in the API (default: the model's name)")
    add("--adapter", "NAME=DIR: an adapter to load at start (repeatable; env: comma-separated)",
        kind=_adapter_spec, action="append", metavar="NAME=DIR")
    add("--adapter-root", "directory whose adapter subdirectories are loaded under their names", kind=Path)
    add("--api-key", "required bearer key (repeatable; env: comma-separated)", action="append")
    add("--open-health", "health, ready, version and metrics need no key", defaults.open_health, _bool)
    add("--max-waiting", "sequences admitted beyond --max-num-seqs before 429", defaults.max_waiting, int)
    add("--max-body-bytes", "largest request body (413 above)", defaults.max_body_bytes, int)
    add("--shutdown-timeout", "seconds in-flight requests get to finish on shutdown", defaults.shutdown_timeout,
        float)
    add("--log-level", "logging level", defaults.log_level)
    add("--dtype", "model dtype", engine.dtype)
    add("--device", "torch device", engine.device)
    add("--block-size", "tokens per KV cache block", engine.block_size, int)
    add("--kv-cache-memory", "bytes for the KV cache pool", engine.kv_cache_memory, int)
    add("--max-num-seqs", "most sequences in one step", engine.max_num_seqs, int)
    add("--max-num-batched-tokens", "most tokens in one step", engine.max_num_batched_tokens, int)
    add("--max-model-len", "longest prompt plus output (default: the model's context)", kind=int)
    add("--max-loaded-adapters", "adapter slots", engine.max_loaded_adapters, int)
    add("--enable-prefix-caching", "reuse KV blocks of shared prompt prefixes", engine.enable_prefix_caching,
        _bool)
    return parser


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServerSettings:
    """Flags override environment variables, which override the defaults. Bad values exit with usage."""
    env = os.environ if env is None else env
    parser = build_parser(env)
    args = parser.parse_args(argv)
    for flag, kind in (("--adapter", _adapter_spec), ("--api-key", str)):
        dest = flag.lstrip("-").replace("-", "_")
        raw = env.get(_env_name(flag))
        if getattr(args, dest) is None and raw:
            try:
                setattr(args, dest, [kind(part.strip()) for part in raw.split(",") if part.strip()])
            except argparse.ArgumentTypeError as exc:
                parser.error(f"{_env_name(flag)}: {exc}")
    adapters: dict[str, Path] = {}
    for name, directory in args.adapter or []:
        if name in adapters:
            parser.error(f"--adapter {name} is given twice")
        adapters[name] = directory
    try:
        engine = EngineConfig(
            model=args.model, dtype=args.dtype, device=args.device, block_size=args.block_size,
            kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
            max_loaded_adapters=args.max_loaded_adapters, enable_prefix_caching=args.enable_prefix_caching,
        )
    except ValueError as exc:
        parser.error(str(exc))
    for flag, value, low in (("--port", args.port, 0), ("--max-waiting", args.max_waiting, 0),
                             ("--max-body-bytes", args.max_body_bytes, 1)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    return ServerSettings(
        host=args.host, port=args.port, served_model_name=args.served_model_name,
        adapters=adapters, adapter_root=args.adapter_root, api_keys=[k for k in args.api_key or [] if k],
        open_health=args.open_health, max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes,
        shutdown_timeout=args.shutdown_timeout, log_level=args.log_level, engine=engine,
    )
