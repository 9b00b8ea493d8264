"""Helpers for the integration tests: real peers (Redis, the test OP) and a scripted browser."""
