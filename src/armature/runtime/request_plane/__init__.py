"""Request planes: streaming request/response between processes (tcp, nats)."""
