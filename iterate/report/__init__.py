"""What a user reads: the metrics rows, table and plot (``metrics``), model cards
(``cards``), a sweep side by side (``sweep``), experiment trackers (``track``), and the run
inspector (``show``) with what it reads of a run folder (``runinfo``)."""
