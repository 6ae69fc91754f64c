"""What a user reads: the metrics rows, table and plot (``metrics``), model cards
(``cards``), a sweep side by side (``sweep``), and the run inspector (``show``) with what
it reads of a run folder (``runinfo``). The experiment trackers are ``iterate.track``: the
training loop writes to them as well."""
