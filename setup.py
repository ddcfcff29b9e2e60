"""Build bnfast's C kernels (src_c/) through one Cython module.

OpenMP is detected by compiling and running a tiny program, as scikit-learn
does; where the compiler has none the build warns and goes serial from the same
source.

Environment variables (1, true, yes or on):
  BNFAST_NO_OPENMP  build the serial kernels even where OpenMP is available.
  BNFAST_DEBUG      compile the C kernels and the Cython bridge with -O0 -g
                    (unoptimised, with debug symbols: for gdb and readable
                    sanitizer reports) instead of -O3, and turn Cython's
                    boundscheck, wraparound and initializedcheck on. The bridge
                    indexes no Python-level arrays today, so those checks guard
                    only code added to it later; the kernels' own arguments are
                    checked in the bridge's `buffer` in every build.
  BNFAST_SANITIZE   compile and link with AddressSanitizer and
                    UndefinedBehaviorSanitizer (-fsanitize=address,undefined
                    -fno-sanitize-recover=undefined -fno-omit-frame-pointer,
                    -O1 -g (-O0 with BNFAST_DEBUG), and -fno-wrapv so that
                    signed overflow is checked too). The module then only loads in a process that
                    starts with the compiler's libasan, e.g.
                    LD_PRELOAD=$(gcc -print-file-name=libasan.so); .ci/sanitizers
                    builds it this way and runs the kernel tests under it.

Cython's directives are set here and nowhere else (_kernels.pyx has no
`# cython:` line, which would override them).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import warnings

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

OPENMP_PROBE = textwrap.dedent("""
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d", n > 0);
        return 0;
    }
""")


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _compiler():
    return os.environ.get("CC") or sysconfig.get_config_var("CC").split()[0] or "cc"


HELLO_PROBE = '#include <stdio.h>\nint main(void){printf("1");return 0;}'

# Every function and loop starts on a 64-byte line, so that where a hot loop
# falls among the CPU's 64-byte fetch and op-cache windows does not depend on
# the code before it. Without them, a change to one streaming walk moved the
# unchanged channels-first inference loop and made it 1.12-1.31x slower on a
# Zen 3 EPYC (float32 (64, 128, 100) and (8, 64, 56, 56), in cache); with them
# the two builds ran within 0.96-1.04 of each other (docs/performance-notes.md,
# thirteenth pass).
ALIGN_FLAGS = ["-falign-functions=64", "-falign-loops=64"]


def _compiles_and_runs(source, flags):
    """True if `source` builds with `flags` and prints 1."""
    tmp = tempfile.mkdtemp(prefix="bnfast-probe-")
    try:
        src = os.path.join(tmp, "probe.c")
        exe = os.path.join(tmp, "probe")
        with open(src, "w") as f:
            f.write(source)
        subprocess.run([_compiler(), src, "-o", exe, *flags], check=True,
                       capture_output=True, timeout=120)
        out = subprocess.run([exe], check=True, capture_output=True, timeout=60)
        return out.stdout.strip() == b"1"
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def openmp_flags():
    """Compile/link flags for OpenMP, or None for a serial build."""
    if _env_flag("BNFAST_NO_OPENMP"):
        print("bnfast: BNFAST_NO_OPENMP is set, building the serial kernels", file=sys.stderr)
        return None
    if _compiles_and_runs(OPENMP_PROBE, ["-fopenmp"]):
        return ["-fopenmp"]
    warnings.warn(
        "\n\n*** bnfast: this compiler cannot build OpenMP programs; building the SERIAL "
        "kernels (one thread). Install an OpenMP runtime (e.g. libgomp, or libomp with "
        "clang) and reinstall for parallel kernels. ***\n",
        stacklevel=1,
    )
    return None


def extensions():
    debug = _env_flag("BNFAST_DEBUG")
    omp = openmp_flags()
    # -fno-math-errno: sqrt need not set errno (nothing reads it), so the
    # per-channel loops that take 1 / sqrt(var + eps) vectorise; every result
    # is IEEE's as before (unlike -Ofast's -ffast-math, which would drop NaN checks)
    compile_args = (["-O0", "-g"] if debug else ["-O3"]) + ["-fno-math-errno"]
    if not debug and _compiles_and_runs(HELLO_PROBE, ALIGN_FLAGS):
        compile_args += ALIGN_FLAGS
    link_args = []
    if _env_flag("BNFAST_SANITIZE"):
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                    "-fno-omit-frame-pointer"]
        # -fno-wrapv undoes Python's -fwrapv, under which signed overflow is
        # defined and UBSan would not check the kernels' index arithmetic
        compile_args = (["-O0"] if debug else ["-O1"]) + ["-g", "-fno-wrapv"] + sanitize
        link_args += sanitize
    if omp:
        compile_args += omp
        link_args += omp
    elif _compiles_and_runs(HELLO_PROBE, ["-fopenmp-simd"]):
        compile_args.append("-fopenmp-simd")   # keep `omp simd` vectorisation when serial
    ext = Extension(
        "bnfast._kernels",
        sources=["bnfast/_kernels.pyx", "src_c/bn.c", "src_c/bn_kernels_baseline.c",
                 "src_c/bn_kernels_avx2.c", "src_c/bn_kernels_avx512.c"],
        include_dirs=["src_c", numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        depends=["src_c/bn.h", "src_c/bn_internal.h", "src_c/bn_kernels.tmpl.c",
                 "bnfast/_common_case.pxi"],
    )
    directives = {   # the only place they are set (see the module docstring)
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": debug,
        "cdivision": True,
        "initializedcheck": debug,
    }
    return cythonize([ext], compiler_directives=directives)


setup(ext_modules=extensions())
