"""Training engines behind the ``Engine`` protocol (``engines.base``).

``torch_masked`` and ``torch_sparse`` need torch; ``ort_training`` needs onnxruntime-training; none
of them is imported by this package's ``__init__``, so the device side loads only what it uses.
"""
