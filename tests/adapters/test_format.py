"""The adapter format: round trip, and every malformed case raising its named error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from malora_runtime.adapters import errors as E
from malora_runtime.adapters import load_adapter, save_adapter
from malora_runtime.adapters.cost import adapter_cost, malora_macs_per_token, malora_params
from malora_runtime.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from malora_runtime.adapters.init import random_adapter
from malora_runtime.patching import linear_shapes


@pytest.fixture
def shapes(tiny_llama):
    return linear_shapes(tiny_llama)


@pytest.fixture
def adapter_dir(tmp_path: Path, shapes) -> Path:
    adapter = random_adapter(shapes, "tiny", ["q_proj", "v_proj", "down_proj"], num_experts=4, rank=3,
                             subspace_rank=5, top_k=2, seed=1, dtype="float32")
    return save_adapter(adapter, tmp_path / "adapter")


def edit_tensors(directory: Path, edit) -> None:
    path = directory / WEIGHTS_FILE
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def edit_config(directory: Path, edit) -> None:
    path = directory / CONFIG_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_round_trip_keeps_every_tensor(adapter_dir: Path, shapes) -> None:
    loaded = load_adapter(adapter_dir, shapes)
    raw = load_file(str(adapter_dir / WEIGHTS_FILE))
    assert len(loaded.modules) == 2 * 3  # two layers, three targets
    for path, weights in loaded.modules.items():
        for name, tensor in weights.tensors().items():
            assert torch.equal(tensor, raw[f"{path}.{name}"])
    assert loaded.config.modules["q_proj"].top_k == 2


def test_cost_formulas_match_the_stored_parameters(adapter_dir: Path, shapes) -> None:
    adapter = load_adapter(adapter_dir, shapes)
    stored = sum(t.numel() for w in adapter.modules.values() for t in w.tensors().values())
    assert adapter_cost(adapter).parameters == stored
    spec = adapter.config.modules["q_proj"]
    # d d_in + N d_in + k r (d + d_out) with d=5, N=4, k=2, r=3 on a 64 -> 64 layer.
    assert malora_macs_per_token(spec, 64, 64) == 5 * 64 + 4 * 64 + 2 * 3 * (5 + 64)
    assert malora_params(spec, 64, 64) == 5 * 64 + 4 * 64 + 4 * 3 * (5 + 64)


def test_missing_tensor(adapter_dir: Path, shapes) -> None:
    edit_tensors(adapter_dir, lambda t: t.pop("model.layers.1.self_attn.v_proj.P"))
    with pytest.raises(E.MissingTensorError, match=r"model\.layers\.1\.self_attn\.v_proj\.P"):
        load_adapter(adapter_dir, shapes)


def test_extra_tensor(adapter_dir: Path, shapes) -> None:
    edit_tensors(adapter_dir, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.Z", torch.ones(2)))
    with pytest.raises(E.UnexpectedTensorError, match="q_proj.Z"):
        load_adapter(adapter_dir, shapes)


def test_tensor_of_a_module_that_is_not_a_target(adapter_dir: Path, shapes) -> None:
    edit_tensors(adapter_dir, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.S", torch.ones(5, 64)))
    with pytest.raises(E.UnexpectedTensorError, match="k_proj"):
        load_adapter(adapter_dir, shapes)


def test_shape_that_does_not_fit_the_base_model(adapter_dir: Path, shapes) -> None:
    wrong = dict(shapes)
    wrong["model.layers.0.mlp.down_proj"] = (96, 32)  # as if the base model's d_out were 32
    with pytest.raises(E.ShapeMismatchError, match=r"down_proj\.B.*\[4, 64, 3\].*\[4, 32, 3\]"):
        load_adapter(adapter_dir, wrong)


def test_shape_that_does_not_fit_the_config(adapter_dir: Path, shapes) -> None:
    edit_tensors(adapter_dir, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.S", torch.ones(6, 64)))
    with pytest.raises(E.ShapeMismatchError, match=r"q_proj\.S.*\[6, 64\].*expected \[5, 64\]"):
        load_adapter(adapter_dir, shapes)


def test_unknown_module(adapter_dir: Path, shapes) -> None:
    def add_layer_7(t: dict) -> None:
        for name, tensor in list(t.items()):
            if name.startswith("model.layers.0.self_attn.q_proj."):
                t[name.replace("layers.0", "layers.7")] = tensor.clone()

    edit_tensors(adapter_dir, add_layer_7)
    with pytest.raises(E.UnknownModuleError, match=r"model\.layers\.7\.self_attn\.q_proj"):
        load_adapter(adapter_dir, shapes)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values(adapter_dir: Path, shapes, value: float) -> None:
    def poison(t: dict) -> None:
        t["model.layers.1.mlp.down_proj.B"][0, 3, 1] = value

    edit_tensors(adapter_dir, poison)
    with pytest.raises(E.NonFiniteTensorError, match=r"down_proj\.B"):
        load_adapter(adapter_dir, shapes)


def test_inf_and_minus_inf_in_one_tensor_are_refused(adapter_dir: Path, shapes) -> None:
    def poison(t: dict) -> None:  # their sum is NaN, not Inf: still refused
        t["model.layers.0.self_attn.v_proj.G"][0, 0] = float("inf")
        t["model.layers.0.self_attn.v_proj.G"][1, 0] = float("-inf")

    edit_tensors(adapter_dir, poison)
    with pytest.raises(E.NonFiniteTensorError, match=r"layers\.0\.self_attn\.v_proj\.G"):
        load_adapter(adapter_dir, shapes)


def test_huge_finite_values_are_not_mistaken_for_inf(adapter_dir: Path, shapes) -> None:
    """The finite check sums each tensor in float32; a sum that overflows must not refuse the adapter."""

    def enlarge(t: dict) -> None:
        t["model.layers.1.mlp.down_proj.B"] = t["model.layers.1.mlp.down_proj.B"].float().fill_(3e38)

    edit_tensors(adapter_dir, enlarge)
    adapter = load_adapter(adapter_dir, shapes)
    assert float(adapter.modules["model.layers.1.mlp.down_proj"].B.max()) == pytest.approx(3e38)


def test_top_k_greater_than_experts(adapter_dir: Path, shapes) -> None:
    edit_config(adapter_dir, lambda c: c["modules"]["q_proj"].__setitem__("top_k", 5))
    with pytest.raises(E.AdapterConfigError, match=r"top_k \(5\) > num_experts N \(4\)"):
        load_adapter(adapter_dir, shapes)


def test_unsupported_version(adapter_dir: Path, shapes) -> None:
    edit_config(adapter_dir, lambda c: c.__setitem__("format_version", 99))
    with pytest.raises(E.UnsupportedVersionError, match="99"):
        load_adapter(adapter_dir, shapes)


@pytest.mark.parametrize("field,value", [("r", 0), ("alpha", "x"), ("router_norm", "sparsemax"),
                                         ("router_temperature", 0), ("d", 2.5)])
def test_bad_config_values(adapter_dir: Path, shapes, field: str, value) -> None:
    edit_config(adapter_dir, lambda c: c["modules"]["v_proj"].__setitem__(field, value))
    with pytest.raises(E.AdapterConfigError, match=field):
        load_adapter(adapter_dir, shapes)


def test_invalid_json(adapter_dir: Path, shapes) -> None:
    (adapter_dir / CONFIG_FILE).write_text("{not json")
    with pytest.raises(E.AdapterConfigError, match="invalid JSON"):
        load_adapter(adapter_dir, shapes)


def test_pickle_file_is_refused_without_being_opened(adapter_dir: Path, shapes) -> None:
    # Not a real pickle: if we ever tried to unpickle it we would get a different error.
    (adapter_dir / "adapter_model.bin").write_bytes(b"this would be unpickled")
    with pytest.raises(E.UnsafeFormatError, match=r"adapter_model\.bin.*pickle"):
        load_adapter(adapter_dir, shapes)


def test_truncated_safetensors(adapter_dir: Path, shapes) -> None:
    path = adapter_dir / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(E.CorruptFileError, match=WEIGHTS_FILE):
        load_adapter(adapter_dir, shapes)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(E.AdapterNotFoundError):
        load_adapter(tmp_path / "nope")


def test_every_error_is_an_adapter_error() -> None:
    for name in dir(E):
        obj = getattr(E, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj is not E.AdapterError:
            assert issubclass(obj, E.AdapterError), name
