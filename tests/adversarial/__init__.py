"""Adversarial tests: a provider that lies, and the gateway that must not believe it."""
