"""The planner: scales a namespace's workers to keep latency within an SLA (Dynamo's load-based planner)."""
