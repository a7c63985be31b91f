"""The load generator: its plan (popularity, lengths), and its counts against the server's `/metrics` for the
same run, through `malora bench serve` (JSON and PNG out) and as a library in open loop."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients.loadgen import (
    Lengths,
    LoadSpec,
    LoadTarget,
    adapter_weights,
    build_plan,
    percentile,
    run_load,
    summarize,
)


def test_plan_follows_popularity_and_lengths():
    names = [f"a{i}" for i in range(4)]
    zipf = build_plan(LoadSpec(num_requests=2000, adapters=names, popularity="zipf", zipf_s=1.2,
                               output_len=Lengths.parse("8:16"), prompt_words=Lengths(20, 20)), "base")
    counts = Counter(p.model for p in zipf)
    assert counts["a0"] > counts["a1"] > counts["a2"] > counts["a3"] > 0
    assert abs(counts["a0"] / 2000 - 1 / sum(w for w in adapter_weights(4, "zipf", 1.2))) < 0.05
    assert {p.body["max_tokens"] for p in zipf} == set(range(8, 17))
    assert all(len(p.body["messages"][0]["content"].split()) == 20 for p in zipf)
    one = build_plan(LoadSpec(num_requests=50, adapters=names, popularity="one", endpoint="completions"), "base")
    assert {p.model for p in one} == {"a0"} and all(p.path == "/v1/completions" for p in one)
    assert {p.model for p in build_plan(LoadSpec(num_requests=20), "base")} == {"base"}
    assert build_plan(LoadSpec(seed=3), "b") == build_plan(LoadSpec(seed=3), "b")  # two servers, one load
    with pytest.raises(ValueError):
        Lengths.parse("9:3")


def test_percentile_matches_a_sorted_list():
    values = [random.Random(0).random() for _ in range(101)]
    assert percentile(values, 50) == sorted(values)[50] and percentile(values, 100) == max(values)
    assert percentile([], 50) is None


def scrape(url: str, key: str) -> dict[tuple[str, str], float]:
    """(metric, adapter) -> value, summed over the other labels, of the malora_* counters."""
    totals: Counter = Counter()
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("malora_requests_total", "malora_generation_tokens_total",
                               "malora_prompt_tokens_total"):
                totals[(sample.name, sample.labels["adapter"])] += sample.value
    return totals


def delta(after: dict, before: dict) -> dict[tuple[str, str], int]:
    return {k: int(v - before.get(k, 0)) for k, v in after.items() if v != before.get(k, 0)}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_serve_counts_equal_the_servers_metrics(malora, server, tmp_path):
    before = scrape(server.url, server.api_key)
    out, plot = tmp_path / "run.json", tmp_path / "latency.png"
    run = malora("bench", "serve", "--num-requests", "12", "--concurrency", "4", "--adapters", "alpha,beta",
                 "--popularity", "zipf", "--output-len", "3:6", "--warmup", "0", "--ignore-eos", "--no-progress",
                 "--json", str(out), "--plot", str(plot))
    assert "12/12 ok" in run.stdout and "TTFT ms" in run.stdout
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["completed"] == 12 and summary["failed"] == 0
    assert all(r["ttft"] is not None and len(r["itl"]) >= 1 for r in report["requests"])
    expected = {}
    for model, row in summary["per_model"].items():
        expected[("malora_requests_total", model)] = row["requests"]
        expected[("malora_generation_tokens_total", model)] = row["output_tokens"]
        expected[("malora_prompt_tokens_total", model)] = row["prompt_tokens"]
    assert summary["output_tokens"] == sum(r["output_tokens"] for r in report["requests"])
    assert all(3 <= r["output_tokens"] <= 6 for r in report["requests"])
    assert delta(scrape(server.url, server.api_key), before) == expected
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and plot.stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_open_loop_as_a_library(server):
    before = scrape(server.url, server.api_key)
    plan = build_plan(LoadSpec(num_requests=8, endpoint="completions", output_len=Lengths(4, 4)), server.base_model)
    target = LoadTarget(server.url + "/v1", server.api_key, extra={"ignore_eos": True})
    results = asyncio.run(run_load(plan, target, rate=20.0, stream=False))
    summary = summarize(results)
    assert (summary.completed, summary.output_tokens) == (8, 32) and summary.ttft_s["p50"] is None
    starts = [r.start for r in results]
    assert starts == sorted(starts) and starts[-1] > 0  # arrivals spread in time, in order
    assert delta(scrape(server.url, server.api_key), before) == {
        ("malora_requests_total", server.base_model): 8, ("malora_generation_tokens_total", server.base_model): 32,
        ("malora_prompt_tokens_total", server.base_model): summary.prompt_tokens}


def test_errors_are_counted_not_raised(server):
    plan = build_plan(LoadSpec(num_requests=3, adapters=["missing"]), "base")
    results = asyncio.run(run_load(plan, LoadTarget(server.url, server.api_key), concurrency=2))
    assert summarize(results).errors == {"404 model_not_found": 3}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_serve_compares_dtypes_side_by_side(malora, tmp_path):
    """`--compare-dtype`: this server started twice (bfloat16 with int8 products, then float32 through transformers'
    forward), the same load on each, their ratios."""
    out = tmp_path / "compare.json"
    run = malora("bench", "serve", "--dtype", "bfloat16", "--quantization", "int8", "--compare-dtype", "float32",
                 "--compare-server-args", "--fast-decode false", "--num-requests", "4", "--concurrency", "2",
                 "--output-len", "6", "--ignore-eos", "--warmup", "1", "--no-progress", "--json", str(out))
    report = json.loads(out.read_text())
    ours, theirs = "malora-bfloat16 --quantization int8", "malora-float32 --fast-decode false"
    assert list(report["servers"]) == [ours, theirs]
    assert all(s["completed"] == 4 and s["output_tokens"] == 24 for s in report["servers"].values())
    ratios = report["comparisons"][theirs]
    assert ratios["output_throughput"] > 0 and ratios["itl_p50"] > 0
    assert f"{ours} / {theirs}: output throughput" in run.stdout


def test_bench_serve_refuses_a_llama_server_that_is_not_executable(malora, tmp_path):
    missing = tmp_path / "llama-server"
    result = malora("bench", "serve", "--compare-llama-cpp", str(missing), "--num-requests", "1", check=False)
    assert result.returncode != 0 and "not an executable file" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_serve_measures_response_format_against_free_output(malora, tmp_path):
    out = tmp_path / "rf.json"
    run = malora("bench", "serve", "--response-format", "json", "--num-requests", "4", "--concurrency", "2",
                 "--output-len", "80", "--warmup", "0", "--no-progress", "--json", str(out))
    report = json.loads(out.read_text())
    assert report["summary"]["completed"] == 4 and report["constrained"]["summary"]["completed"] == 4
    assert report["constrained"]["throughput_ratio"] > 0
    assert "output throughput with response_format / without" in run.stdout
