"""Three-party replicated secret sharing over the ring Z_2^64 (ABY3-style), on torch int64.

A value ``x`` is split as ``x = s0 + s1 + s2 (mod 2^64)`` and party ``i`` holds the pair
``(s_i, s_{i+1})`` (Araki et al., CCS 2016; Mohassel and Rindal, "ABY3", CCS 2018). Any
one party's view is a pair of uniformly random ring elements, independent of ``x``: the
engine is secure against one semi-honest (passive) party, i.e. an honest majority of 2
out of 3, the same model as MPyC with three parties. Boolean shares are the same with
XOR on 64-bit words.

- Addition, and multiplication by a public integer, are local.
- Multiplication (and matrix products) take one round: party ``i`` computes its additive
  share of the product plus a share of zero from the pairwise PRF keys and sends it to
  party ``i-1`` (ABY3 §3.2).
- Fixed point carries ``f`` fractional bits. A product (scale ``2^2f``) is truncated in
  one message: parties 0 and 2 shift ``s0``, party 1 shifts ``s1 + s2``, and party 1
  re-randomises its part with the key it shares with party 2 (ABY3's Π_trunc1; the
  result is off by at most one ulp, and wrong with probability about ``|x|/2^63``, as
  in SecureML's local truncation).
- Comparison: the sign bit of ``x`` by a binary circuit on the three shares: one
  full-adder layer (carry-save) and a Kogge-Stone carry (6 levels) on bit-packed words,
  8 rounds in all; the bit is brought back to arithmetic shares in 2 rounds.

Pairwise keys: party ``i`` draws ``K_i`` and gives it to party ``i-1``, so party ``i``
holds ``K_i`` and ``K_{i+1}``; every random draw is SHAKE-256 of the key, a per-run
operation counter and a tag, so both holders of a key draw the same words.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import numpy as np
import torch

from modelshield.crypto.mpc.engine import MPCError
from modelshield.crypto.mpc.net import Peers

PARTIES = 3
RING_BITS = 64


@dataclass
class Shared:
    """This party's two shares ``(s_i, s_{i+1})`` of an arithmetic or boolean value."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.a.shape

    def __add__(self, other: Shared) -> Shared:
        return Shared(self.a + other.a, self.b + other.b)

    def __sub__(self, other: Shared) -> Shared:
        return Shared(self.a - other.a, self.b - other.b)

    def __xor__(self, other: Shared) -> Shared:
        return Shared(self.a ^ other.a, self.b ^ other.b)

    def __neg__(self) -> Shared:
        return Shared(-self.a, -self.b)

    def scale(self, k: int | torch.Tensor) -> Shared:
        """Multiply by a public integer (or an int64 tensor of them)."""
        return Shared(self.a * k, self.b * k)

    def shift_left(self, k: int) -> Shared:
        return Shared(self.a << k, self.b << k)

    def map(self, fn: object) -> Shared:
        """Apply the same public rearrangement (index, reshape, transpose) to both shares."""
        return Shared(fn(self.a), fn(self.b))  # type: ignore[operator]


def cat(parts: list[Shared], dim: int = 0) -> Shared:
    return Shared(torch.cat([p.a for p in parts], dim), torch.cat([p.b for p in parts], dim))


