"""Training engines behind the ``Engine`` protocol (``engines.base``).

``torch_masked`` and ``torch_sparse`` need torch; ``ort_training`` needs onnxruntime-training
(x86_64); ``portable`` needs plain onnxruntime (any platform). None of them is imported by this
package's ``__init__``, so the device side loads only what it uses.
"""
