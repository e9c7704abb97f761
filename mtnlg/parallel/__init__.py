"""Parallelism for the GPT: degrees and mesh (``dims``), tensor/sequence parallel plan
(``tensor_parallel``), the one ``parallelize_gpt`` entry (``parallelize``), vocab-parallel
loss (``loss``), clipping and dropout RNG (``utils``). Submodules are imported
explicitly so that reading a config does not load ``torch.distributed``."""
