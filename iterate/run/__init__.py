"""Running the program: the command line and its exit statuses (``cli``), the start-up
checks of a config before any work (``validate``), and the loop that runs the stages in
order, iteration after iteration, resuming where a run stopped (``loop``)."""
