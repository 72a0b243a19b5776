"""The MoE language model and everything that serves it, in four sub-packages that import downward:

- `model`: the decoder as plain `nn.Module`s (MLA attention over the paged latent cache, the MoE
  layer, rotary embeddings), its captured decode step, and the transformers reference.
- `expert_parallel`: sharding the routed experts over ranks (`sharding`), balanced placements
  (`placement`), and the rank group a replica runs (`group`).
- `engine`: scheduling, KV block accounting, sampling and the continuous-batching engine with its
  async front. Pure: no Ray, gRPC or Redis.
- `service`: the Serve shim (`server`), the wire translation (`translate`, and `messages` for the
  torch-free part other stages import) and metrics.

`loading` builds and loads the model (whole, or one rank's share).
"""
