"""Encrypted inference of linear models on CKKS-encrypted inputs.

The data owner encrypts a batch; the model owner computes scores on the
ciphertexts with plaintext weights; only the data owner decrypts the scores.

Layout (why it is fast): a batch ``x [B, d]`` for a model with ``m`` outputs
is encrypted feature by feature, each ciphertext holding feature ``j`` of all
``B`` samples repeated ``m`` times (``m * B <= slots``). Multiplying it by the
plaintext vector ``W[j, 0]*B ++ W[j, 1]*B ++ ...`` computes feature ``j``'s
contribution to every output of every sample at once, so a whole layer costs
``d`` plaintext multiplications and additions and no rotations (TenSEAL's
vector-matrix product needs one rotation per input value).

The batch comes from the data owner, who holds the key and could craft it: :func:`linear_scores` takes only
fresh ciphertexts under the agreed parameters (:mod:`veil.he.evaluation_checks`), starts its sum from a fresh
encryption of zero, and returns the scores sealed (:meth:`CKKSTensor.sealed`: slots past ``m * B`` zeroed, only
the real parts kept with the context's conjugation key (a batch of ``x + i*y`` gave ``y @ W`` in the imaginary
parts: a context without that key is refused), Gaussian flooding of ``veil.he.flooding.sigma(scale,
product=True)``, 2**-16 at scale 2**40, on every score). Its errors and the scores' level do not depend on the
weights' values (all-zero weights give the bias).
Statistical parameter: the layer's own noise (at most ~2**-23 at scale 2**40 for weights of order 1) moves each
score's distribution by a KL divergence of at most 2**-15; 2**-40 would need sigma ~2**-3.5, more than the
scores' precision allows. A fresh encryption of zero makes the released randomness independent of the batch's.
What the scores themselves give is another matter: ``d`` one-hot rows give ``W``, and rows of ``2**k`` give it
``k`` bits finer than the flooding (CKKS cannot bound an encrypted input).
"""

from __future__ import annotations

import torch
import tenseal as ts

from veil.he.ckks import CKKSContext, CKKSTensor, _tenseal_errors, context
from veil.he.conjugation import add_conjugation_key
from veil.he.errors import ShapeMismatchError
from veil.he.evaluation_checks import DEFAULT_PARAMETERS, EvaluationParameters, check_batch, check_product, \
    parameters_of


def default_context() -> CKKSContext:
    """A context for one plaintext-weight layer and its sealing (two levels): no rotation keys, only the
    conjugation key the model owner keeps the scores' real parts with (:mod:`veil.he.conjugation`)."""
    p = DEFAULT_PARAMETERS
    ctx = context(poly_modulus_degree=p.poly_modulus_degree, coeff_mod_bit_sizes=p.coeff_mod_bit_sizes,
                  global_scale=p.global_scale, galois_keys=False)
    add_conjugation_key(ctx)
    return ctx


