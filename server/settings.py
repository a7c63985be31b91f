"""Server settings: command-line flags, each defaulting to a `MALORA_<FLAG>` environment variable."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from malora_runtime.adapters.registry import DEFAULT_MAX_ADAPTER_BYTES
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
    """Adapters read, validated and activated at start, by the name clients use (trusted: any directory)."""
    adapter_roots: list[Path] = field(default_factory=list)
    """Every adapter directory directly under one is served under its directory name, read on first use;
    runtime loads through the API must resolve inside one."""
    pins: list[str] = field(default_factory=list)
    """Adapters kept in an engine slot and in host memory, never evicted."""
    max_cpu_adapters: int = 64
    """Parsed adapters kept in host memory (LRU); at least --max-loaded-adapters."""
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES
    """Largest adapter directory (sum of its files) a load reads."""
    api_keys: list[str] = field(default_factory=list)
    """When non-empty, every request must send `Authorization: Bearer <one of them>`."""
    admin_key: str | None = None
    """Key of the adapter management endpoints; without one they answer 403."""
    open_health: bool = True
    """Health, readiness, version and metrics stay reachable without a key."""
    max_waiting: int = 256
    """Sequences admitted beyond max_num_seqs before new requests get 429."""
    max_body_bytes: int = 1 << 20
    shutdown_timeout: float = 30.0
    """Seconds in-flight requests get to finish after a stop signal."""
    log_level: str = "info"
    metrics_max_adapters: int = 100
    """Distinct adapter label values in /metrics; further adapters are summed under `other`."""
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
    add("--adapter-root", "directory whose adapter subdirectories are served under their names, read on first "
        "use; runtime loads must be inside one (repeatable; env: comma-separated)", kind=Path, action="append")
    add("--pin", "NAME: keep this adapter in a slot, never evicted (repeatable; env: comma-separated)",
        action="append", metavar="NAME")
    add("--max-cpu-adapters", "parsed adapters kept in host memory (LRU)", defaults.max_cpu_adapters, int)
    add("--max-adapter-bytes", "largest adapter directory a load reads", defaults.max_adapter_bytes, int)
    add("--api-key", "required bearer key (repeatable; env: comma-separated)", action="append")
    add("--admin-key", "bearer key of the adapter management endpoints (/v1/adapters, /v1/load_lora_adapter, "
        "/v1/unload_lora_adapter); without one they are disabled")
    add("--open-health", "health, ready, version and metrics need no key", defaults.open_health, _bool)
    add("--max-waiting", "sequences admitted beyond --max-num-seqs before 429", defaults.max_waiting, int)
    add("--max-body-bytes", "largest request body (413 above)", defaults.max_body_bytes, int)
    add("--shutdown-timeout", "seconds in-flight requests get to finish on shutdown", defaults.shutdown_timeout,
        float)
    add("--log-level", "logging level", defaults.log_level)
    add("--metrics-max-adapters", "distinct adapter labels in /metrics (the rest are summed as 'other')",
        defaults.metrics_max_adapters, int)
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
    add("--pack-cpu-linears", "on CPU in float32, run the base linears through oneDNN on pre-packed weights",
        engine.pack_cpu_linears, _bool)
    add("--keep-freed-memory", "on CPU with glibc, keep freed memory for reuse (faster prefill)",
        engine.keep_freed_memory, _bool)
    return parser


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServerSettings:
    """Flags override environment variables, which override the defaults. Bad values exit with usage."""
    env = os.environ if env is None else env
    parser = build_parser(env)
    args = parser.parse_args(argv)
    for flag, kind in (("--adapter", _adapter_spec), ("--api-key", str), ("--adapter-root", Path), ("--pin", str)):
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
            pack_cpu_linears=args.pack_cpu_linears, keep_freed_memory=args.keep_freed_memory,
        )
    except ValueError as exc:
        parser.error(str(exc))
    for flag, value, low in (("--port", args.port, 0), ("--max-waiting", args.max_waiting, 0),
                             ("--max-body-bytes", args.max_body_bytes, 1),
                             ("--max-cpu-adapters", args.max_cpu_adapters, engine.max_loaded_adapters),
                             ("--max-adapter-bytes", args.max_adapter_bytes, 1),
                             ("--metrics-max-adapters", args.metrics_max_adapters, 1)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    pins = list(dict.fromkeys(args.pin or []))
    if pins and len(pins) >= engine.max_loaded_adapters:
        parser.error(f"{len(pins)} --pin(s) would leave no slot of --max-loaded-adapters "
                     f"{engine.max_loaded_adapters} for the other adapters")
    return ServerSettings(
        host=args.host, port=args.port, served_model_name=args.served_model_name,
        adapters=adapters, adapter_roots=list(args.adapter_root or []), pins=pins,
        max_cpu_adapters=args.max_cpu_adapters, max_adapter_bytes=args.max_adapter_bytes,
        api_keys=[k for k in args.api_key or [] if k], admin_key=args.admin_key or None,
        open_health=args.open_health, max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes,
        shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
        metrics_max_adapters=args.metrics_max_adapters, engine=engine,
    )
