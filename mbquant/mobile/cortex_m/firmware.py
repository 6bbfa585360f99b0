"""The firmware hand-off: the program as a C header (``<stem>_pte.h``) that firmware compiles in.

It holds the ``.pte`` bytes as an aligned ``const uint8_t[]`` (flash), its size, the input shape and layout,
the input scale and zero point (with ``--int8-input`` the caller quantizes the image with them:
q = clamp(round(x / scale) + zero_point, -128, 127)), the planned arena size and the class labels. The
ExecuTorch runtime and CMSIS-NN sources are not part of this toolkit: see examples/mcu/ for how firmware uses it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from ...atomic import atomic_path


def _ident(stem: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", stem).upper()


def header_text(program: bytes, *, name: str, input_shape: Sequence[int], input_qparams: dict[str, Any],
                int8_input: bool, arena_bytes: int, labels: Sequence[str], cpu: str) -> str:
    p = _ident(name)
    rows = [", ".join(f"0x{b:02x}" for b in program[i:i + 16]) for i in range(0, len(program), 16)]
    labels_c = ", ".join('"' + lab.replace("\\", "\\\\").replace('"', '\\"') + '"' for lab in labels)
    n, c, h, w = input_shape
    return "\n".join([
        f"/* {name}: ExecuTorch program with CMSIS-NN INT8 kernels (cortex_m:: ops), planned for {cpu}.",
        " * Written by mbquant; load it with the ExecuTorch runtime (examples/mcu/main.cpp). */",
        f"#ifndef {p}_PTE_H", f"#define {p}_PTE_H", "", "#include <stddef.h>", "#include <stdint.h>", "",
        f"#define {p}_PTE_SIZE {len(program)}u",
        f"#define {p}_ARENA_BYTES {arena_bytes}u",
        f"#define {p}_INPUT_N {n}", f"#define {p}_INPUT_H {h}", f"#define {p}_INPUT_W {w}", f"#define {p}_INPUT_C {c}",
        f"#define {p}_INPUT_LAYOUT_NHWC 1   /* channels_last: dim order 0, 2, 3, 1 */",
        f"#define {p}_INPUT_INT8 {1 if int8_input else 0}   /* 1: the program takes int8, quantized by the caller */",
        f"#define {p}_INPUT_SCALE {input_qparams.get('scale', 0.0)!r}f",
        f"#define {p}_INPUT_ZERO_POINT {input_qparams.get('zero_point', 0)}",
        f"#define {p}_NUM_CLASSES {len(labels)}", "",
        f"static const char *const {p.lower()}_labels[{max(1, len(labels))}] = {{{labels_c or '0'}}};", "",
        f"/* 16-byte aligned: the runtime reads the flatbuffer in place (no copy to RAM) */",
        f"static const uint8_t {p.lower()}_pte[{len(program)}] __attribute__((aligned(16))) = {{",
        *(f"  {r}," for r in rows), "};", "", f"#endif  /* {p}_PTE_H */", ""])


def write_header(path: Path, program: bytes, **kwargs) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(header_text(program, **kwargs))
    return path
