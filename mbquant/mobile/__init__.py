"""The backends (the deployment part): ``table`` (the one capability table), ``backend`` (the protocol every
backend provides, predictors, artifact names), and one package per runtime: ``xnnpack`` (pte-xnnpack) and
``torchscript`` (ts-qnnpack, ts-x86). A backend package is imported only when a run uses it."""
from .table import BACKENDS, BackendSpec, get_spec, load, resolve, select

__all__ = ["BACKENDS", "BackendSpec", "get_spec", "load", "resolve", "select"]
