"""The continuous-batching engine: scheduler, KV blocks, model runner, sampler, detokeniser."""
