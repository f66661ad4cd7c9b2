"""The journal: the audit log, its chain, the fold, snapshots, checkpoints, the Merkle tree."""
