"""The decoder as plain `nn.Module`s whose attribute names are the checkpoint keys. Pure torch."""
