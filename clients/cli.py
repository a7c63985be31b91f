"""The `malora` command line: adapters (convert, init, info), offline generation, training, benchmarks, and
the commands that talk to a running server (chat, complete, models, adapters: see `cli_remote`)."""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .cli_remote import add_remote_commands

log = logging.getLogger("malora")


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _cmd_convert_peft(args: argparse.Namespace) -> int:
    from malora_runtime.adapters import save_adapter
    from malora_runtime.adapters.convert import peft_lora_to_malora

    adapter = peft_lora_to_malora(args.src, dtype=args.dtype)
    save_adapter(adapter, args.dst)
    _out(f"wrote {args.dst}: {len(adapter.modules)} modules, targets {adapter.config.target_modules}")
    return 0


def _cmd_convert_molora(args: argparse.Namespace) -> int:
    from malora_runtime.adapters import save_adapter
    from malora_runtime.adapters.convert import molora_to_malora

    adapter, energies = molora_to_malora(args.src, args.subspace_rank)
    adapter.config.dtype = args.dtype
    save_adapter(adapter, args.dst)
    for path, energy in energies.items():
        _out(f"{path}\tenergy kept {energy:.6f}")
    _out(f"wrote {args.dst}: {len(adapter.modules)} modules, min energy kept {min(energies.values()):.6f}")
    return 0


def _cmd_adapter_init(args: argparse.Namespace) -> int:
    from malora_runtime.adapters import save_adapter
    from malora_runtime.adapters.init import random_adapter
    from malora_runtime.models.loader import load_model
    from malora_runtime.patching import linear_shapes

    model, _, source = load_model(args.base)
    adapter = random_adapter(
        linear_shapes(model), source.name, args.targets.split(","), args.experts, args.rank,
        args.subspace_rank, args.top_k, args.seed, alpha=args.alpha, dtype=args.dtype,
    )
    save_adapter(adapter, args.dst)
    _out(f"wrote {args.dst}: {len(adapter.modules)} modules")
    return 0


def _cmd_adapter_info(args: argparse.Namespace) -> int:
    from malora_runtime.adapters import load_adapter
    from malora_runtime.adapters.cost import adapter_cost

    adapter = load_adapter(args.path)
    cost = adapter_cost(adapter)
    info = {
        "base_model": adapter.config.base_model,
        "target_modules": adapter.config.target_modules,
        "modules": {k: vars(v) for k, v in adapter.config.modules.items()},
        "num_adapted_layers": cost.num_modules,
        "parameters": cost.parameters,
        "macs_per_token": cost.macs_per_token,
        "bytes": adapter.num_bytes(),
    }
    _out(json.dumps(info, indent=2))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from malora_runtime.adapters import load_adapter
    from malora_runtime.models.loader import load_model
    from malora_runtime.offline import encode_prompt, greedy_generate
    from malora_runtime.patching import linear_shapes

    model, tokenizer, _ = load_model(args.model)
    adapter = load_adapter(args.adapter, linear_shapes(model)) if args.adapter else None
    prompt_ids = encode_prompt(tokenizer, args.prompt, args.chat)
    new_ids = greedy_generate(model, tokenizer, prompt_ids, adapter, args.max_tokens)
    _out(tokenizer.decode(new_ids, skip_special_tokens=True))
    return 0


BENCHES = {
    "kernels": "malora_runtime.bench.kernels",
    "memory": "malora_runtime.bench.memory",
    "metrics": "malora_runtime.bench.metrics_overhead",
    "offline": "malora_runtime.bench.offline",
    "routing": "malora_runtime.bench.routing",
    "serve": "malora_runtime.bench.serve",
    "swap": "malora_runtime.bench.swap",
    "train": "malora_runtime.training.efficiency",
}
TOOLS = {"train": "malora_runtime.training.trainer", "eval": "malora_runtime.training.evaluate"}


def _summary(module: str) -> str | None:
    """The first line of a module's docstring, read without importing it; None when there is no module."""
    try:
        spec = importlib.util.find_spec(module)
    except ImportError:
        return None
    if spec is None or not spec.origin:
        return None
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
    line = doc.strip().splitlines()[0] if doc.strip() else ""
    return re.sub(r"^`[^`]*`:\s*", "", line)


def _add_module(sub: argparse._SubParsersAction, name: str, module: str, selected: bool) -> None:
    """A subcommand from a module's `add_arguments(parser)` and `run(args)`; the module (torch and all) is
    imported only when this subcommand is the one being run."""
    summary = _summary(module)
    if summary is None:
        return
    parser = sub.add_parser(name, help=summary, description=summary)
    if selected:
        loaded = importlib.import_module(module)
        loaded.add_arguments(parser)
        parser.set_defaults(func=loaded.run)


def _add_bench(sub: argparse._SubParsersAction, words: list[str]) -> None:
    bench = sub.add_parser("bench", help="benchmarks (see docs/BENCHMARKS*.md)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, module in BENCHES.items():
        _add_module(bench_sub, name, module, words[:2] == ["bench", name])


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """`argv` picks which lazily imported subcommand (bench, train, eval) gets its full arguments."""
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    parser = argparse.ArgumentParser(prog="malora", description="MALoRA Serve command line")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert other adapter formats to MALoRA")
    convert_sub = convert.add_subparsers(dest="kind", required=True)
    peft = convert_sub.add_parser("peft-lora", help="a PEFT LoRA directory, exactly (N = 1)")
    molora = convert_sub.add_parser("molora", help="a mixture of LoRA experts, by SVD of the stacked A")
    molora.add_argument("--subspace-rank", type=int, required=True, help="d, the shared subspace rank")
    for p, func in ((peft, _cmd_convert_peft), (molora, _cmd_convert_molora)):
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
        p.set_defaults(func=func)

    adapter = sub.add_parser("adapter", help="create or inspect adapters")
    adapter_sub = adapter.add_subparsers(dest="action", required=True)
    init = adapter_sub.add_parser("init", help="a random adapter with non-zero weights")
    init.add_argument("--base", default=None, help="base model (default: SmolLM2-135M-Instruct)")
    init.add_argument("--experts", type=int, default=4)
    init.add_argument("--rank", type=int, default=8)
    init.add_argument("--subspace-rank", type=int, default=16)
    init.add_argument("--top-k", type=int, default=2)
    init.add_argument("--alpha", type=float, default=None, help="default: the rank (scale 1)")
    init.add_argument("--targets", default="q_proj,v_proj")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    init.add_argument("dst")
    init.set_defaults(func=_cmd_adapter_init)
    info = adapter_sub.add_parser("info", help="config, parameter count and per-token multiply-adds")
    info.add_argument("path")
    info.set_defaults(func=_cmd_adapter_info)

    generate = sub.add_parser("generate", help="greedy offline generation (no server)")
    generate.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2-135M-Instruct)")
    generate.add_argument("--adapter", default=None, help="MALoRA or PEFT LoRA directory")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--chat", action="store_true", help="apply the model's chat template")
    generate.set_defaults(func=_cmd_generate)

    add_remote_commands(sub)
    _add_bench(sub, words)
    for name, module in TOOLS.items():
        _add_module(sub, name, module, words[:1] == [name])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        # Adapter, model and argument errors are the user's to fix: one clear line, no traceback.
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
