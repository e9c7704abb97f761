"""On-disk formats every step shares; they import nothing above ``parallel``/``model``.

* ``rundir``               names of the files and folders in a run directory
* ``checkpoint``           sharded training checkpoints (DCP): save, load, ``latest``, prune
* ``dcp_reader``           read a DCP checkpoint's tensors offline, in one process
* ``sharded_safetensors``  streaming safetensors writer, header reader, shard planning
* ``manifest``             per-file and per-tensor checksums of a model directory
* ``fused``                fused model directories: ``save_fused`` / ``load_fused``
* ``tokenizer``            the SentencePiece model + ``tokenizer.json`` (``Tokenizer``)
* ``indexed_dataset``      Megatron-LM's ``.bin``/``.idx`` token files
* ``runlog``               a training run's ``log.jsonl``, ``summary.json`` and loss curve
"""
