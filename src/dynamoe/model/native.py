"""The native decode kernel (csrc/): built once per machine, checked once per process, used only where it is right.

Batch-1 decoding is matrix-vector products whose speed is how fast the weights stream from memory, plus a
fixed cost per kernel call. The kernel stores a weight in panels of 16 output columns ([panels, rows, 16],
each panel one contiguous stream; from 2 MiB up on huge pages), in fp32 or in int8 with one fp32 scale per
column. Its ops: a product with such weights (any number of rows), the selected experts of each token in
one call, and a transformer block's decode step in two; its class Decoder runs a model's whole decode step
in one call (both: dynamoe.model.fused).

It is compiled with torch's extension builder on first use (a C++ compiler is needed, and ninja, which is a
dependency; about a minute) and cached under ~/.cache/dynamoe (or $DYNAMOE_CACHE). Its instruction set is
chosen at run time (AVX-512 with BW, AVX2+FMA, or plain C++), so one build serves any x86-64 CPU. Where it cannot be
built or loaded, or computes a wrong answer on a small check, `native_available()` says False once per
process (with one logged warning) and every caller keeps torch's kernels. DYNAMOE_NATIVE=0 turns it off;
DYNAMOE_NATIVE_ISA (avx512, avx2 or scalar) caps its instruction set.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "decode.cpp"  # with kernels.h beside it
ENABLE_ENV, ISA_ENV, CACHE_ENV = "DYNAMOE_NATIVE", "DYNAMOE_NATIVE_ISA", "DYNAMOE_CACHE"
ISA_LEVELS = ("scalar", "avx2", "avx512")  # the kernel's levels, in the order of its select_isa numbers
PANEL = 16  # output columns per panel, as in decode.cpp
HUGE_PAGE = 2 << 20  # bytes; smaller panels stay on torch's allocator

NATIVE_STATE: dict[str, bool] = {}  # "available": native_available's answer, once per process


def native_available() -> bool:
    """Whether the native kernel is built, loaded and checked on this machine (decided once per process)."""
    if "available" not in NATIVE_STATE:
        NATIVE_STATE["available"] = _load_and_check()
    return NATIVE_STATE["available"]


def native_isa() -> str:
    """The instruction set the native kernel runs on (call only where native_available())."""
    return ISA_LEVELS[torch.ops.dynamoe.select_isa(ISA_LEVELS.index(isa_cap()))]


@contextmanager
def refused() -> Iterator[None]:
    """Inside the block the kernel counts as unavailable: models packed there use torch's kernels (a reference)."""
    previous = NATIVE_STATE.get("available")
    NATIVE_STATE["available"] = False
    try:
        yield
    finally:
        if previous is None:
            del NATIVE_STATE["available"]
        else:
            NATIVE_STATE["available"] = previous


def isa_cap() -> str:
    """The most the kernel may use: DYNAMOE_NATIVE_ISA, or the best level."""
    cap = os.environ.get(ISA_ENV, ISA_LEVELS[-1]).lower()
    return cap if cap in ISA_LEVELS else ISA_LEVELS[-1]


def _load_and_check() -> bool:
    """Build (first use on this machine) and load the kernel, then check it on a small problem; False on any failure."""
    if os.environ.get(ENABLE_ENV, "1") == "0":
        return False
    try:
        if not kernel_loaded():
            build_and_load(SOURCE)
        native_isa()  # applies DYNAMOE_NATIVE_ISA
        if not _computes_right():
            logger.warning("the native decode kernel gave a wrong answer on this machine; decoding uses torch's kernels")
            return False
    except Exception as error:  # a missing compiler, a failed build or load: all mean "use torch's kernels"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        logger.warning("the native decode kernel is unavailable (%s); decoding uses torch's kernels", first_line)
        return False
    return True


def kernel_loaded() -> bool:
    """Whether the kernel's ops are in this process already."""
    return hasattr(torch.ops.dynamoe, "moe_decode")


