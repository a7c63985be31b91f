"""Adapter files handled safely: atomic writers, a reader that opens only regular files inside the adapter
directory (never blocking on a FIFO) and reads them into memory, cached failed reads, strict PEFT configs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

from malora_runtime.adapters import atomic_directory, load_adapter, save_adapter
from malora_runtime.adapters import errors as E
from malora_runtime.adapters import files as adapter_files
from malora_runtime.adapters import io as adapter_io
from malora_runtime.adapters.convert import PEFT_CONFIG, PEFT_WEIGHTS
from malora_runtime.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from malora_runtime.adapters.init import random_adapter
from malora_runtime.adapters.io import write_adapter_files
from malora_runtime.adapters.registry import AdapterRegistry
from malora_runtime.patching import linear_shapes
from tests.adapters.test_convert import make_peft_adapter, malora_logits, peft_logits
from tests.conftest import make_tiny_llama

SHAPES = linear_shapes(make_tiny_llama())


def make(seed: int, rank: int = 2, alpha: float | None = None):
    return random_adapter(SHAPES, "tiny", ["q_proj"], 2, rank, 3, 1, seed=seed, alpha=alpha, dtype="float32")


def first_s(adapter) -> torch.Tensor:
    return adapter.modules[min(adapter.modules)].S


def leftovers(parent: Path) -> list[str]:
    """Hidden siblings a writer left behind (staging or replaced directories)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def call_within(seconds: float, fn) -> BaseException | None:
    """Run `fn` in a daemon thread; the exception it raised, None if it returned. Fails if it blocks."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still blocked after {seconds} s"
    return outcome[0]


# ---- atomic writers ----
def test_readers_never_see_a_partial_directory_while_a_writer_rewrites_it(tmp_path: Path) -> None:
    dst = tmp_path / "a"
    # Config and weights of two versions: with two ranks they do not validate together; with one rank they
    # do, and the alpha (in the config) would not be the one written with those weights.
    versions = [make(seed, rank=2 + seed % 2, alpha=float(seed + 1)) for seed in range(6)]
    save_adapter(versions[0], dst)
    done = threading.Event()
    problems: list[str] = []
    reads = 0

    def writer() -> None:
        try:
            for i in range(40):
                save_adapter(versions[i % len(versions)], dst)
                time.sleep(0.002)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set():
        try:
            names = set(os.listdir(dst))
        except FileNotFoundError:
            continue
        if names != {CONFIG_FILE, WEIGHTS_FILE}:
            problems.append(f"listing {sorted(names)}")
        try:
            loaded = load_adapter(dst, SHAPES)
        except E.AdapterNotFoundError:
            continue
        except E.AdapterError as exc:
            if "replaced while being read" not in str(exc):  # a clear error, not a half-read directory
                problems.append(f"read failed: {exc}")
            continue
        reads += 1
        written = [v for v in versions if torch.equal(first_s(loaded), first_s(v))]
        if len(written) != 1 or loaded.config.modules["q_proj"] != written[0].config.modules["q_proj"]:
            problems.append("config and weights of no single written version")
    thread.join()
    assert not problems, problems[:5]
    assert reads > 0
    assert leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_directory_as_it_was(tmp_path: Path, monkeypatch) -> None:
    dst = save_adapter(make(1), tmp_path / "a")
    before = {name: (dst / name).read_bytes() for name in os.listdir(dst)}

    with pytest.raises(RuntimeError), atomic_directory(dst) as staging:
        write_adapter_files(make(2), staging)
        raise RuntimeError("the writer failed after writing its files")

    def half_written(tensors, filename, metadata=None) -> None:
        Path(filename).write_bytes(b"\x00" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(make(3), dst)
    assert {name: (dst / name).read_bytes() for name in os.listdir(dst)} == before
    assert leftovers(tmp_path) == []


def test_without_an_exchange_the_old_directory_is_renamed_aside_and_restored_on_failure(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(adapter_files, "_exchange", lambda a, b: False)  # as on a system without renameat2
    dst = save_adapter(make(1), tmp_path / "a")
    save_adapter(make(2), dst)
    torch.testing.assert_close(first_s(load_adapter(dst, SHAPES)), first_s(make(2)), rtol=0, atol=0)
    before = (dst / WEIGHTS_FILE).read_bytes()
    real_rename = os.rename

    def rename(src, target) -> None:
        if ".tmp-" in os.fspath(src):
            raise OSError("rename failed")
        real_rename(src, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        save_adapter(make(3), dst)
    assert (dst / WEIGHTS_FILE).read_bytes() == before
    assert leftovers(tmp_path) == []


def test_writers_refuse_to_replace_what_is_not_an_adapter_directory(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("keep me")
    with pytest.raises(E.DestinationError, match="not an adapter directory"):
        save_adapter(make(1), project)
    assert os.listdir(project) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(E.DestinationError, match="not a directory"):
        save_adapter(make(1), tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_adapter(save_adapter(make(1), empty), SHAPES).config.modules["q_proj"].r == 2


def test_written_directories_have_the_usual_permissions(tmp_path: Path) -> None:
    os.mkdir(tmp_path / "plain")
    save_adapter(make(1), tmp_path / "a")
    assert (tmp_path / "a").stat().st_mode == (tmp_path / "plain").stat().st_mode


@pytest.mark.parametrize("rank", [2, 3])  # 3: the mix fails validation; 2: it would pass, with the wrong alpha
def test_a_reader_racing_a_replacement_reads_one_version_again(tmp_path: Path, monkeypatch, rank: int) -> None:
    dst = save_adapter(make(1, rank=2, alpha=2.0), tmp_path / "a")
    original = adapter_io.read_safetensors
    calls = []

    def swap_then_read(path, root, max_bytes=adapter_io.MAX_WEIGHTS_BYTES):
        calls.append(path)
        if len(calls) == 1:  # the config of version 1 is read; now the writer swaps in version 2
            save_adapter(make(2, rank=rank, alpha=5.0), dst)
        return original(path, root, max_bytes)

    monkeypatch.setattr(adapter_io, "read_safetensors", swap_then_read)
    loaded = load_adapter(dst, SHAPES)
    assert len(calls) == 2 and loaded.config.modules["q_proj"].r == rank
    assert loaded.config.modules["q_proj"].alpha == 5.0
    torch.testing.assert_close(first_s(loaded), first_s(make(2, rank=rank, alpha=5.0)), rtol=0, atol=0)


# ---- the reader: regular files inside the directory only ----
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE])
def test_a_fifo_is_refused_without_blocking(tmp_path: Path, name: str) -> None:
    dst = save_adapter(make(1), tmp_path / "a")
    (dst / name).unlink()
    os.mkfifo(dst / name)
    try:
        error = call_within(10, lambda: load_adapter(dst, SHAPES))
    finally:  # unblock a reader stuck in open(), should there be one
        with contextlib.suppress(OSError):
            os.close(os.open(dst / name, os.O_WRONLY | os.O_NONBLOCK))
    assert isinstance(error, E.UnsafeFileError), error
    assert name in str(error) and "FIFO" in str(error)


@pytest.mark.timeout(60)
def test_a_fifo_as_a_peft_config_and_through_the_registry_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    peft = root / "p"
    peft.mkdir()
    os.mkfifo(peft / PEFT_CONFIG)
    error = call_within(10, lambda: load_adapter(peft))
    assert isinstance(error, E.UnsafeFileError) and PEFT_CONFIG in str(error)
    adapter = save_adapter(make(1), root / "a")
    (adapter / WEIGHTS_FILE).unlink()
    os.symlink("fifo", adapter / WEIGHTS_FILE)
    os.mkfifo(adapter / "fifo")
    registry = AdapterRegistry(SHAPES, [root])
    try:
        error = call_within(10, lambda: asyncio.run(registry.fetch("a")))
    finally:
        registry.close()
    assert isinstance(error, E.UnsafeFileError) and "FIFO" in str(error)


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/urandom", "outside"])
def test_symlinks_leaving_the_directory_are_refused(tmp_path: Path, target: str) -> None:
    dst = save_adapter(make(1), tmp_path / "a")
    if target == "outside":
        target = str(tmp_path / "outside.safetensors")
        shutil.copy(dst / WEIGHTS_FILE, target)  # a valid file: only where it lives is wrong
    (dst / WEIGHTS_FILE).unlink()
    os.symlink(target, dst / WEIGHTS_FILE)
    with pytest.raises(E.UnsafeFileError, match="outside the adapter directory"):
        load_adapter(dst, SHAPES)


def test_a_symlink_to_a_regular_file_inside_the_directory_is_read(tmp_path: Path) -> None:
    dst = save_adapter(make(1), tmp_path / "a")
    expected = load_adapter(dst, SHAPES)
    (dst / "blobs").mkdir()
    os.rename(dst / WEIGHTS_FILE, dst / "blobs" / "weights")
    os.symlink("blobs/weights", dst / WEIGHTS_FILE)
    loaded = load_adapter(dst, SHAPES)
    for path, weights in expected.modules.items():
        torch.testing.assert_close(loaded.modules[path].tensors(), weights.tensors(), rtol=0, atol=0)
    # Through a symlinked adapter directory as well: "inside" is judged on the resolved paths.
    os.symlink(dst, tmp_path / "link", target_is_directory=True)
    assert load_adapter(tmp_path / "link", SHAPES).modules.keys() == expected.modules.keys()


def test_a_symlink_to_a_fifo_inside_the_directory_is_refused(tmp_path: Path) -> None:
    dst = save_adapter(make(1), tmp_path / "a")
    os.mkfifo(dst / "pipe")
    (dst / CONFIG_FILE).unlink()
    os.symlink("pipe", dst / CONFIG_FILE)
    error = call_within(10, lambda: load_adapter(dst, SHAPES))
    assert isinstance(error, E.UnsafeFileError) and "FIFO" in str(error)


def test_the_registry_size_check_does_not_follow_symlinks_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    dst = save_adapter(make(1), root / "a")
    (tmp_path / "big").write_bytes(b"\x00" * 200_000)  # larger than the cap below
    (dst / WEIGHTS_FILE).unlink()
    os.symlink(tmp_path / "big", dst / WEIGHTS_FILE)
    registry = AdapterRegistry(SHAPES, [root], max_adapter_bytes=100_000)
    try:
        with pytest.raises(E.UnsafeFileError):  # not AdapterTooLargeError: the target was never sized
            asyncio.run(registry.fetch("a"))
    finally:
        registry.close()


# ---- the reader: weights read into memory ----
def test_weights_are_read_into_memory_not_mapped(tmp_path: Path, monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("the loader must not memory-map the file")

    for module in (safetensors, safetensors.torch):
        monkeypatch.setattr(module, "safe_open", forbidden)
    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    for module in (adapter_io, adapter_files):
        monkeypatch.setattr(module, "safe_open", forbidden, raising=False)
    dst = save_adapter(make(1), tmp_path / "a")
    loaded = load_adapter(dst, SHAPES)
    kept = {p: {n: t.clone() for n, t in w.tensors().items()} for p, w in loaded.modules.items()}
    other = tmp_path / "other"
    other.mkdir()
    write_adapter_files(make(2), other)
    new = (other / WEIGHTS_FILE).read_bytes()
    assert len(new) == (dst / WEIGHTS_FILE).stat().st_size
    with open(dst / WEIGHTS_FILE, "r+b") as handle:  # in place: a mapping would see the new bytes
        handle.write(new)
    for path, weights in loaded.modules.items():
        torch.testing.assert_close(weights.tensors(), kept[path], rtol=0, atol=0)
    assert not torch.equal(first_s(load_adapter(dst, SHAPES)), first_s(loaded))  # the file did change


def test_the_read_is_capped(tmp_path: Path) -> None:
    dst = save_adapter(make(1), tmp_path / "a")
    size = (dst / WEIGHTS_FILE).stat().st_size
    assert load_adapter(dst, SHAPES, max_bytes=size).modules
    with pytest.raises(E.FileTooLargeError, match=WEIGHTS_FILE):
        load_adapter(dst, SHAPES, max_bytes=size - 1)


def test_corrupt_files_keep_their_errors(tmp_path: Path) -> None:
    dst = save_adapter(make(1), tmp_path / "a")
    (dst / WEIGHTS_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(E.CorruptFileError, match="not a valid safetensors file"):
        load_adapter(dst, SHAPES)
    (dst / CONFIG_FILE).write_bytes(b"\xff\xfe")
    with pytest.raises(E.AdapterConfigError, match="not UTF-8"):
        load_adapter(dst, SHAPES)


# ---- failed reads cached briefly ----
def counting_registry(root: Path, **kwargs) -> tuple[AdapterRegistry, list[str]]:
    registry = AdapterRegistry(SHAPES, [root], **kwargs)
    reads: list[str] = []
    original = registry._read
    registry._read = lambda name, path: reads.append(name) or original(name, path)
    return registry, reads


def test_a_failed_read_is_reraised_without_reading_until_a_load_succeeds(tmp_path: Path) -> None:
    root = tmp_path / "root"
    dst = save_adapter(make(1), root / "a")
    (dst / WEIGHTS_FILE).write_bytes((dst / WEIGHTS_FILE).read_bytes()[:40])
    registry, reads = counting_registry(root, failed_read_ttl=60.0)

    async def scenario() -> None:
        errors = []
        for _ in range(3):
            with pytest.raises(E.CorruptFileError) as caught:
                await registry.fetch("a")
            errors.append(caught.value)
        assert reads == ["a"] and errors[0] is errors[1] is errors[2]
        save_adapter(make(2), dst)  # the operator fixes the files...
        with pytest.raises(E.CorruptFileError):
            await registry.fetch("a")  # ...a lazy request still gets the remembered error
        assert reads == ["a"]
        entry = await registry.load("a", dst)  # ...and reloads: this always reads
        assert reads == ["a", "a"] and entry.version == 1
        registry._host.clear()  # as an eviction would: the next request reads again, the failure is forgotten
        assert (await registry.fetch("a")).version == 1 and reads == ["a", "a", "a"]

    try:
        asyncio.run(scenario())
    finally:
        registry.close()


def test_a_failed_read_is_forgotten_after_the_ttl(tmp_path: Path) -> None:
    root = tmp_path / "root"
    dst = save_adapter(make(1), root / "a")
    (dst / CONFIG_FILE).write_text("{")
    registry, reads = counting_registry(root, failed_read_ttl=0.2)
    assert AdapterRegistry.FAILED_READ_TTL == 5.0

    async def scenario() -> None:
        for expected_reads in (1, 1, 2):
            if expected_reads == 2:
                await asyncio.sleep(0.3)
            with pytest.raises(E.AdapterConfigError):
                await registry.fetch("a")
            assert len(reads) == expected_reads

    try:
        asyncio.run(scenario())
    finally:
        registry.close()


# ---- PEFT LoRA configs ----
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def peft_dir(tiny_llama, tmp_path: Path) -> Path:
    return make_peft_adapter(tiny_llama, tmp_path / "peft", TARGETS, rank=4, alpha=8)


def edit_peft_config(directory: Path, **changes) -> None:
    path = directory / PEFT_CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(("key", "value"), [
    ("r", "4"), ("r", None), ("r", [4]), ("r", True), ("r", 0), ("r", 4.0),
    ("lora_alpha", "8"), ("lora_alpha", None), ("lora_alpha", [8]), ("lora_alpha", False),
    ("lora_alpha", math.inf), ("use_rslora", "yes"),
    ("rank_pattern", ["q_proj"]), ("rank_pattern", {"q_proj": "4"}), ("alpha_pattern", {"q_proj": None}),
    ("alpha_pattern", {"q_proj(": 8}),
])
def test_bad_peft_values_are_refused(peft_dir: Path, tiny_llama, key: str, value) -> None:
    edit_peft_config(peft_dir, **{key: value})
    with pytest.raises(E.AdapterConfigError, match=key):
        load_adapter(peft_dir, linear_shapes(tiny_llama))


@pytest.mark.parametrize("flag", ["lora_bias", "use_dora"])
def test_peft_options_without_an_exact_form_are_refused(peft_dir: Path, flag: str) -> None:
    edit_peft_config(peft_dir, **{flag: True})
    with pytest.raises(E.AdapterConfigError, match=flag):
        load_adapter(peft_dir)


def test_a_lora_b_bias_tensor_is_refused_not_taken_for_the_weight(peft_dir: Path) -> None:
    tensors = load_file(str(peft_dir / PEFT_WEIGHTS))
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    tensors[key.replace(".weight", ".bias")] = torch.ones(tensors[key].shape[0])
    save_file(tensors, str(peft_dir / PEFT_WEIGHTS))
    with pytest.raises(E.AdapterConfigError, match=r"lora_B\.bias"):
        load_adapter(peft_dir)


@pytest.mark.parametrize("extra", [
    {"alpha_pattern": {"(q|v)_proj": 32}},  # a regular expression, not a suffix
    {"alpha_pattern": {"proj": 99}},  # matches no module name: PEFT ignores it (a suffix test would not)
    {"rank_pattern": {"q_proj": 8}, "alpha_pattern": {r"self_attn\.q_proj": 24}},
    {"alpha_pattern": {"q_proj": 16, r"self_attn\.q_proj": 40}},  # the first matching key wins
    {"rank_pattern": {r"layers\.\d+\.self_attn\.v_proj": 2}, "use_rslora": True},
])
def test_peft_patterns_apply_as_in_peft(tiny_llama, tmp_path: Path, extra: dict) -> None:
    directory = make_peft_adapter(tiny_llama, tmp_path / "peft", TARGETS, rank=4, alpha=8, **extra)
    ids = torch.randint(0, 256, (2, 10))
    expected = peft_logits(tiny_llama, directory, ids)
    adapter = load_adapter(directory, linear_shapes(tiny_llama))
    torch.testing.assert_close(malora_logits(tiny_llama, adapter, ids), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("extra", [
    {"rank_pattern": {r"layers\.0\.self_attn\.q_proj": 8}},
    {"alpha_pattern": {r"model\.layers\.1\.self_attn\.v_proj": 3}},
])
def test_peft_patterns_that_differ_between_layers_are_refused(tiny_llama, tmp_path: Path, extra: dict) -> None:
    directory = make_peft_adapter(tiny_llama, tmp_path / "peft", TARGETS, rank=4, alpha=8, **extra)
    with pytest.raises(E.AdapterConfigError, match="different values.*cannot be converted"):
        load_adapter(directory, linear_shapes(tiny_llama))


def test_peft_defaults_are_peft_s(peft_dir: Path, tiny_llama) -> None:
    config = json.loads((peft_dir / PEFT_CONFIG).read_text())
    del config["lora_alpha"]  # LoraConfig's default is 8, whatever r is
    (peft_dir / PEFT_CONFIG).write_text(json.dumps(config))
    assert load_adapter(peft_dir).config.modules["q_proj"].alpha == 8.0
