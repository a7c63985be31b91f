"""`/v1/models`, health, readiness, version and the OpenAPI schema of the live server."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_models_list_base_and_adapters(client, live_server):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {live_server.base_model, "alpha", "beta"}
    base = models[live_server.base_model]
    assert base.object == "model" and base.model_extra["adapter"] is None
    alpha = models["alpha"].model_extra
    assert alpha["parent"] == live_server.base_model
    meta = alpha["adapter"]
    assert meta["state"] == "loaded"
    assert (meta["num_experts"], meta["rank"], meta["subspace_rank"], meta["top_k"]) == (4, 8, 16, 2)
    assert meta["target_modules"] == ["q_proj", "v_proj"]
    beta = models["beta"].model_extra["adapter"]
    assert beta["target_modules"] == ["q_proj", "v_proj", "o_proj"] and beta["modules"]["o_proj"]["num_experts"] == 2


def test_model_by_id(client, live_server):
    assert client.models.retrieve("beta").model_extra["adapter"]["top_k"] == 1
    assert client.models.retrieve(live_server.base_model).id == live_server.base_model


def test_health_ready_version(http):
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").json() == {"status": "ready"}
    version = http.get("/version").json()
    assert version["version"] and version["model"]
    # The live server runs with the default --dtype auto: what it chose, and why, as detected here.
    from malora_runtime.cpu_features import cpu_features
    from malora_runtime.dtype_choice import choose_dtype

    expected = choose_dtype("auto", "cpu")
    assert (version["dtype"], version["dtype_reason"]) == (expected.name, expected.reason)
    assert version["cpu_isa"] == cpu_features().describe() and version["cpu_isa"].startswith(cpu_features().level)
    assert version["weights"].startswith(f"{expected.name} (")  # float weights in the served dtype by default


def test_openapi_describes_the_bodies(http):
    schema = http.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model_id}", "/health",
                 "/ready", "/version"):
        assert path in paths, path
    components = schema["components"]["schemas"]
    for name in ("CompletionRequest", "CompletionResponse", "CompletionStreamResponse", "ChatCompletionRequest",
                 "ChatCompletionResponse", "ChatCompletionStreamResponse", "ModelList", "ErrorResponse"):
        assert name in components, name
    request = components["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "logprobs", "echo", "top_k", "min_p", "stream_options"} <= set(request)
    post = paths["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "429", "503"} <= set(post)
    assert "text/event-stream" in post["200"]["content"]
