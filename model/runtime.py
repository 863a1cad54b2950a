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
- `join_cluster`: one process of several (jax.distributed: explicit --coordinator / --num-processes /
  --process-id, MESHLM_* variables, or jax's own detection of SLURM, Open MPI and Cloud TPU slices), with
  gloo collectives between CPU processes and bounded waits (JOIN_TIMEOUT_SECS, HEARTBEAT_SECS; at exit,
  JOIN_TIMEOUT_SECS for the others).
- `launch`: N local processes of one command as the hosts of one run (what `meshlm launch` runs).
- `lost_peer_error`: after a failed collective, a roll call among the processes left names the lost ones
  (ROLL_CALL_SECS); `exit_now` ends a process without waiting for the others at jax's exit barrier.
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
    already set is kept as set), and on a machine without TPUs keeps an installed libtpu from probing for one
    (model.tpu.quiet_libtpu). Returns the flags added. Does nothing once JAX is imported."""
    if "jax" in sys.modules:
        return []
    from model.tpu import quiet_libtpu

    quiet_libtpu()  # libtpu installed on a machine without TPUs: no probing, no warnings
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


# ----------------------------------------------------------------------------- several processes

COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV = "MESHLM_COORDINATOR", "MESHLM_NUM_PROCESSES", "MESHLM_PROCESS_ID"
# Seconds a process waits for the coordinator and its peers to join, and how long a peer may stay silent
# before the others give up on it: a lost process ends the run within HEARTBEAT_SECS instead of hanging.
JOIN_TIMEOUT_SECS = int(os.environ.get("MESHLM_JOIN_TIMEOUT_SECS", "60"))
HEARTBEAT_SECS = 30


def _cluster_env_present() -> bool:
    """Whether the environment says this process is one of several that jax's cluster detection knows: a SLURM
    job step or an Open MPI run of more than one task, a multi-host Cloud TPU slice, or an explicit
    JAX_COORDINATOR_ADDRESS."""
    def more_than_one(name: str) -> bool:
        value = os.environ.get(name, "")
        return value.isdigit() and int(value) > 1

    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return (more_than_one("SLURM_NTASKS") or more_than_one("OMPI_COMM_WORLD_SIZE") or "," in tpu_hosts
            or bool(os.environ.get("JAX_COORDINATOR_ADDRESS")))


def cluster_settings(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> dict | None:
    """This process's place in a multi-process run from explicit settings or MESHLM_COORDINATOR,
    MESHLM_NUM_PROCESSES and MESHLM_PROCESS_ID: {"coordinator_address", "num_processes", "process_id"}, or None
    when none is given. A ClusterError names what does not fit (an id outside 0..N-1, a missing setting)."""
    from model.errors import ClusterError

    coordinator = coordinator or os.environ.get(COORDINATOR_ENV) or None
    values = {}
    for name, given, env in (("num_processes", num_processes, NUM_PROCESSES_ENV),
                             ("process_id", process_id, PROCESS_ID_ENV)):
        raw = given if given is not None else os.environ.get(env)
        if raw is None or raw == "":
            values[name] = None
            continue
        try:
            values[name] = int(raw)
        except (TypeError, ValueError):
            raise ClusterError(f"{name} must be an integer, got {raw!r} (--{name.replace('_', '-')} or ${env})"
                               ) from None
    given = {"coordinator": coordinator, **values}
    if all(value is None for value in given.values()):
        return None
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise ClusterError(f"a multi-process run needs --coordinator HOST:PORT, --num-processes N and --process-id I "
                           f"(or ${COORDINATOR_ENV}, ${NUM_PROCESSES_ENV}, ${PROCESS_ID_ENV}); missing: "
                           + ", ".join(missing))
    count, index = values["num_processes"], values["process_id"]
    if count < 1:
        raise ClusterError(f"num_processes must be >= 1, got {count}")
    if not 0 <= index < count:
        raise ClusterError(f"process_id {index} is not one of 0..{count - 1}: the ids of {count} processes must "
                           f"cover 0..{count - 1}, one each")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ClusterError(f"coordinator must be HOST:PORT (port 1..65535), got {coordinator!r}")
    return {"coordinator_address": coordinator, "num_processes": count, "process_id": index}


def join_cluster(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                 timeout: int | None = None) -> tuple[int, int]:
    """Join a multi-process run (jax.distributed) when explicit settings or the environment say this process is
    one of several; alone, nothing happens. On CPU the processes' collectives go over gloo. Returns (this
    process's index, the number of processes). Must run before JAX computes anything; imports JAX."""
    from model.errors import ClusterError

    timeout = JOIN_TIMEOUT_SECS if timeout is None else timeout
    settings = cluster_settings(coordinator, num_processes, process_id)
    if settings is None and not _cluster_env_present():
        return 0, 1
    import jax

    if settings is not None and settings["num_processes"] == 1:
        return 0, 1
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices' collectives (others ignore it)
    where = settings["coordinator_address"] if settings else "the cluster's coordinator"
    if settings is not None and settings["process_id"] != 0:
        # jax's client aborts the whole process (no exception) when the coordinator never answers: wait for it
        # here first, so that an unreachable coordinator is an error that names it
        _wait_for(settings["coordinator_address"], timeout)
    try:
        jax.distributed.initialize(**(settings or {}), initialization_timeout=timeout,
                                   heartbeat_timeout_seconds=HEARTBEAT_SECS, shutdown_timeout_seconds=timeout)
    except Exception as error:  # jax raises RuntimeError / XlaRuntimeError with the coordinator's status
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise ClusterError(f"could not join the multi-process run at {where} within {timeout} s: {first}") from None
    return jax.process_index(), jax.process_count()