def build_and_load(source: Path) -> None:
    """Compile the kernel into a cache folder named by its sources and torch version (reused afterwards), then load it."""
    from torch.utils.cpp_extension import load

    sources = b"".join(file.read_bytes() for file in sorted(source.parent.iterdir()) if file.is_file())
    digest = hashlib.sha256(sources + torch.__version__.encode() + sys.version.encode()).hexdigest()[:16]
    folder = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "dynamoe")) / f"native-{digest}"
    if not (folder / f"dynamoe_decode_{digest}.so").exists():
        logger.warning("building dynamoe's native decode kernel for this machine (once, about a minute)")
    folder.mkdir(parents=True, exist_ok=True)
    with ninja_on_path():
        load(name=f"dynamoe_decode_{digest}", sources=[str(source)], extra_cflags=["-O3", "-fopenmp"],
             extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False, verbose=False)


@contextmanager
def ninja_on_path() -> Iterator[None]:
    """torch's builder runs `ninja` from PATH; the ninja package (a dependency) puts one in the environment's bin
    folder, which is not on PATH when Python runs without activating the environment."""
    path = os.environ.get("PATH", "")
    try:
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
    except ImportError:  # a system ninja, if any, is what torch will find
        pass
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _computes_right() -> bool:
    """The kernel's products on a small random problem, fp32 and int8, against torch's (odd sizes: padding is used; int8
    products round x to int16, hence their wider tolerance)."""
    generator = torch.Generator().manual_seed(0)
    x_1D, w_DO = torch.randn(1, 40, generator=generator), torch.randn(40, 37, generator=generator)
    q_DO, scale_O = quantize_columns(w_DO)
    fp32 = torch.ops.dynamoe.linear(x_1D, to_panels(w_DO), None, None, None, 37)
    int8 = torch.ops.dynamoe.linear(x_1D, to_panels(q_DO), pad_columns(scale_O), None, None, 37)
    return (torch.allclose(fp32, x_1D @ w_DO, rtol=1e-4, atol=1e-4)
            and torch.allclose(int8, x_1D @ (q_DO * scale_O), rtol=1e-4, atol=1e-3))


def last_level_cache_bytes() -> int:
    """The largest CPU cache of this machine in bytes, from Linux's sysfs (32 MiB where it is not known): weights
    beyond it are not in the cache when the next decode step reads them again. sysconf's figure is not used: inside
    virtual machines it reports the host's, ten times what the guest gets here."""
    units, sizes = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}, []
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip()
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes, default=32 << 20)


def pad_columns(t_O: torch.Tensor) -> torch.Tensor:
    """The last dimension zero-padded to a whole number of panels."""
    return torch.nn.functional.pad(t_O, (0, -t_O.shape[-1] % PANEL)).contiguous()


def to_panels(w_DO: torch.Tensor) -> torch.Tensor:
    """[..., D, O] input-major weights as [..., ceil(O / 16), D, 16] panels, the last one zero-padded, int8 ones with
    their rows interleaved in pairs (see interleave_row_pairs); from 2 MiB up on huge pages (see empty_on_huge_pages
    in decode.cpp)."""
    panels = pad_columns(w_DO).unflatten(-1, (-1, PANEL)).transpose(-3, -2)
    if panels.dtype == torch.int8:
        panels = interleave_row_pairs(panels)
    if panels.numel() * panels.element_size() < HUGE_PAGE:
        return panels.contiguous()
    return torch.ops.dynamoe.empty_on_huge_pages(list(panels.shape), panels.dtype).copy_(panels)


def interleave_row_pairs(panels: torch.Tensor) -> torch.Tensor:
    """[..., D, 16] panels with rows 2p and 2p + 1 of each column side by side ([..., D // 2, 16, 2] in memory, then
    an odd last row as it was), the order in which the kernel's int8 products take two rows per instruction."""
    even = panels.shape[-2] // 2 * 2
    pairs = panels[..., :even, :].unflatten(-2, (-1, 2)).transpose(-2, -1).flatten(-3, -1)
    return torch.cat([pairs.unflatten(-1, (even, PANEL)), panels[..., even:, :]], dim=-2)


def quantize_columns(w_DO: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output column of [..., D, O] weights: q (int8) and scale [..., O] with w ~ q * scale."""
    scale_O = w_DO.abs().amax(dim=-2) / 127
    scale_O = torch.where(scale_O > 0, scale_O, torch.ones_like(scale_O))  # an all-zero column: any scale, q = 0
    q_DO = torch.round(w_DO / scale_O.unsqueeze(-2)).clamp(-127, 127).to(torch.int8)
    return q_DO, scale_O
