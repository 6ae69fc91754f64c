"""What training is made of: the update rules' table (``rules``), the losses of every rule
as formulas on tensors (``losses``), and loading, batching and running the models
(``models``). The stages' training loop (``iterate.stages.update``) is built on these."""
