"""Model runtime: config, weights, layers, KV cache, sampler, generator (torch reference path)."""
