"""A running mount's status: where its sockets are, serving them, asking them, showing it."""
