"""Training: the per-process loop, its typed run config, checkpoints and launchers.

* ``config``     ``TrainRunConfig``, ``load_run_config(recipe, config_path, overrides)``
* ``trainer``    ``train(cfg)``: one process's share of a run (torchrun / PyTorchJob pod)
* ``launch``     ``Launcher``, ``LocalTorchrunLauncher``, ``run_local(...)`` -> summary
* ``checkpoint`` sharded DCP checkpoints, local or gs://, atomic, with ``latest`` and pruning
* ``schedule``   LR warm-up + decay, MT-NLG batch-size ramp-up
* ``optim``      AdamW with Megatron's weight-decay groups
* ``cli``        ``mtnlg train``
"""
