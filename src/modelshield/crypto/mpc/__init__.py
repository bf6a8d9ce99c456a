"""Secure multi-party computation: a 3-party ring engine and MPyC (both honest majority).

A model owner and a data owner (or several data owners) compute a result neither could
compute alone, as separate processes that exchange only secret shares over TCP:

- two engines: ``ring`` (:mod:`.rss`, :mod:`.ring`, :mod:`.ring_train`, :mod:`.net`),
  replicated secret sharing over Z_2^64 on torch int64 for 3 parties (ABY3-style), and
  ``mpyc`` (:mod:`.engine`, :mod:`.train`), Shamir sharing with MPyC, any number of parties;
- secret-shared inference: the model owner shares the weights of the
  model's layer list (:mod:`.model`), the data owner its inputs; every party computes
  affine layers, ReLU (secure comparison), polynomial activations and argmax in fixed
  point, and only the data owner learns the outputs;
- joint training (:mod:`.train`) of a linear or logistic model on horizontally split data;
- one party per process (:mod:`.party`, ``modelshield mpc party``) and a one-machine
  launcher (:mod:`.commands`, ``modelshield mpc infer`` / ``mpc train``).

Security: passive (semi-honest) adversaries, at most ``(m-1)//2`` of ``m ≥ 3`` parties
colluding. Revealed: the outputs (to the data owner), shapes and the architecture.
MPyC is imported lazily, so ``import modelshield`` works without it.
"""