def train_logistic_regression(x: torch.Tensor, y: torch.Tensor, epochs: int = 300, lr: float = 0.5,
                              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch logistic regression in plaintext. Returns ``(w [d, 1], b [1])``."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y.float())
        loss.backward()
        opt.step()
    return model.weight.detach().T.clone(), model.bias.detach().clone()


def train_softmax_regression(x: torch.Tensor, y: torch.Tensor, n_classes: int, epochs: int = 30,
                             lr: float = 0.1, batch_size: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with minibatch SGD. Returns ``(W [d, C], b [C])``."""
    g = torch.Generator().manual_seed(seed)
    x = x.reshape(x.shape[0], -1)
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.weight.detach().T.clone(), model.bias.detach().clone()


def shuffled_split(data: dict[str, torch.Tensor], n_test: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Re-split a ``{x_train, y_train, x_test, y_test}`` dict at random.

    ``load_mnist_5k``'s rows are sorted by label, so its fixed split puts only
    8s and 9s in the test set; a seeded shuffle gives a representative one.
    """
    x = torch.cat([data["x_train"], data["x_test"]])
    y = torch.cat([data["y_train"], data["y_test"]])
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return {"x_train": x[n_test:], "y_train": y[n_test:], "x_test": x[:n_test], "y_test": y[:n_test]}


def max_batch(ctx: CKKSContext, n_outputs: int) -> int:
    """Largest batch that one ciphertext per feature can hold for ``n_outputs`` outputs."""
    return ctx.slots // n_outputs


def encrypt_batch(x: torch.Tensor, ctx: CKKSContext, n_outputs: int) -> CKKSTensor:
    """Encrypt ``x [B, d]`` in the tiled feature-major layout (see module docstring).

    Returns:
        A :class:`CKKSTensor` of shape ``[d, n_outputs * B]`` (one ciphertext per feature).
    """
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    b, d = x.shape
    if b * n_outputs > ctx.slots:
        raise ShapeMismatchError(f"batch {b} x {n_outputs} outputs exceeds {ctx.slots} slots; split the batch")
    tiled = x.T.repeat(1, n_outputs)  # row j: feature j of every sample, n_outputs times
    with _tenseal_errors("encrypt"):
        segments = [ts.ckks_vector(ctx.raw, row.tolist()) for row in tiled]
    return CKKSTensor(ctx, segments, (d, n_outputs * b), torch.float32)


def linear_scores(enc_x: CKKSTensor, weight: torch.Tensor, bias: torch.Tensor,
                  parameters: EvaluationParameters = DEFAULT_PARAMETERS) -> CKKSTensor:
    """Encrypted ``x @ weight + bias`` on a batch from :func:`encrypt_batch`.

    Args:
        enc_x: encrypted batch of shape ``[d, m * B]``, made by someone else.
        weight: plaintext ``[d, m]``.
        bias: plaintext ``[m]``.
        parameters: the CKKS parameters the evaluation agreed to (two levels at least).

    Returns:
        Encrypted scores of shape ``[m, B]`` in one ciphertext (decrypt, then ``.T``), sealed: every other slot
        zero and each score flooded (see the module docstring).

    Raises:
        CiphertextRefusedError: the batch is not fresh ciphertexts under ``parameters``, or its context has no
            conjugation key (:func:`default_context` makes it).
        ShapeMismatchError: the batch does not fit the weights.
    """
    d, mb = enc_x.shape
    weight = weight.to(torch.float64)
    if weight.shape[0] != d or mb % weight.shape[1]:
        raise ShapeMismatchError(f"weights {tuple(weight.shape)} do not fit encrypted batch {tuple(enc_x.shape)}")
    check_batch(enc_x, d, mb, parameters)
    m = weight.shape[1]
    b = mb // m
    with _tenseal_errors("linear layer"):
        # fresh randomness first: the data owner's ciphertexts times the weights never sum to a transparent
        # (0, 0), which SEAL refused (two copies of one ciphertext and rows w1 == -w0: an oracle on the weights);
        # brought to a product's level, so that the scores' level is the same if every weight is zero (then
        # nothing is added: the scores are the bias; a refusal told the data owner the weights were zero)
        acc = ts.ckks_vector(enc_x.context.raw, [0.0] * mb).mul(1.0)
        ones = [1.0] * mb
        for j, seg in enumerate(enc_x.segments):
            wj = weight[j]
            if not bool(wj.any()):
                # e.g. a border pixel the model ignores: its product would be transparent, so nothing is added,
                # but the scale is checked on a product with public ones all the same (checked only on the
                # weights' rows, a refusal said which rows of W are zero) at a product's cost (so is the time)
                check_product(seg.mul(ones), parameters)
                continue
            term = seg.mul(wj.repeat_interleave(b).tolist())
            check_product(term, parameters)
            acc.add_(term)
        acc = acc.add(bias.to(torch.float64).repeat_interleave(b).tolist())
    return CKKSTensor(enc_x.context, [acc], (m, b), torch.float32).sealed()


def encrypted_predict(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      ctx: CKKSContext) -> torch.Tensor:
    """Scores ``[N, m]`` computed on encrypted inputs, batch by batch (decrypted with ``ctx``)."""
    m = weight.shape[1]
    step = max_batch(ctx, m)
    out = []
    for i in range(0, x.shape[0], step):
        enc = encrypt_batch(x[i : i + step], ctx, m)
        out.append(linear_scores(enc, weight, bias, parameters_of(ctx)).decrypt().T)
    return torch.cat(out, 0)


def accuracy(scores: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of scores: argmax for several outputs, ``score > 0`` for a single logit."""
    pred = scores.argmax(1) if scores.shape[1] > 1 else (scores[:, 0] > 0).long()
    return float((pred == y.long()).float().mean())


def compare_plain_and_encrypted(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                ctx: CKKSContext | None = None) -> dict[str, float]:
    """Accuracy of the same linear model on plaintext and on CKKS-encrypted inputs.

    Returns:
        ``{"plain": acc, "encrypted": acc, "max_abs_score_error": e}``.
    """
    ctx = ctx or default_context()
    x = x.reshape(x.shape[0], -1)
    plain = x.to(torch.float64) @ weight.to(torch.float64) + bias.to(torch.float64)
    enc = encrypted_predict(x, weight, bias, ctx).to(torch.float64)
    return {
        "plain": accuracy(plain, y),
        "encrypted": accuracy(enc, y),
        "max_abs_score_error": float((plain - enc).abs().max()),
    }