def launch(command: list[str], processes: int, cpu_devices: int | None = None, port: int | None = None) -> int:
    """Run `command` (a meshlm command line) as `processes` processes on this machine, the hosts of one
    multi-process run: each gets --coordinator 127.0.0.1:PORT (a free port unless given), --num-processes N and
    --process-id I (and --cpu-devices); each line it prints (stdout to stdout, stderr to stderr) is prefixed
    with [I]. SIGINT and SIGTERM go to every process; when one fails, the others are ended. Returns the failed
    process's exit status (128 + signal for a signal), else 0."""
    import signal
    import socket
    import subprocess
    import threading
    import time

    if port is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    children = []
    for index in range(processes):
        argv = [*command, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                "--process-id", str(index)]
        if cpu_devices is not None:
            argv += ["--cpu-devices", str(cpu_devices)]
        children.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         bufsize=1, start_new_session=True))

    def relay(index: int, stream, out) -> None:  # a child's stdout to ours, its stderr to ours
        for line in stream:
            print(f"[{index}] {line}", end="", file=out, flush=True)

    relays = [threading.Thread(target=relay, args=(i, stream, out), daemon=True) for i, c in enumerate(children)
              for stream, out in ((c.stdout, sys.stdout), (c.stderr, sys.stderr))]
    for thread in relays:
        thread.start()

    def forward(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        running = set(range(len(children)))
        while running:
            for index in sorted(running):
                code = children[index].poll()
                if code is None:
                    continue
                running.discard(index)
                if code != 0 and status == 0:
                    status = code if code > 0 else 128 - code
                    print(f"meshlm launch: process {index} exited with {code}; ending the others", file=sys.stderr)
                    for other in running:
                        children[other].terminate()
            time.sleep(0.05)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in children:
            if child.poll() is None:
                child.kill()
        for thread in relays:
            thread.join(5)
    return status


def _wait_for(address: str, timeout: float) -> None:
    """Until `timeout` seconds pass, try to open a TCP connection to HOST:PORT; a ClusterError if none opens."""
    import socket
    import time

    from model.errors import ClusterError

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as error:
            last = error.strerror or str(error)
            time.sleep(0.5)
    raise ClusterError(f"could not join the multi-process run at {address} within {timeout:g} s: the coordinator "
                       f"(process 0) does not answer ({last}); start it, or check --coordinator")


# Seconds the processes left after a failed collective wait for each other to answer a roll call: the
# processes that do not answer are named as lost (died or killed) and the others stop. Well inside
# HEARTBEAT_SECS, after which jax's coordination service would end them with a less specific message.
ROLL_CALL_SECS = 10
_ROLL_CALL_KEY = "meshlm/roll_call/"


def quiet_native_stdout() -> None:
    """Give Python's sys.stdout a file descriptor of its own and point descriptor 1, where C++ libraries print,
    at /dev/null: gloo prints a line for every connection between CPU processes, in pieces that interleave
    with other output. stdout then carries only what the command prints (the text of `meshlm generate`);
    C++ logs and errors go to stderr as before."""
    sys.stdout.flush()
    own = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    sys.stdout = open(own, "w", buffering=1, encoding=sys.stdout.encoding, errors=sys.stdout.errors)  # noqa: SIM115


def _is_lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process went away (gloo between CPU
    processes; the coordination service's own verdict elsewhere)."""
    text = str(error)
    return type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and any(
        sign in text for sign in ("Gloo", "Connection closed by peer", "Connection reset by peer", "heartbeat",
                                  "unhealthy", "UNAVAILABLE"))


def lost_peer_error(error: BaseException, wait: float = ROLL_CALL_SECS):
    """In a multi-process run, a ClusterError naming the processes that are gone when `error` is a failed
    collective: each process left answers a roll call in the coordination service's key-value store, and
    those that do not answer within `wait` seconds are named (process 0, whose service holds the store, when
    the store itself does not answer). None when `error` is something else or every process answers."""
    import time

    import jax
    from jax._src import distributed

    from model.errors import ClusterError

    client = distributed.global_state.client
    if client is None or jax.process_count() == 1 or not _is_lost_peer(error):
        return None
    me, count = jax.process_index(), jax.process_count()
    first = str(error).strip().splitlines()[0][:200]
    try:
        client.key_value_set(f"{_ROLL_CALL_KEY}{me}", "here")
        deadline = time.monotonic() + wait
        while True:
            answered = {int(key.rsplit("/", 1)[1]) for key, _ in client.key_value_dir_get(_ROLL_CALL_KEY)}
            if len(answered) == count or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        lost = sorted(set(range(count)) - answered)
    except Exception:  # the store does not answer: process 0, which holds it, is gone
        lost = [0]
    if not lost:
        return None
    names = ", ".join(f"process {i}" + (" (the coordinator)" if i == 0 else "") for i in lost)
    return ClusterError(f"lost {names} of {count}: a collective with it failed ({first}) and it did not answer "
                        f"within {wait:g} s: it ended (see its own error) or was killed. Process {me} stops too. "
                        "Run the same command on every process to resume from the last complete checkpoint")


def exit_now(status: int) -> None:
    """End this process at once, after flushing its output: without jax.distributed's shutdown barrier, which
    waits for every process and, with one gone, ends in an abort after HEARTBEAT_SECS."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
