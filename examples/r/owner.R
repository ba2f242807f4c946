# The model owner, in R: train a small Keras CNN on MNIST, secret-share it on three
# workers and answer three encrypted queries. Run client.R in a second R session.
#
#   RETICULATE_PYTHON=/path/to/veil/.venv/bin/python Rscript examples/r/owner.R
#
# Settings (environment): VEIL_R_PORTS (default 4000,4001,4002), VEIL_R_CLUSTER_FILE
# (what the client reads, default cluster.json), VEIL_R_MODEL_FILE (the trained plaintext
# model, saved for checking the client's answers; default: not saved), VEIL_R_STEPS
# (training steps, default 150).

library(reticulate)
Sys.setenv(KERAS_BACKEND = "torch")  # Keras 3 on PyTorch: the Keras model is a torch module

sy <- import("veil")
keras <- import("keras")
datasets <- import("veil.datasets")

ports <- as.integer(strsplit(Sys.getenv("VEIL_R_PORTS", "4000,4001,4002"), ",")[[1]])
cluster_file <- Sys.getenv("VEIL_R_CLUSTER_FILE", "cluster.json")
model_file <- Sys.getenv("VEIL_R_MODEL_FILE", "")
steps <- as.integer(Sys.getenv("VEIL_R_STEPS", "150"))

# ---- data: veil's bundled 5,000-image MNIST, shaped the R way -----------------------------
mnist <- datasets$load_mnist_5k(scale = FALSE)           # raw pixels 0..255, like dataset_mnist()
x_train <- mnist$x_train$reshape(-1L, 28L, 28L)$numpy()  # an R array [4000, 28, 28]
y_train <- mnist$y_train$numpy()
# array_reshape fills row-major, like numpy: the images keep their orientation
x_train <- array_reshape(x_train, c(nrow(x_train), 28, 28, 1)) / 255
set.seed(1)
shuffled <- sample(nrow(x_train))                        # the bundled rows are sorted by digit
x_train <- x_train[shuffled, , , , drop = FALSE]
y_train <- y_train[shuffled]

# ---- model: only layers that have a secret-shared version (conv, average pool, relu, dense) -
keras$utils$set_random_seed(0L)
layers <- keras$layers
model <- keras$Sequential(list(
  keras$Input(shape = list(28L, 28L, 1L)),
  layers$Conv2D(16L, list(3L, 3L), padding = "same"),
  layers$AveragePooling2D(list(2L, 2L)),
  layers$Activation("relu"),
  layers$Conv2D(32L, list(3L, 3L), padding = "same"),
  layers$AveragePooling2D(list(2L, 2L)),
  layers$Activation("relu"),
  layers$Flatten(),
  layers$Dense(10L)                                        # logits: the client takes the largest
))
model$compile(optimizer = keras$optimizers$Adam(learning_rate = 3e-3),
              loss = keras$losses$SparseCategoricalCrossentropy(from_logits = TRUE),
              metrics = list("accuracy"))
batch <- 32L
epochs <- max(1L, as.integer(ceiling(steps * batch / nrow(x_train))))
n <- min(nrow(x_train), steps * batch)
invisible(model$fit(x_train[1:n, , , , drop = FALSE], y_train[1:n], batch_size = batch, epochs = epochs,
                    verbose = 0L))
cat("owner: model trained on", n, "images\n")
if (nzchar(model_file)) model$save(model_file)

# ---- PySyft's serving steps ----------------------------------------------------------------
hook <- sy$KerasHook(keras)
julia <- sy$TFEWorker(host = paste0("localhost:", ports[1]), auto_managed = TRUE)
greg  <- sy$TFEWorker(host = paste0("localhost:", ports[2]), auto_managed = TRUE)
me    <- sy$TFEWorker(host = paste0("localhost:", ports[3]), auto_managed = TRUE)  # crypto provider
cluster <- sy$TFECluster(julia, greg, me)
invisible(cluster$start())

invisible(model$share(cluster))
service <- sy$serving$service_of(model)
cat("owner: model shared; the owner holds only pointers:", service$holds_only_pointers(), "\n")

# veil needs a token per role: the client gets the addresses and the client token only
invisible(cluster$save(cluster_file))
cat("owner: cluster file written, serving 3 requests\n")

invisible(model$serve(num_requests = 3L))  # blocks until three queries were answered
invisible(model$stop())         # waits until the client fetched the last answer
cluster$stop()
cat("owner: served", service$served, "requests and stopped\n")
