"""PATE: how much privacy do the teachers' noisy votes cost?

``perform_analysis`` (PySyft's ``sy.frameworks.torch.dp.pate``) returns the
data-dependent and the data-independent epsilon of answering queries with the
Laplace noisy max of teacher votes. When teachers agree, the data-dependent
bound is much smaller. (It depends on the private votes: report it with care.)
"""

import numpy as np
import torch

import veil as sy
from veil.dp import pate

num_teachers, num_examples, num_labels = 100, 100, 10
rng = np.random.default_rng(0)
true_labels = rng.integers(0, num_labels, size=num_examples)
# 90% of the teachers vote the true label, the rest vote at random
agree = rng.random((num_teachers, num_examples)) < 0.9
teacher_preds = np.where(agree, true_labels, rng.integers(0, num_labels, size=(num_teachers, num_examples)))

# Answer every query with veil's noisy max (Laplace, gamma = 0.1).
counts = pate.vote_counts(torch.tensor(teacher_preds), num_labels)
answers = pate.lnmax(counts, gamma=0.1)
print("student labels correct:", (answers.numpy() == true_labels).mean())

indices = np.arange(num_examples)
data_dep_eps, data_ind_eps = sy.frameworks.torch.dp.pate.perform_analysis(
    teacher_preds=teacher_preds, indices=indices, noise_eps=0.1, delta=1e-5, moments=20)
print(f"data-dependent epsilon: {data_dep_eps:.2f}")
print(f"data-independent epsilon: {data_ind_eps:.2f}")
