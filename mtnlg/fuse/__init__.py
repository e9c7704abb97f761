"""One unified model out of a sharded checkpoint: fuse, reshard, Hugging Face export, loading."""
