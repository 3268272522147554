"""Event planes: topic publish/subscribe between processes (zmq, nats)."""
