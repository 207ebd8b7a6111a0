"""saga_train: the thin SAGA training driver (``python -m saga_train``)."""
