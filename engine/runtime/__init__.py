"""Running on one or many processes: rank bootstrap (bootstrap), the rank context and its
collectives (context), trunk gradient sync (trunk_sync), local process groups for tests and
benchmarks (local_group), checkpoints, preemption signals and the launchers' refusals (validate)."""
