"""The journal: the audit log, its chain, its Merkle tree, snapshots and checkpoints."""
