"""What training is made of: the update rules' table (``rules``), the losses of every rule
as formulas on tensors (``losses``), loading, batching and running the models
(``models``), and the one training loop every model here is stepped by (``loop``: the
policy's update stages in ``iterate.stages.update``, the reward model, the toy SFT)."""