def encode(x: np.ndarray | torch.Tensor, frac_bits: int) -> torch.Tensor:
    """Fixed point: ``round(x · 2^f)`` as int64 (two's complement is the ring)."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float64) * float(2**frac_bits))
    return torch.round(t).to(torch.int64)


def decode(x: torch.Tensor, frac_bits: int) -> np.ndarray:
    return x.to(torch.float64).numpy() / float(2**frac_bits)


class Ring3:
    """The protocol of party ``net.pid`` of three: every method is run by all parties alike.

    Methods that need the other parties send and receive in a fixed pattern, so every
    party must call the same methods with the same public shapes in the same order.
    """

    def __init__(self, net: Peers, frac_bits: int) -> None:
        if len(net.addresses) != PARTIES:
            raise MPCError(f"the ring engine runs exactly 3 parties, got {len(net.addresses)}")
        self.net = net
        self.pid = net.pid
        self.f = int(frac_bits)
        self.next = (self.pid + 1) % PARTIES
        self.prev = (self.pid - 1) % PARTIES
        self._op = 0
        mine = secrets.token_bytes(32)
        net.send(self.prev, mine)  # K_i goes to party i-1
        theirs = net.recv(self.next)
        if len(theirs) != 32:
            raise MPCError(f"party {self.next} sent a malformed key")
        self.keys = {self.pid: mine, self.next: theirs}  # K_i and K_{i+1}

    # -- randomness ----------------------------------------------------------------------

    def _tick(self) -> int:
        """Every party advances the operation counter at the same protocol step."""
        self._op += 1
        return self._op

    @staticmethod
    def _prf(key: bytes, op: int, tag: bytes, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        n = int(np.prod(shape))
        raw = hashlib.shake_256(key + op.to_bytes(8, "little") + tag).digest(8 * n)
        return torch.from_numpy(np.frombuffer(raw, dtype="<i8").copy()).reshape(tuple(shape))

    def _zero(self, shape: torch.Size, boolean: bool = False) -> torch.Tensor:
        """This party's share of a fresh random sharing of zero (sum or XOR over parties)."""
        op = self._tick()
        r_mine = self._prf(self.keys[self.pid], op, b"zero", shape)
        r_next = self._prf(self.keys[self.next], op, b"zero", shape)
        return r_mine ^ r_next if boolean else r_mine - r_next

    # -- sharing and opening -------------------------------------------------------------

    def share(self, owner: int, value: torch.Tensor | None, shape: tuple[int, ...]) -> Shared:
        """Secret-share ``value`` (an int64 tensor held by party ``owner``), one round.

        ``s_owner`` and ``s_{owner+1}`` come from the keys the owner shares with its two
        neighbours; the owner sends the third share ``x - s_owner - s_{owner+1}`` to both
        of them, to each of whom it is masked by the key it does not hold.
        """
        op = self._tick()
        shape = tuple(int(d) for d in shape)
        o, o1, o2 = owner, (owner + 1) % PARTIES, (owner + 2) % PARTIES
        if self.pid == o:
            if value is None or tuple(value.shape) != shape:
                got = None if value is None else tuple(value.shape)
                raise MPCError(f"party {owner} must share an array of shape {shape}, got {got}")
            s_o = self._prf(self.keys[o], op, b"in", shape)
            s_o1 = self._prf(self.keys[o1], op, b"in", shape)
            s_o2 = value.to(torch.int64) - s_o - s_o1
            self.net.send_tensor(o1, s_o2)
            self.net.send_tensor(o2, s_o2)
            return Shared(s_o, s_o1)
        if self.pid == o1:  # holds (s_o1, s_o2)
            s_o1 = self._prf(self.keys[o1], op, b"in", shape)
            return Shared(s_o1, self.net.recv_tensor(o, shape))
        s_o = self._prf(self.keys[o], op, b"in", shape)  # party o2 holds (s_o2, s_o)
        return Shared(self.net.recv_tensor(o, shape), s_o)

    def open_to(self, receiver: int, x: Shared) -> torch.Tensor | None:
        """Reveal ``x`` to ``receiver`` only (it gets the third share from its successor)."""
        if self.pid == (receiver + 1) % PARTIES:
            self.net.send_tensor(receiver, x.b)
        if self.pid != receiver:
            return None
        return x.a + x.b + self.net.recv_tensor((receiver + 1) % PARTIES, x.shape)

    def open_all(self, x: Shared) -> torch.Tensor:
        """Reveal ``x`` to every party: each sends its second share to its predecessor."""
        self.net.send_tensor(self.prev, x.b)
        return x.a + x.b + self.net.recv_tensor(self.next, x.shape)

    def mul_public(self, x: Shared, c: float, bits: int = 24) -> Shared:
        """``x · c`` for a public real ``c``, with ``c`` carried at ``bits`` fractional bits
        (more than ``f`` keeps a small factor such as a learning rate precise), one message."""
        return self.truncate(x.scale(round(float(c) * 2**bits)), bits)

    def add_public(self, x: Shared, c: torch.Tensor | int) -> Shared:
        """``x + c`` for a public ``c`` (added to ``s0``: parties 0 and 2 hold it)."""
        if self.pid == 0:
            return Shared(x.a + c, x.b)
        if self.pid == 2:
            return Shared(x.a, x.b + c)
        return x

    def xor_public(self, x: Shared, c: torch.Tensor | int) -> Shared:
        if self.pid == 0:
            return Shared(x.a ^ c, x.b)
        if self.pid == 2:
            return Shared(x.a, x.b ^ c)
        return x

    # -- multiplication ------------------------------------------------------------------

    def _reshare(self, z: torch.Tensor) -> Shared:
        """From additive shares (one per party) back to replicated pairs: one message."""
        self.net.send_tensor(self.prev, z)
        return Shared(z, self.net.recv_tensor(self.next, z.shape))

    def mul(self, x: Shared, y: Shared) -> Shared:
        """Elementwise ``x · y`` (no truncation), one round."""
        z = x.a * y.a + x.a * y.b + x.b * y.a
        return self._reshare(z + self._zero(z.shape))

    def matmul(self, x: Shared, w: Shared) -> Shared:
        """``x @ w`` (no truncation), one round."""
        z = x.a @ (w.a + w.b) + x.b @ w.a
        return self._reshare(z + self._zero(z.shape))

    def and_(self, x: Shared, y: Shared) -> Shared:
        """Bitwise AND of boolean shares, one round."""
        z = (x.a & y.a) ^ (x.a & y.b) ^ (x.b & y.a)
        return self._reshare(z ^ self._zero(z.shape, boolean=True))

    def and_many(self, pairs: list[tuple[Shared, Shared]]) -> list[Shared]:
        """Several ANDs in one round (one message)."""
        flat = [(x.map(torch.flatten), y.map(torch.flatten)) for x, y in pairs]
        out = self.and_(cat([p[0] for p in flat]), cat([p[1] for p in flat]))
        res, start = [], 0
        for x, _ in pairs:
            n = x.a.numel()
            res.append(out.map(lambda t, s=start, n=n, sh=x.shape: t[s : s + n].reshape(sh)))
            start += n
        return res

    def truncate(self, x: Shared, bits: int | None = None) -> Shared:
        """``x / 2^bits`` (default ``f``) on replicated shares: one message, party 1 → 0.

        The 2-out-of-2 split ``s0 | s1 + s2`` is truncated locally (SecureML); ``y0 = s0
        >> d`` is known to parties 0 and 2, ``y2 = r`` from the key of parties 1 and 2, and
        party 1 sends ``y1 = (s1 + s2 >> d) - r`` to party 0.
        """
        d = self.f if bits is None else int(bits)
        op = self._tick()
        if self.pid == 0:  # (s0, s1) -> (y0, y1)
            return Shared(x.a >> d, self.net.recv_tensor(1, x.shape))
        key12 = self.keys[2]  # K_2 is held by parties 1 and 2
        r = self._prf(key12, op, b"trunc", x.shape)
        if self.pid == 1:  # (s1, s2) -> (y1, y2)
            y1 = ((x.a + x.b) >> d) - r
            self.net.send_tensor(0, y1)
            return Shared(y1, r)
        return Shared(r, x.b >> d)  # party 2: (s2, s0) -> (y2, y0)

    def mul_fixed(self, x: Shared, y: Shared) -> Shared:
        return self.truncate(self.mul(x, y))

    # -- comparison ----------------------------------------------------------------------

    def _lift(self, x: Shared, j: int) -> Shared:
        """Share ``s_j`` of ``x`` as its own sharing ``(0, .., s_j, .., 0)``: no messages."""
        zero = torch.zeros_like(x.a)
        return Shared(
            x.a if self.pid == j else zero, x.b if (self.pid + 1) % PARTIES == j else zero
        )

    def msb(self, x: Shared) -> Shared:
        """Boolean shares of the sign bit of ``x`` (1 when ``x < 0``), 8 rounds.

        ``s0 + s1 + s2`` is added as a binary circuit: a full-adder layer turns three
        words into two (``sum``, ``carry << 1``), then a Kogge-Stone prefix over the
        generate/propagate words gives the carry into bit 63.
        """
        a, b, c = (self._lift(x, j) for j in range(PARTIES))
        (maj,) = self.and_many([(a ^ c, b ^ c)])
        u, v = a ^ b ^ c, (maj ^ c).shift_left(1)
        p0 = u ^ v
        (g,) = self.and_many([(u, v)])
        p = p0
        for k in (1, 2, 4, 8, 16, 32):
            if k == 32:
                (pg,) = self.and_many([(p, g.shift_left(k))])
            else:
                pg, p = self.and_many([(p, g.shift_left(k)), (p, p.shift_left(k))])
            g = g ^ pg
        top = p0 ^ g.shift_left(1)
        return top.map(lambda t: (t >> (RING_BITS - 1)) & 1)

    def bit_to_arith(self, bit: Shared) -> Shared:
        """Arithmetic shares of bit 0 of a boolean sharing: ``b0 ⊕ b1 ⊕ b2`` as sums, 2 rounds.

        Only bit 0 of each share is read (the XOR sharing holds bit by bit), so the
        higher bits an AND's zero-sharing leaves there do not matter.
        """
        low = bit.map(lambda t: t & 1)
        b0, b1, b2 = (self._lift(low, j) for j in range(PARTIES))
        t = b0 + b1 - self.mul(b0, b1).scale(2)
        return t + b2 - self.mul(t, b2).scale(2)

    def relu(self, x: Shared) -> Shared:
        """``max(x, 0)`` exactly: ``x · (1 - [x < 0])``, 11 rounds."""
        neg = self.bit_to_arith(self.msb(x))
        return x - self.mul(x, neg)
