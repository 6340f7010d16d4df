"""Exporters (workstation: torch and onnx): a plan -> an artifact the device runner trains.

- ``forward``: the eval-mode forward ONNX graph both formats start from (BatchNorm folded, pads
  merged into convs);
- ``ort_training``: format ``ort-training``, an ONNX Runtime training artifact (onnxruntime-training,
  x86_64 only) with per-layer gradient masks;
- ``artifact``: ``export_plan``, the driver ``edge-trady export`` runs (manifest, hashes, atomic
  folder).
"""
