"""Pure-PyTorch OLMoE, JetMoE and GraniteMoE with a paged-KV flat-batch forward."""
