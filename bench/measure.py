"""Shared by the benchmarks: peak memory of a block on the CPU."""
import os


class PeakRSS:
    """Peak resident-set growth over a block, sampled every 2 ms from /proc (CPU runs; on CUDA use the
    allocator's own peak). malloc_trim first, so memory freed during set-up is not silently reused."""

    def __enter__(self):
        import ctypes
        import threading
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 2 ** 20
