"""PySyft 0.2 names that veil spells differently, in one place.

Each name is re-exported where PySyft had it (``sy.local_worker``,
``sy.frameworks.torch.fl.utils.federated_avg``, ``sy.federated.floptimizer.Optims``,
``sy.frameworks.torch.dp.pate.perform_analysis``, ``sy.create_sandbox``,
``sy.PrivateGridNetwork``, ``sy.Protocol``). Nothing here patches torch: tensor
verbs still come from ``veil.hook.ATTACHMENTS``. Where PySyft was insecure
(no token, pickle, the local worker as crypto provider) the spelling works
but veil's rule stays, with a one-line warning or error saying what to do.
"""
