# The client, in a second R session: query the model owner.R serves with three MNIST
# images. The images and the predictions stay private: each worker sees one random share.
#
#   RETICULATE_PYTHON=/path/to/veil/.venv/bin/python Rscript examples/r/client.R
#
# Settings (environment): VEIL_R_PORTS and VEIL_R_CLUSTER_FILE as for owner.R;
# VEIL_R_PREDICTIONS: a CSV file for the three rows of logits (default: not written).

library(reticulate)
sy <- import("veil")
datasets <- import("veil.datasets")

ports <- as.integer(strsplit(Sys.getenv("VEIL_R_PORTS", "4000,4001,4002"), ",")[[1]])
cluster_file <- Sys.getenv("VEIL_R_CLUSTER_FILE", "cluster.json")
predictions_file <- Sys.getenv("VEIL_R_PREDICTIONS", "")

# The owner writes the cluster file once the model is shared.
waited <- 0
while (!file.exists(cluster_file)) {
  if (waited > 600) stop("no cluster file from the owner after 10 minutes: is owner.R running?")
  Sys.sleep(0.5)
  waited <- waited + 0.5
}

client <- sy$TFEWorker()
julia <- sy$TFEWorker(host = paste0("localhost:", ports[1]), auto_managed = FALSE)
greg  <- sy$TFEWorker(host = paste0("localhost:", ports[2]), auto_managed = FALSE)
me    <- sy$TFEWorker(host = paste0("localhost:", ports[3]), auto_managed = FALSE)
cluster <- sy$TFECluster(julia, greg, me)

input_shape <- c(1, 28, 28, 1)  # an R vector of doubles: veil takes it as a shape
output_shape <- c(1, 10)
token <- sy$TFECluster$load(cluster_file)$client_token  # the owner hands out the client token
invisible(client$connect_to_model(input_shape, output_shape, cluster, token = token))

mnist <- datasets$load_mnist_5k(scale = FALSE)
x_test <- mnist$x_test$reshape(-1L, 28L, 28L)$numpy()
x_test <- array_reshape(x_test, c(nrow(x_test), 28, 28, 1)) / 255
y_test <- mnist$y_test$numpy()

picks <- c(1, 101, 201)  # the test rows are sorted by digit: a 0, a 1 and a 2
logits <- NULL
for (i in picks) {
  res <- client$query_model(x_test[i, , , , drop = FALSE])  # an R array [1, 28, 28, 1]
  logits <- rbind(logits, as.vector(res))
  cat(sprintf("client: image %d is a %d, the encrypted model says %d\n", i, y_test[i], which.max(res) - 1))
}
client$close()
if (nzchar(predictions_file)) write.table(logits, predictions_file, sep = ",", row.names = FALSE, col.names = FALSE)
