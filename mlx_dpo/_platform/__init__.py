"""What every layer may use and none owns: the BLAS loaded before MLX (``blas``, ``elf``),
files written atomically (``files``), progress output (``progress``) and the user's own
``module.function`` code (``user_code``). Nothing here imports another mlx_dpo module."""
