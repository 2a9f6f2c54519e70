"""dmoe: Qwen3 Mixture-of-Experts inference on CPUs, one process or many MPI ranks."""
