"""The workstation side (torch): models, cost tracing, ranking, the planner, fine-tuning and exporters."""
