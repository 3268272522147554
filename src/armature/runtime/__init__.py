"""The distributed runtime: discovery, request plane, event plane, status, shutdown."""
