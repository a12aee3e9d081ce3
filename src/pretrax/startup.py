"""Time to the first step: where a run's start-up goes, and the compilation cache that cuts it.

A job pays its start-up every time it starts, and a preempted job restarts many times. The phases,
in the order a run meets them (each measured from the end of the one before):

  imports      the interpreter, absl's flags, pretrax and JAX imported (from the process's start)
  backend      JAX's backend up (and jax.distributed joined): the devices are known
  data         the tokenizer and the token store found or built, the input pipeline opened
  state        the model and optimizer built abstractly, then initialised or restored on device
  compile      waiting for the train step to compile, which started on a thread of its own as
               soon as the abstract state was known (so it overlaps state and data); its own
               duration is `step_compile_s`
  first_step   the first step run to its metrics on the host (the first execution pays for
               allocations and anything a backend builds lazily)

`pretrax train` logs them in one line after the first step and writes them to metrics.jsonl as
`startup_<phase>_s` (and `startup_s`, their sum, and `startup_step_compile_s`);
benchmarks/throughput.py records the same.

JAX's persistent compilation cache (`compile_cache`, on by default) keeps every compiled program
on disk under a key of the program and the backend, so that a restarted run (or any run of the same
shapes) loads its executables instead of compiling them again; XLA's GPU autotuning results are
kept beside them.
"""

import collections
import dataclasses
import importlib.util
import os
import time

import jax
from jax.experimental.compilation_cache import compilation_cache

PHASES = ('imports', 'backend', 'data', 'state', 'compile', 'first_step')

# Programs compiled in at least this many seconds go into the cache. JAX's default (1 s) leaves
# out a small model's steps on CPU; anything faster than this costs more to look up than to build.
CACHE_MIN_COMPILE_S = 0.2
# The user cache directory's cap; JAX evicts the least recently used programs past it.
CACHE_MAX_BYTES = 8 * 2**30


# Programs loaded from the cache and compiled afresh, counted from JAX's events since the process
# started (the listener is the only way JAX reports them).
_CACHE_EVENTS = {
  '/jax/compilation_cache/cache_hits': 'loaded',
  '/jax/compilation_cache/cache_misses': 'compiled',
}
_cache_counts: collections.Counter[str] = collections.Counter()


def _count_cache_event(event: str, **kwargs) -> None:
  del kwargs
  if event in _CACHE_EVENTS:
    _cache_counts[_CACHE_EVENTS[event]] += 1


jax.monitoring.register_event_listener(_count_cache_event)


def _seconds_since_process_start() -> float | None:
  """Seconds since this process started, from Linux's /proc (10 ms resolution); None elsewhere."""
  try:
    with open('/proc/self/stat') as f:
      # Field 22 (starttime, clock ticks after boot) follows the command name, which is in
      # parentheses and may itself hold spaces: split after its closing one.
      fields = f.read().rsplit(')', 1)[1].split()
    started = int(fields[19]) / os.sysconf('SC_CLK_TCK')
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started
  except (OSError, ValueError, IndexError, AttributeError):
    return None


