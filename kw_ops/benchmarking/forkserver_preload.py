"""Imported once by the bench's forkserver (never by the parent): the worker's imports, and one empty
torch.profiler session, since the profiler's first start in a process is slow (seconds of CPU on a
2-core machine) while a forked worker that inherits a started-once profiler starts it in milliseconds."""
from .measure import allocator_peak_mb
from .worker import Worker  # noqa: F401  (what the forked workers run)

allocator_peak_mb(lambda: None)
