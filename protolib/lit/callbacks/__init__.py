"""Lightning callbacks that drive multi-stage schedules (ProtoPNet phases, push, pruning, early stopping)."""
