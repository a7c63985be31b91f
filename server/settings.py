"""Server settings: command-line flags, each defaulting to a `MALORA_<FLAG>` environment variable."""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from malora_runtime.adapters.registry import DEFAULT_MAX_ADAPTER_BYTES, AdapterLimits
from malora_runtime.adapters.source_cache import DEFAULT_CACHE_BYTES
from malora_runtime.adapters.sources import AdapterSource, parse_source
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
    """Parsed adapters kept in host memory outside the engine's slots (LRU)."""
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES
    """Largest adapter directory (sum of its files) a load reads."""
    adapter_limits: AdapterLimits = field(default_factory=AdapterLimits)
    """Largest N, r and d one adapter may have, and the bytes of parsed adapters kept in host memory."""
    adapter_sources: list[AdapterSource] = field(default_factory=list)
    """s3://, hf:// and https:// adapter sources, searched in order after the roots (see adapters/sources.py)."""
    s3_endpoint_url: str | None = None
    """An S3-compatible endpoint for s3:// sources (MinIO, Ceph, moto...); default: AWS."""
    adapter_cache_bytes: int = DEFAULT_CACHE_BYTES
    """Bytes of adapters fetched from sources kept under $MALORA_CACHE/adapters (least recently used leave)."""
    state_dir: Path | None = None
    """Where the server remembers adapters unloaded at runtime (default: $MALORA_CACHE/state)."""
    api_keys: list[str] = field(default_factory=list)
    """When non-empty, every request must send `Authorization: Bearer <one of them>`."""
    admin_key: str | None = None
    """Key of the adapter management endpoints; without one they answer 403."""
    open_health: bool = True
    """Health, readiness and version stay reachable without a key."""
    max_waiting: int = 256
    """Sequences admitted beyond max_num_seqs before new requests get 429."""
    max_body_bytes: int = 1 << 20
    shutdown_timeout: float = 30.0
    """Seconds in-flight requests get to finish after a stop signal."""
    log_level: str = "info"
    metrics_max_adapters: int = 100
    """Distinct adapter label values in /metrics; further adapters are summed under `other`."""
    vllm_compatible_metrics: bool = True
    """/metrics also exports the `vllm:*` gauges the Gateway API Inference Extension's endpoint picker reads."""
    request_timeout: float = 1800.0
    """Seconds a request may run; then it ends with an error and frees its KV blocks."""
    max_stop_strings: int = 16
    max_stop_length: int = 256
    """Characters in one stop string."""
    max_stop_token_ids: int = 256
    max_response_tokens: int = 1 << 20
    """Non-streaming responses: prompts x n x max_tokens x (logprobs + 1) at most this (stream larger ones)."""
    health_stall_seconds: float = 60.0
    """/health fails when work waits and no engine step has finished for this long."""
    allow_unauthenticated: bool = False
    """Serve on a non-loopback address without an API key."""
    public_metrics: bool = False
    """With API keys set, /metrics and the dashboard stay reachable without one."""
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


