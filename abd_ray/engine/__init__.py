"""Training engines: teachers (train, cache, load) and the distillation loop."""
