"""The networks: DiT and VAR transformers and their blocks (nn.Modules only: no file I/O, no distributed state)."""
