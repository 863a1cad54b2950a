"""model/runtime.py: process settings made before JAX starts. Each case runs in a fresh interpreter,
since the settings only act before JAX is imported (and this test process has imported it)."""

import json
import os
import subprocess
import sys

import pytest

from model.runtime import CPU_FLAGS, find_tcmalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LD_PRELOAD", "MESHLM_ALLOCATOR",
                                                                 "MESHLM_ALLOCATOR_PRELOADED")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**full_env, **env}, capture_output=True,
                          text=True, timeout=120)


def test_importing_runtime_does_not_import_jax():
    out = _run("import sys, model.runtime; print('jax' in sys.modules)")
    assert out.stdout.strip() == "False", out.stderr


def test_set_xla_flags_replaces_the_device_count_and_keeps_user_flags():
    out = _run("import os\nfrom model.runtime import set_xla_flags\nset_xla_flags(cpu_devices=4)\n"
               "print(os.environ['XLA_FLAGS'])",
               XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type=dot")
    flags = out.stdout.split()
    assert "--xla_force_host_platform_device_count=4" in flags
    assert not any(f.endswith("count=2") for f in flags)
    assert "--xla_cpu_experimental_ynn_fusion_type=dot" in flags  # the user's own setting wins
    assert sum(f.startswith("--xla_cpu_experimental_ynn_fusion_type") for f in flags) == 1


def test_cpu_flags_are_accepted_by_the_installed_xla():
    """XLA aborts on a flag it does not know: the flags set for this jaxlib must start JAX."""
    code = ("import os\nfrom model.runtime import set_xla_flags\nadded = set_xla_flags(cpu_devices=2)\n"
            "import jax\nprint(jax.device_count(), float(jax.numpy.ones(3).sum()), *added)")
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == ["2", "3.0"]
    from model.runtime import CPU_FLAGS_JAXLIB, _jaxlib_version

    if _jaxlib_version().startswith(CPU_FLAGS_JAXLIB):
        assert set(CPU_FLAGS) <= set(out.stdout.split())


def test_allocator_system_and_a_missing_library():
    code = "from model.runtime import preload_allocator\nprint(preload_allocator())"
    assert _run(code, MESHLM_ALLOCATOR="system").stdout.strip() == "None"
    missing = _run(code, MESHLM_ALLOCATOR="/nonexistent/libfoo.so")
    assert missing.returncode != 0 and "MESHLM_ALLOCATOR='/nonexistent/libfoo.so': no such file" in missing.stderr


@pytest.mark.skipif(find_tcmalloc() is None, reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
def test_allocator_reexecutes_once_with_tcmalloc_preloaded():
    code = ("import json, os, sys\nfrom model.runtime import preload_allocator\nlib = preload_allocator()\n"
            "maps = open('/proc/self/maps').read()\n"
            "print(json.dumps({'lib': lib, 'mapped': 'tcmalloc' in maps, 'argv': sys.argv[1:]}))")
    out = _run(code + "\n", MESHLM_ALLOCATOR="auto")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["lib"] == find_tcmalloc() and result["mapped"]


CACHE_VARS = ("JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
              "XDG_CACHE_HOME")
COMPILE_AND_LIST = ("import os, sys\nfrom model.runtime import set_compile_cache\n"
                    "found = set_compile_cache(*eval(sys.argv[1]))\nimport jax\n"
                    "jax.jit(lambda x: jax.numpy.sin(x) @ x.T)(jax.numpy.ones((64, 64))).block_until_ready()\n"
                    "print(found, jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)")


def _compile(args: str, **env: str) -> subprocess.CompletedProcess:
    """A fresh interpreter that sets the cache with set_compile_cache(*args), then compiles one program."""
    full_env = {k: v for k, v in os.environ.items() if k not in (*CACHE_VARS, "XLA_FLAGS")}
    return subprocess.run([sys.executable, "-c", COMPILE_AND_LIST, args], cwd=ROOT,
                          env={**full_env, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **env},
                          capture_output=True, text=True, timeout=120)


def test_compile_cache_is_per_user_by_default_and_overridable(tmp_path):
    """Default: $XDG_CACHE_HOME/meshlm/jax; $JAX_COMPILATION_CACHE_DIR wins over it, a directory given wins over
    both; enabled=False keeps nothing even with $JAX_COMPILATION_CACHE_DIR set. A compiled program lands there."""
    xdg, env_dir, given = tmp_path / "xdg", tmp_path / "env", tmp_path / "given"
    default = _compile("()", XDG_CACHE_HOME=str(xdg))
    assert default.returncode == 0, default.stderr
    assert default.stdout.split() == [str(xdg / "meshlm" / "jax"), "True", str(xdg / "meshlm" / "jax")]
    assert os.listdir(xdg / "meshlm" / "jax")  # the program was written
    from_env = _compile("()", XDG_CACHE_HOME=str(xdg), JAX_COMPILATION_CACHE_DIR=str(env_dir))
    assert from_env.stdout.split()[0] == str(env_dir) and os.listdir(env_dir)
    explicit = _compile(f"({str(given)!r},)", JAX_COMPILATION_CACHE_DIR=str(env_dir))
    assert explicit.stdout.split()[0] == str(given) and os.listdir(given)
    off = _compile("(None, False)", XDG_CACHE_HOME=str(tmp_path / "unused"), JAX_COMPILATION_CACHE_DIR=str(env_dir))
    assert off.returncode == 0, off.stderr
    assert off.stdout.split()[:2] == ["None", "False"]
    assert not (tmp_path / "unused").exists()


def test_compile_cache_after_jax_is_imported(tmp_path):
    """Called once JAX is imported (before the first compile), it sets JAX's config instead."""
    late = str(tmp_path / "late")
    code = (f"import jax\nfrom model.runtime import set_compile_cache\nfound = set_compile_cache({late!r})\n"
            "jax.jit(lambda x: x * 2 + 1)(jax.numpy.ones(8)).block_until_ready()\n"
            "print(found == jax.config.jax_compilation_cache_dir)")
    out = _run(code, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "True" and os.listdir(tmp_path / "late")
