"""The journal: the audit log, its chain and segments, the fold, snapshots, checkpoints."""
