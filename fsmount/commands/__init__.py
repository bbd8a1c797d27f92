"""One module per `fsmount` command: its arguments, and what it does with them."""
