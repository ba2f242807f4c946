"""Ring sampling, splitting, opening and ring convolution."""

import pytest
import torch
import torch.nn.functional as F

from veil.mpc import ring
from veil.mpc.errors import NotEncodedError
from veil.mpc.opening import count_openings, reconstruct
from veil.mpc.sharing import split


def test_random_ring_covers_both_halves(gen):
    for g in (gen, None):
        r = ring.random_ring((4000,), g)
        assert r.dtype == torch.int64
        # about half negative; the top bit is uniform
        assert 1700 < int((r < 0).sum()) < 2300
        assert int(r.abs().max()) > 2**62


@pytest.mark.parametrize("n", [2, 3, 5])
def test_split_reconstructs(n, gen):
    x = torch.randint(-(2**62), 2**62, (7, 3))
    shares = split(x, n, gen)
    assert len(shares) == n
    assert torch.equal(reconstruct(dict(enumerate(shares))), x)


def test_split_rejects_floats():
    with pytest.raises(NotEncodedError, match="fix_precision"):
        split(torch.randn(3), 2)


def test_open_counts_rounds():
    shares = dict(enumerate(split(torch.arange(6), 3)))
    with count_openings() as stats:
        reconstruct(shares)
    assert stats.rounds == 1 and stats.elements == 6 * 3 * 2 and stats.bytes == 8 * 36


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 0, 1, 1), (2, 1, 1, 1), (1, 2, 2, 1), (1, 1, 1, 2)])
def test_conv2d_fallback_matches_native(gen, stride, padding, dilation, groups):
    x = ring.random_ring((2, 4, 9, 8), gen)
    w = ring.random_ring((6, 4 // groups, 3, 3), gen)
    fallback = ring._conv2d_unfold(x, w, stride, padding, dilation, groups)
    expected = ring.conv2d(x, w, stride, padding, dilation, groups)
    assert torch.equal(fallback, expected)
    small_x, small_w = torch.randint(-50, 50, (2, 4, 9, 8)), torch.randint(-50, 50, (6, 4 // groups, 3, 3))
    ref = F.conv2d(small_x.double(), small_w.double(), None, stride, padding, dilation, groups)
    assert torch.equal(ring._conv2d_unfold(small_x, small_w, stride, padding, dilation, groups), ref.long())


@pytest.mark.parametrize("shape,stride,padding,dilation", [
    ((8, 32, 5, 5), 1, 0, 1), ((3, 16, 6, 6), 2, 1, 1), ((2, 8, 3, 3), 1, 2, 2), ((1, 32, 3, 3), 1, 0, 1),
    ((4, 8, 4, 5), (2, 1), (0, 1), 1), ((2, 8, 3, 3), [1], [1], (1,))])
def test_conv2d_with_few_output_positions_takes_the_matmul_form_and_matches_torch(gen, shape, stride, padding, dilation):
    # a CNN's deepest layers: positions * 4 <= output channels (torch's int64 kernel is up to 5x slower there)
    x, w = ring.random_ring(shape, gen), ring.random_ring((64, shape[1], 3, 3), gen)
    assert ring._few_positions(x, w, stride, padding, dilation, 1)
    got = ring.conv2d(x, w, stride, padding, dilation)
    assert got.is_contiguous() and torch.equal(got, F.conv2d(x, w, None, stride, padding, dilation))
    assert not ring._few_positions(torch.zeros(1, 16, 13, 13, dtype=torch.long), torch.zeros(32, 16, 3, 3,
                                                                                              dtype=torch.long), 1, 0, 1, 1)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_conv2d_with_padding_by_name_is_torchs(gen, padding):
    # (a Keras model's Conv2D(padding="same") arrives as a named padding: the native kernel takes it)
    x, w = ring.random_ring((2, 8, 3, 3), gen), ring.random_ring((64, 8, 3, 3), gen)
    assert torch.equal(ring.conv2d(x, w, 1, padding), F.conv2d(x, w, None, 1, padding))


def test_prg_expansion_is_deterministic_per_label_and_looks_uniform():
    from veil.mpc.prg import SEED_BYTES, expand, new_seed

    seed = new_seed()
    a = expand(seed, "0/1", (1000, 10))
    assert a.dtype == torch.int64 and a.shape == (1000, 10)
    assert torch.equal(a, expand(seed, "0/1", (1000, 10)))  # the party and the dealer agree
    assert torch.equal(expand(seed, "0/1", (5,)), a.flatten()[:5])  # a prefix of the same stream
    assert not torch.equal(a, expand(seed, "0/2", (1000, 10)))  # labels give other streams
    assert not torch.equal(a, expand(new_seed(), "0/1", (1000, 10)))
    bits = torch.stack([(a >> i) & 1 for i in range(64)]).double()
    assert abs(bits.mean().item() - 0.5) < 0.01  # 640k bits: 0.5 +- 0.0006 (1 sigma)
    assert (a < 0).any() and (a > 0).any()
    with pytest.raises(ValueError, match="seed"):
        expand(b"short", "0/1", (3,))
    assert expand(seed, "x", (0, 4)).shape == (0, 4) and len(seed) == SEED_BYTES


@pytest.mark.parametrize("numel", [1, 2, 131_071, 131_072, 131_073, 400_001])
def test_prg_chunked_keystream_is_aes_ctr_of_zeros_in_one_piece(numel):
    """The chunked expansion (1 MiB pieces of one zero block) is the plain AES-128-CTR keystream,
    across chunk boundaries and for lengths that are not a multiple of the chunk or the AES block."""
    import hashlib

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from veil.mpc.prg import expand, new_seed

    seed = new_seed()
    key = hashlib.sha256(seed + b"|lbl").digest()[:16]
    ref = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(8 * numel))
    got = expand(seed, "lbl", (numel,))
    assert got.numpy().tobytes() == ref
