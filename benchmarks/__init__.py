"""The benchmarks behind `python bench.py SUBCOMMAND`, one module each: train_step (JAX vs the
PyTorch twin), loader (data.py's loader vs raw memmap slicing), decode (sample.py's prefill and
decode vs the memory-bandwidth bound) and mesh (train.py's step under dp and fsdp). common.py holds
what they share: the hardware description, the timer, peak memory, spawned workers."""
