"""Device self-test: proves an install on one GPU (or one node) in minutes and records its numbers.

    python -m torchtitan_hyena.tools.selftest [--quick | --smoke] [--output PATH] [--sections kernels,training,...]
    srun -N1 -n1 --gpus-per-task=1 python -m torchtitan_hyena.tools.selftest          # one Frontier GCD
    torchrun --nproc_per_node 8 -m torchtitan_hyena.tools.selftest                     # one node, every device

Sections: ``kernels`` (every Triton kernel, the Hyena-LI FFT pipeline, flash-attn and the float8 gate against their
references, on the device), ``training`` (a compiled training step of each debug flavor against eager), ``speed``
(kernel bandwidth against ``torch.clone``, speed-ups over ``F.conv1d``/FFT, the LI conv's time and memory),
``throughput`` (tokens/s, MFU and peak memory of Llama-3-1B and Evo 2 1B shapes at 8k, with the dry run's predicted
peak) and ``comm`` (``tools/comm_check``'s bandwidth, when the launch has several ranks). It prints a table per
section, writes every number with the date, host, device and versions to JSON, and exits 1 when a correctness check
fails. ``--smoke`` runs the same code on CPU at tiny shapes with the kernels interpreted (the test suite runs it).
"""
