# Additive secret sharing, first by hand in R, then with veil (through reticulate).
#
#   RETICULATE_PYTHON=/path/to/veil/.venv/bin/python Rscript examples/r/shared_secret.R

# ---- by hand ---------------------------------------------------------------------------
# A secret x in Z_Q becomes three numbers that each look random and sum to x modulo Q.
# Any two of them say nothing about x. (R's sample() is not a cryptographic generator:
# this part only illustrates the arithmetic; veil draws shares from the OS's CSPRNG.)
Q <- 2147483647  # a prime below 2^31, so sums of two shares stay exact in R's doubles

share <- function(x, n = 3) {
  parts <- sample.int(Q, n - 1, replace = TRUE) - 1  # uniform in 0..Q-1
  c(parts, (x - sum(parts)) %% Q)
}
reconstruct <- function(shares) sum(shares) %% Q
add_shares <- function(a, b) (a + b) %% Q  # each party adds its own two shares, locally

x <- share(77777)
y <- share(22223)
cat("by hand: shares of 77777:", format(x, scientific = FALSE), "\n")
cat("by hand: 77777 reconstructed:", reconstruct(x) == 77777, "\n")
cat("by hand: 77777 + 22223 =", format(reconstruct(add_shares(x, y)), scientific = FALSE), "\n")

# ---- with veil -------------------------------------------------------------------------
# veil shares integers in the ring Z / 2^64 (torch int64 arithmetic wraps exactly there),
# two parties hold the shares and a third worker, the crypto provider, deals the material
# that multiplications need.
library(reticulate)
sy <- import("veil")
# convert = FALSE keeps Python's 64-bit integers as they are (R's integers have 32 bits)
torch <- import("torch", convert = FALSE)
sharing <- import("veil.mpc.sharing", convert = FALSE)
hook <- sy$TorchHook(torch)
alice <- sy$VirtualWorker(hook, id = "alice")
bob <- sy$VirtualWorker(hook, id = "bob")
carol <- sy$VirtualWorker(hook, id = "carol")  # the crypto provider
builtins <- import_builtins(convert = FALSE)
value <- function(t) py_to_r(builtins$str(builtins$int(t)))  # a one-element int64 tensor, as text

pieces <- py_to_r(sharing$split(torch$tensor(list(77777L)), 3L))  # three int64 shares, by veil
cat("veil: shares of 77777:", sapply(pieces, value), "\n")
total <- pieces[[1]]$add(pieces[[2]])$add(pieces[[3]])  # the sum wraps modulo 2^64
cat("veil: the shares add up to", value(total), "\n")
# one share is a uniform 64-bit number: nowhere near the secret
cat("veil: a share alone looks uniform:", py_to_r(pieces[[1]]$abs()$gt(1e6)$item()), "\n")

a <- torch$tensor(list(77777L))$share(alice, bob, crypto_provider = carol)
b <- torch$tensor(list(22223L))$share(alice, bob, crypto_provider = carol)
s <- a$add(b)  # each worker adds its own shares
cat("veil: 77777 + 22223 =", value(s$get()), "\n")
p <- a$mul(torch$tensor(list(3L))$share(alice, bob, crypto_provider = carol))  # a Beaver multiplication
cat("veil: 77777 * 3 =", value(p$get()), "\n")
