"""Model stage: pure nn.Modules and the flow-matching math. No file I/O, no distributed code."""
