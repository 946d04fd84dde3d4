"""The runtime: scheduler, paged KV blocks, sampler, engine, expert parallelism, Ray actors."""
