"""Fused Triton ops of the loss path (one op per file: kernel, host wrapper, autograd glue).

* ``philox``  -- Philox4x32-10, uniform and Box-Muller helpers (the RNG contract of speed_kernels.rng)
* ``noise``   -- draw t and eps, write x_t (one launch)
* ``loss``    -- regenerate eps, weighted loss + its gradient w.r.t. pred (one launch + a tiny reduction)
* ``triton_backend`` -- the ``TritonBackend`` object ``speed_kernels.backends`` loads

Importing this package does not import Triton; the op modules do.
"""
