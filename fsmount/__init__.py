"""fsmount: remote dataset libraries as a read-only FUSE filesystem."""
