"""Private inference: homomorphic encryption (``he``; CKKS via TenSEAL)."""