def _source_spec(text: str) -> AdapterSource:
    try:
        return parse_source(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    add("--adapter-source", "NAME=URL: adapters under s3://bucket/prefix, hf://org/repo[@rev][/dir] or https://... "
        "are served under their directory names, fetched on first use into a verified local cache (repeatable; env: "
        "comma-separated)", kind=_source_spec, action="append", metavar="NAME=URL")
    add("--s3-endpoint-url", "endpoint of an S3-compatible store for s3:// sources (default: AWS)")
    add("--adapter-cache-bytes", "bytes of fetched adapters kept in the local cache (least recently used leave)",
        defaults.adapter_cache_bytes, int)
    add("--pin", "NAME: keep this adapter in a slot, never evicted (repeatable; env: comma-separated)",
        action="append", metavar="NAME")
    add("--max-cpu-adapters", "parsed adapters kept in host memory outside the slots (LRU)", defaults.max_cpu_adapters,
        int)
    add("--max-adapter-bytes", "largest adapter directory a load reads", defaults.max_adapter_bytes, int)
    limits = defaults.adapter_limits
    add("--max-cpu-adapter-bytes", "bytes of parsed adapters kept in host memory outside the slots (LRU)",
        limits.max_host_bytes, int)
    add("--max-adapter-experts", "largest N (experts) of one adapter module", limits.max_experts, int)
    add("--max-adapter-rank", "largest r (expert rank) of one adapter module", limits.max_rank, int)
    add("--max-adapter-subspace-rank", "largest d (shared subspace rank) of one adapter module",
        limits.max_subspace_rank, int)
    add("--state-dir", "where adapters unloaded at runtime are remembered across restarts (default: "
        "$MALORA_CACHE/state)", kind=Path)
    add("--api-key", "required bearer key (repeatable; env: comma-separated)", action="append")
    add("--admin-key", "bearer key of the adapter management endpoints (/v1/adapters, /v1/load_lora_adapter, "
        "/v1/unload_lora_adapter); without one they are disabled")
    add("--open-health", "health, ready and version need no key", defaults.open_health, _bool)
    add("--max-waiting", "sequences admitted beyond --max-num-seqs before 429", defaults.max_waiting, int)
    add("--max-body-bytes", "largest request body (413 above)", defaults.max_body_bytes, int)
    add("--shutdown-timeout", "seconds in-flight requests get to finish on shutdown", defaults.shutdown_timeout,
        float)
    add("--log-level", "logging level", defaults.log_level)
    add("--metrics-max-adapters", "distinct adapter labels in /metrics (the rest are summed as 'other')",
        defaults.metrics_max_adapters, int)
    add("--vllm-compatible-metrics", "also export the vllm:* metrics that Kubernetes' inference gateway (endpoint "
        "picker) reads: queue, KV use, running/waiting adapters, adapter residency", defaults.vllm_compatible_metrics,
        _bool, nargs="?", const=True)
    add("--request-timeout", "seconds a request may run before it is stopped with an error", defaults.request_timeout,
        float)
    add("--max-stop-strings", "stop strings in one request", defaults.max_stop_strings, int)
    add("--max-stop-length", "characters in one stop string", defaults.max_stop_length, int)
    add("--max-stop-token-ids", "stop_token_ids in one request", defaults.max_stop_token_ids, int)
    add("--max-response-tokens", "largest non-streaming response: prompts x n x max_tokens x (logprobs + 1)",
        defaults.max_response_tokens, int)
    add("--health-stall-seconds", "/health fails when work waits and no step finished for this long",
        defaults.health_stall_seconds, float)
    add("--allow-unauthenticated", "serve on a non-loopback address without --api-key",
        defaults.allow_unauthenticated, _bool, nargs="?", const=True)
    add("--public-metrics", "with --api-key, /metrics and /dashboard need no key", defaults.public_metrics, _bool,
        nargs="?", const=True)
    add("--dtype", "model dtype: auto (bfloat16 where the CPU or GPU computes it natively, else float32), "
        "float32, bfloat16 or float16", "auto", choices=("auto", "float32", "bfloat16", "float16"))
    add("--device", "torch device", engine.device)
    add("--block-size", "tokens per KV cache block", engine.block_size, int)
    add("--kv-cache-memory", "bytes for the KV cache pool", engine.kv_cache_memory, int)
    add("--max-num-seqs", "most sequences in one step", engine.max_num_seqs, int)
    add("--max-num-batched-tokens", "most tokens in one step", engine.max_num_batched_tokens, int)
    add("--max-model-len", "longest prompt plus output (default: the model's context)", kind=int)
    add("--max-loaded-adapters", "adapter slots", engine.max_loaded_adapters, int)
    add("--adapter-bank-memory", "bytes of adapters in slots (LRU eviction of idle ones; on the CPU read in place)",
        engine.adapter_bank_memory, int)
    add("--enable-prefix-caching", "reuse KV blocks of shared prompt prefixes", engine.enable_prefix_caching,
        _bool)
    add("--quantization", "gguf: a GGUF model's quantized tensors served as stored through the block kernels (CPU); "
        "int8: weight-only int8 copies of the base linears for one-row decode (CPU, bfloat16); none: float weights",
        "none", str, choices=["none", "gguf", "int8"])
    add("--fast-decode", "decode steps of Llama-style models on CPU through the native decode path (false: "
        "transformers' forward, the reference)", engine.fast_decode, _bool)
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
    for flag, kind in (("--adapter", _adapter_spec), ("--api-key", str), ("--adapter-root", Path), ("--pin", str),
                       ("--adapter-source", _source_spec)):
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
            max_loaded_adapters=args.max_loaded_adapters, adapter_bank_memory=args.adapter_bank_memory,
            enable_prefix_caching=args.enable_prefix_caching,
            pack_cpu_linears=args.pack_cpu_linears, keep_freed_memory=args.keep_freed_memory,
            quantization=None if args.quantization == "none" else args.quantization, fast_decode=args.fast_decode,
        )
    except ValueError as exc:
        parser.error(str(exc))
    for flag, value, low in (("--port", args.port, 0), ("--max-waiting", args.max_waiting, 0),
                             ("--max-body-bytes", args.max_body_bytes, 1),
                             ("--max-cpu-adapters", args.max_cpu_adapters, 1),
                             ("--max-adapter-bytes", args.max_adapter_bytes, 1),
                             ("--adapter-cache-bytes", args.adapter_cache_bytes, 1),
                             ("--metrics-max-adapters", args.metrics_max_adapters, 1)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    for flag, value in (("--max-cpu-adapter-bytes", args.max_cpu_adapter_bytes),
                        ("--max-adapter-experts", args.max_adapter_experts),
                        ("--max-adapter-rank", args.max_adapter_rank),
                        ("--max-adapter-subspace-rank", args.max_adapter_subspace_rank)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--request-timeout", args.request_timeout),
                        ("--health-stall-seconds", args.health_stall_seconds)):
        if not value > 0:
            parser.error(f"{flag} must be > 0, got {value}")
    for flag, value in (("--max-stop-strings", args.max_stop_strings), ("--max-stop-length", args.max_stop_length),
                        ("--max-stop-token-ids", args.max_stop_token_ids),
                        ("--max-response-tokens", args.max_response_tokens)):
        if value < 0:
            parser.error(f"{flag} must be >= 0, got {value}")
    api_keys = [k for k in args.api_key or [] if k]
    _check_keys(parser, api_keys, args.admin_key or None)
    if not api_keys and not args.allow_unauthenticated and not is_loopback(args.host):
        parser.error(f"--host {args.host} is reachable from other machines and no --api-key is set: anyone who "
                     "reaches it could use the model and its adapters. Set --api-key (or MALORA_API_KEY), or pass "
                     "--allow-unauthenticated to serve without one on purpose.")
    pins = list(dict.fromkeys(args.pin or []))
    sources = list(args.adapter_source or [])
    if len({s.name for s in sources}) != len(sources):
        parser.error("--adapter-source names must be unique")
    if pins and len(pins) >= engine.max_loaded_adapters:
        parser.error(f"{len(pins)} --pin(s) would leave no slot of --max-loaded-adapters "
                     f"{engine.max_loaded_adapters} for the other adapters")
    return ServerSettings(
        host=args.host, port=args.port, served_model_name=args.served_model_name,
        adapters=adapters, adapter_roots=list(args.adapter_root or []), pins=pins,
        max_cpu_adapters=args.max_cpu_adapters, max_adapter_bytes=args.max_adapter_bytes,
        adapter_limits=AdapterLimits(args.max_adapter_experts, args.max_adapter_rank, args.max_adapter_subspace_rank,
                                     args.max_cpu_adapter_bytes),
        adapter_sources=sources, s3_endpoint_url=args.s3_endpoint_url or None,
        adapter_cache_bytes=args.adapter_cache_bytes, state_dir=args.state_dir,
        api_keys=api_keys, admin_key=args.admin_key or None,
        open_health=args.open_health, max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes,
        shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
        metrics_max_adapters=args.metrics_max_adapters, vllm_compatible_metrics=args.vllm_compatible_metrics,
        request_timeout=args.request_timeout,
        max_stop_strings=args.max_stop_strings, max_stop_length=args.max_stop_length,
        max_stop_token_ids=args.max_stop_token_ids, max_response_tokens=args.max_response_tokens,
        health_stall_seconds=args.health_stall_seconds, allow_unauthenticated=args.allow_unauthenticated,
        public_metrics=args.public_metrics, engine=engine,
    )


MIN_ADMIN_KEY_LENGTH = 16


def _check_keys(parser: argparse.ArgumentParser, api_keys: list[str], admin_key: str | None) -> None:
    """The admin key unlocks adapter management: long enough not to be guessed, and no API key doubles as it."""
    if admin_key is None:
        return
    if len(admin_key) < MIN_ADMIN_KEY_LENGTH:
        parser.error(f"--admin-key must be at least {MIN_ADMIN_KEY_LENGTH} characters, got {len(admin_key)}")
    if admin_key in api_keys:
        parser.error("--admin-key must differ from every --api-key: a client's key must not manage adapters")


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
