"""Floor 3: vLLM glue — linear and MoE methods, weight creation, loading and post-processing."""
