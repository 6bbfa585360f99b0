"""The backends (the deployment part): ``spec`` (a row and its options), ``table`` (the one capability table),
``backend`` (the protocol every backend provides, predictors), ``pt2e`` (what the PT2E backends share),
``bundle`` (the app bundle), and one package per runtime: ``xnnpack`` (pte-xnnpack), ``torchscript`` (ts-qnnpack,
ts-x86), ``cortex_m`` (pte-cortex-m). A backend package is imported only when a run uses it."""
from .spec import BackendSpec, Option
from .table import BACKENDS, get_spec, load, register, resolve, select

__all__ = ["BACKENDS", "BackendSpec", "Option", "get_spec", "load", "register", "resolve", "select"]
