"""Process settings that must be made before JAX starts: XLA reads its flags once, and the C
library's allocator is chosen when the process starts. Nothing here imports JAX.

- `set_xla_flags`: simulated CPU devices, and XLA:CPU flags measured to speed up training here
  (docs/BENCHMARKS.md). Only `xla_cpu_*` flags: a GPU or TPU backend ignores them.
- `preload_allocator`: re-executes the process once with tcmalloc preloaded, when it is installed
  (Debian: `apt-get install libtcmalloc-minimal4`). XLA:CPU allocates a step's temporaries afresh
  every step; glibc returns such large blocks to the kernel on free, so every step page-faults
  them in again (a quarter of a CPU training step here). tcmalloc keeps them mapped.
  `MESHLM_ALLOCATOR=system` turns this off; `MESHLM_ALLOCATOR=/path/lib.so` picks a library.
- `set_compile_cache`: JAX's persistent compilation cache, so that a program compiled once (a train
  step, a server's decode step for each length bucket) is read from disk by the next process instead
  of compiled again. Per user by default ($XDG_CACHE_HOME/meshlm/jax), or $JAX_COMPILATION_CACHE_DIR.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import sys

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# YNNPACK for dots and reductions, not for elementwise fusions: those XLA's own emitter does
# better here, and a transposing elementwise fusion inside YNNPACK was the slowest op of a step.
CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot,reduce",)
# XLA aborts on a flag it does not know, and experimental flags come and go: CPU_FLAGS are set only
# with the jaxlib versions they were checked with.
CPU_FLAGS_JAXLIB = ("0.10.",)
# JAX's persistent compilation cache: the variables JAX reads when it is imported (and processes started
# from this one inherit)
CACHE_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
CACHE_ENABLED_ENV = "JAX_ENABLE_COMPILATION_CACHE"
CACHE_MIN_SECS_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
# JAX's default keeps only programs that took a second or more to compile; a server's smaller programs
# (a short prefill, sampling) would then be compiled on every start. Reading an entry takes milliseconds.
CACHE_MIN_COMPILE_SECS = 0.1
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = ("/usr/lib/*-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


def set_xla_flags(cpu_devices: int | None = None, cpu_tuning: bool = True) -> list[str]:
    """Add to XLA_FLAGS: `cpu_devices` simulated CPU devices (replacing an earlier count) and, when
    `cpu_tuning` and the installed jaxlib is one they were checked with, CPU_FLAGS (a flag the user
    already set is kept as set). Returns the flags added. Does nothing once JAX is imported."""
    if "jax" in sys.modules:
        return []
    flags = os.environ.get("XLA_FLAGS", "").split()
    added = []
    if cpu_devices:
        flags = [f for f in flags if not f.startswith(DEVICE_COUNT_FLAG)]
        added.append(f"{DEVICE_COUNT_FLAG}={cpu_devices}")
    if cpu_tuning and _jaxlib_version().startswith(CPU_FLAGS_JAXLIB):
        present = {f.split("=")[0] for f in flags}
        added += [f for f in CPU_FLAGS if f.split("=")[0] not in present]
    os.environ["XLA_FLAGS"] = " ".join([*flags, *added])
    return added


def find_tcmalloc() -> str | None:
    """The path of an installed tcmalloc shared library, or None."""
    for directory in LIBRARY_DIRS:
        for name in TCMALLOC_NAMES:
            found = sorted(glob.glob(os.path.join(directory, name)))
            if found:
                return found[0]
    return None


def preload_allocator() -> str | None:
    """Re-execute this process (same interpreter, same arguments) with tcmalloc in LD_PRELOAD, once.

    Returns the preloaded library when it is already in place, None when nothing is preloaded
    (not Linux, MESHLM_ALLOCATOR=system, JAX already imported, or no tcmalloc installed); when it
    re-executes, it does not return."""
    choice = os.environ.get("MESHLM_ALLOCATOR", "auto")
    preloaded = os.environ.get("LD_PRELOAD", "")
    if os.environ.get("MESHLM_ALLOCATOR_PRELOADED"):
        return os.environ["MESHLM_ALLOCATOR_PRELOADED"]
    if choice == "system" or not sys.platform.startswith("linux") or "jax" in sys.modules:
        return None
    if any(name in preloaded for name in ("tcmalloc", "jemalloc", "mimalloc")):
        return preloaded
    library = find_tcmalloc() if choice == "auto" else choice
    if library is None:
        return None
    if not os.path.exists(library):
        raise FileNotFoundError(f"MESHLM_ALLOCATOR={library!r}: no such file; give a shared library's path, "
                                "'auto' (tcmalloc when installed) or 'system'")
    env = dict(os.environ, LD_PRELOAD=" ".join(filter(None, [library, preloaded])),
               MESHLM_ALLOCATOR_PRELOADED=library)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    return library  # not reached


def default_compile_cache_dir() -> str:
    """The per-user directory of compiled programs: $XDG_CACHE_HOME/meshlm/jax, else ~/.cache/meshlm/jax."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "meshlm", "jax")


def set_compile_cache(directory: str | None = None, enabled: bool = True) -> str | None:
    """Keep compiled programs in JAX's persistent compilation cache: in `directory`, else in
    $JAX_COMPILATION_CACHE_DIR when set (the tests set one per session), else in default_compile_cache_dir().
    `enabled=False` turns the cache off, even where $JAX_COMPILATION_CACHE_DIR is set. Programs that compile
    in under CACHE_MIN_COMPILE_SECS are not kept (unless $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says
    otherwise). Must run before the first compile: before JAX is imported it sets the environment variables
    JAX reads at import, after that JAX's config. Returns the directory in use, None when off."""
    if not enabled:
        settings: dict[str, str] = {CACHE_ENABLED_ENV: "false"}
        found = None
    else:
        found = os.path.abspath(os.path.expanduser(directory or os.environ.get(CACHE_DIR_ENV)
                                                   or default_compile_cache_dir()))
        settings = {CACHE_ENABLED_ENV: "true", CACHE_DIR_ENV: found,
                    CACHE_MIN_SECS_ENV: os.environ.get(CACHE_MIN_SECS_ENV, str(CACHE_MIN_COMPILE_SECS))}
    os.environ.update(settings)
    if "jax" in sys.modules:
        import jax

        jax.config.update("jax_enable_compilation_cache", enabled)
        if found is not None:
            jax.config.update("jax_compilation_cache_dir", found)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", float(settings[CACHE_MIN_SECS_ENV]))
    return found
