"""Scale-out decisions as pure functions over plain figures (no Ray, gRPC or Redis here): how many
replicas a stage wants (`policies`), and the Serve-facing shims that gather the figures
(`serve_policies`)."""
