"""Quantization stages every backend shares: the float model's export (``export``), PT2E prepare/convert
(``pt2e``), QAT state (``qat``), conv-ReLU6 fusion (``relu6``), layers kept in float (``keep_float``), bias
correction (``bias_correction``) and graph checks (``graph``). Backend-specific pieces (quantizers, lowering,
the legacy eager engine) live under :mod:`mbquant.mobile`.
"""
