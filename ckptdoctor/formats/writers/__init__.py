"""Writers: torch.save zip and safetensors, byte-exact, plus the rewrite step that builds the new object tree."""
