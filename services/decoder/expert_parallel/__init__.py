"""Expert parallelism: shard the routed experts over ranks, plan their placement, run the group."""
