"""The one compiled part of mbquant: the histogram observers' count (``mbquant/calibrate/_count.c``), plain C with
OpenMP (it runs on torch's own OpenMP threads; see the source), no torch headers. Everything else is in
pyproject.toml."""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "mbquant.calibrate._count",
    sources=["mbquant/calibrate/_count.c"],
    # no fused multiply-add may merge the float32 steps the count reproduces (torch.histc's rounding)
    extra_compile_args=["-O3", "-ffp-contract=off", "-fopenmp", "-Wall", "-Wextra"],
    extra_link_args=["-fopenmp"],
)])
