"""The run folder's contract, below everything that writes in it: where each file goes
(``paths``), a stage's identity, completion and resume (``stage``), Parquet shards and
atomic writes (``shards``), seeds derived from integers (``seeds``), caches keyed by what
makes them, code included (``cachekey``), and the one-run-at-a-time lock (``runlock``)."""
