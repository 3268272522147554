"""Routers: pick the worker instance for each request (push: rr/random/direct; kv later)."""
