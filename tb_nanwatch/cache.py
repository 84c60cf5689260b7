"""The plugin's cache of read runs: one entry per (experiment, run, group), valid while the
data provider reports nothing new for the run's tags.  What is derived from a run (its
heatmaps, warning signs, diagnosis) lives in its entry, so it goes when the data changes.
TensorFlow-free."""

import collections
import threading


class Entry:
    """One read run: `data` (a reader.RunData), the fingerprint it was read at, and what
    was computed from it (`memo`)."""

    def __init__(self, key, fingerprint, data, memo_size):
        self.key = key
        self.fingerprint = fingerprint
        self.data = data
        self._memo = collections.OrderedDict()
        self._memo_size = memo_size
        self._lock = threading.Lock()

    @property
    def nbytes(self):
        data = self.data
        extra = getattr(data, "timeline_rows", None)
        return data.rows.nbytes + data.flight_rows.nbytes + (0 if extra is None else extra.nbytes)

    def memo(self, key, compute):
        """compute() once per key for this version of the run (the last `memo_size` kept)."""
        with self._lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                return self._memo[key]
        value = compute()
        with self._lock:
            self._memo[key] = value
            while len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)
        return value


class RunCache:
    """Least recently used entries, at most `max_entries` and `max_bytes` of rows (the most
    recent entry is always kept, whatever its size)."""

    def __init__(self, max_entries=16, max_bytes=512 * 2**20, memo_size=40):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.memo_size = memo_size
        self._entries = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, fingerprint, load):
        """The entry of `key` read at `fingerprint`; load() reads the run when the cache has
        no entry for it or an older one."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.fingerprint == fingerprint:
                self._entries.move_to_end(key)
                return entry
        entry = Entry(key, fingerprint, load(), self.memo_size)
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries or (
                len(self._entries) > 1
                and sum(e.nbytes for e in self._entries.values()) > self.max_bytes
            ):
                self._entries.popitem(last=False)
        return entry

    def peek(self, key, fingerprint):
        """The entry of `key` if it is cached at `fingerprint`, else None (nothing is read)."""
        with self._lock:
            entry = self._entries.get(key)
        return entry if entry is not None and entry.fingerprint == fingerprint else None

    def __len__(self):
        return len(self._entries)


class Sources:
    """The last `max_entries` run directories read (a `runview.RunSource` each, which
    remembers how far it read every file: a reload reads only what was appended)."""

    def __init__(self, max_entries=16):
        self.max_entries = max_entries
        self._sources = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, make):
        with self._lock:
            source = self._sources.get(key)
            if source is None:
                source = self._sources[key] = make()
            self._sources.move_to_end(key)
            while len(self._sources) > self.max_entries:
                self._sources.popitem(last=False)
        return source

    def peek(self, key):
        """The source of `key` if one is kept, else None (nothing is made)."""
        with self._lock:
            return self._sources.get(key)
