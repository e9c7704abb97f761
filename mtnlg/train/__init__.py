"""Training: the per-process loop, its typed run config, checkpoints and launchers.

* ``config``     ``TrainRunConfig`` and the named recipes (``load_config(TrainRunConfig, ..., base=recipe(name))``)
* ``trainer``    ``train(cfg)``: one process's share of a run (torchrun / PyTorchJob pod), the loop
* ``engine``     forward/backward behind one interface: one stage per rank, or a pipeline stage
* ``validator``, ``metrics``, ``checkpointer``, ``state``: the loop's components (cadence, files, resume)
* ``data``, ``gpt_dataset``  the run's samples (Megatron's GPT sample index, blends)
* ``device``     device, precision and peak FLOP/s
* ``launch``     ``Launcher``, ``LocalTorchrunLauncher``, ``run_local(cfg, nproc)`` -> summary
* ``schedule``   LR warm-up + decay, MT-NLG batch-size ramp-up
* ``optim``      AdamW with Megatron's weight-decay groups
* ``cli``        ``mtnlg train``
"""