@dataclasses.dataclass
class StartupClock:
  """Seconds of each start-up phase, each marked as it ends."""

  last: float  # time.perf_counter() at the last mark.
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)
  # The cache's counts when the clock started: the run's own are the difference.
  cache_counts_at_start: collections.Counter[str] = dataclasses.field(
    default_factory=lambda: collections.Counter(_cache_counts)
  )
  cache_directory: str | None = None  # Where compiled programs are kept; None: no cache.
  # Seconds the train step took to compile, on its own thread beside the state and data phases
  # (pretrax.step_compile.start_compiling): the 'compile' phase is what remained of it after them.
  step_compile_s: float = 0.0

  @classmethod
  def from_process_start(cls) -> 'StartupClock':
    """A clock whose first mark ('imports') counts from the process's start (from now where the
    platform does not say when that was)."""
    return cls(last=time.perf_counter() - (_seconds_since_process_start() or 0.0))

  @classmethod
  def from_now(cls) -> 'StartupClock':
    """A clock for a run started inside a longer process (a test, a sweep): no imports or
    backend phase, which that process paid once."""
    return cls(last=time.perf_counter())

  def mark(self, phase: str) -> float:
    """Ends `phase` now; returns its seconds."""
    assert phase in PHASES, phase
    now = time.perf_counter()
    self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
    self.last = now
    return self.seconds[phase]

  def skip(self) -> None:
    """Leaves the time since the last mark out of every phase (work that is not the run's)."""
    self.last = time.perf_counter()

  @property
  def total(self) -> float:
    return sum(self.seconds.values())

  def cache_counts(self) -> dict[str, int]:
    """Programs this run loaded from the compilation cache and compiled afresh, so far."""
    return {k: _cache_counts[k] - self.cache_counts_at_start[k] for k in _CACHE_EVENTS.values()}

  def record(self) -> dict[str, float]:
    """The metrics.jsonl fields: startup_s and startup_<phase>_s for each phase marked, and
    the cache's counts (startup_programs_loaded, startup_programs_compiled)."""
    counts = {f'startup_programs_{k}': v for k, v in self.cache_counts().items()}
    phases = {f'startup_{k}_s': v for k, v in self.seconds.items()}
    return {
      'startup_s': self.total,
      **phases,
      'startup_step_compile_s': self.step_compile_s,
      **counts,
    }

  def line(self) -> str:
    parts = ', '.join(f'{k.replace("_", " ")} {v:.1f}' for k, v in self.seconds.items())
    counts = self.cache_counts()
    cache = (
      f'compilation cache {self.cache_directory}: {counts["loaded"]} program(s) loaded, '
      f'{counts["compiled"]} compiled'
      if self.cache_directory
      else 'no compilation cache'
    )
    return (
      f'start-up: {self.total:.1f} s to the first step ({parts}; the step compiled in '
      f'{self.step_compile_s:.1f} s beside state and data); {cache}'
    )


def cache_directory(setting: str, workdir: str) -> str | None:
  """Where `compile_cache` keeps compiled programs: 'auto' (JAX_COMPILATION_CACHE_DIR if set,
  else $PRETRAX_CACHE_DIR/xla, else ~/.cache/pretrax/xla), 'workdir' (WORKDIR/xla_cache: survives
  a move to another machine with the run), 'none' (off), or a directory."""
  if setting == 'none':
    return None
  if setting == 'workdir':
    return os.path.join(workdir, 'xla_cache')
  if setting != 'auto':
    return setting
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  base = os.environ.get('PRETRAX_CACHE_DIR') or os.path.join(
    os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'pretrax'
  )
  return os.path.join(base, 'xla')


def _jax_option(name: str):
  """A JAX config option's current value (read by attribute, which the type stubs do not know)."""
  return getattr(jax.config, name)


def use_compile_cache(setting: str, workdir: str) -> str | None:
  """Points JAX's persistent compilation cache at `setting`'s directory (or turns it off) for
  everything compiled from here on; returns the directory."""
  directory = cache_directory(setting, workdir)
  if directory == _jax_option('jax_compilation_cache_dir'):
    return directory
  jax.config.update('jax_compilation_cache_dir', directory)
  if directory is not None:
    if _jax_option('jax_persistent_cache_min_compile_time_secs') == 1.0:  # JAX's default.
      jax.config.update('jax_persistent_cache_min_compile_time_secs', CACHE_MIN_COMPILE_S)
    # Unbounded unless the user chose; JAX caps it only with filelock, without which a cap turns
    # the cache off (silently): a dependency of ours, but not of a bare JAX install's.
    capped = _jax_option('jax_compilation_cache_max_size') != -1
    if not capped and importlib.util.find_spec('filelock') is not None:
      jax.config.update('jax_compilation_cache_max_size', CACHE_MAX_BYTES)
  # JAX opens its cache at the first compile of the process: a new directory needs a new one.
  compilation_cache.reset_cache()
  return directory
